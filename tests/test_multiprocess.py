"""Two local processes x 2 CPU devices (jax.distributed on 127.0.0.1, gloo) vs one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from kimi_jax import orbax_model, sharding
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.training.vanilla import build_trainer, make_optimizer, shard_batch
from conftest import child_env
from sharding_cases import BATCH, LR, make_batch, make_config

HERE = os.path.dirname(__file__)
REPO = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
    port = free_port()
    env = child_env()  # each worker sets its own 2 devices
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), str(port),
                                 str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = []
    for w in workers:
        out, _ = w.communicate(timeout=600)
        outputs.append(out)
    for i, (w, out) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"worker {i} failed:\n{out[-3000:]}"

    # The same step in this process, on one device.
    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    trainer, params, opt_state = build_trainer(model, make_optimizer(LR), sharding.make_mesh("fsdp=1",
                                                                                            jax.devices()[:1]), BATCH)
    params, _, metrics = trainer.step_fn(params, opt_state, shard_batch(make_batch(), trainer.batch_sharding))
    with open(tmp_path / "metrics.json") as f:
        two = json.load(f)
    print(f"\n  loss: two processes {two['loss']:.7f}, one process {float(metrics['loss']):.7f}")
    assert abs(two["loss"] - float(metrics["loss"])) <= 1e-5
    assert abs(two["grad_norm"] - float(metrics["grad_norm"])) <= 1e-5 * max(1.0, float(metrics["grad_norm"]))

    restored = orbax_model.load_model(str(tmp_path / "ckpt"))
    one = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    diffs = [float(np.abs(np.asarray(v[...]) - one[k]).max())
             for k, v in nnx.to_flat_state(nnx.state(restored, nnx.Param))]
    print(f"  params saved by two processes vs stepped in one: max|diff| {max(diffs):.2e}")
    assert len(diffs) == len(one) and max(diffs) <= 1e-5
