"""One process of the two-process test (tests/test_multiprocess.py); not a test module itself.

    python tests/multiprocess_worker.py PROCESS_ID PORT OUT_DIR
Two of these, each with 2 CPU devices, form one 4-device mesh through jax.distributed (gloo collectives), run one
train step on a global batch fed per process, and save the stepped model with orbax from both processes.
"""

import json
import os
import sys

import jax

process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))

from kimi_jax import distributed  # noqa: E402

assert distributed.maybe_initialize()

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kimi_jax import orbax_model, sharding  # noqa: E402
from kimi_jax.model import KimiLinearForCausalLM  # noqa: E402
from kimi_jax.training.vanilla import build_trainer, make_optimizer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sharding_cases import BATCH, LR, make_batch, make_config  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
mesh = sharding.make_mesh("data=2,fsdp=2")
model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
trainer, params, opt_state = build_trainer(model, make_optimizer(LR), mesh, BATCH)
full = make_batch()
rows = distributed.local_batch_slice(BATCH)
batch = distributed.global_batch({k: v[rows] for k, v in full.items()}, trainer.batch_sharding)
params, opt_state, metrics = trainer.step_fn(params, opt_state, batch)
orbax_model.save_model(os.path.join(out_dir, "ckpt"), nnx.merge(trainer.graphdef, params))
if distributed.is_main_process():
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({k: float(np.asarray(v)) for k, v in metrics.items()}, f)
print(f"process {process_id} done", flush=True)
