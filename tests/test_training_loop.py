"""The training loop in-process (`kimi_jax.training.loop.train`): it steps, evaluates, logs and saves; a stopped run
resumes to the uninterrupted run's records and parameters; a non-finite loss stops it without saving that state;
SIGINT / SIGTERM stop it after the step in flight.

The fast tests drive the loop with `ToyTrainer`, a trainer of the interface whose step is host arithmetic on a tiny
Kimi-Linear's parameters (no XLA compile), so they test the loop alone; the slow ones run the real vanilla trainer.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from kimi_jax import sharding
from kimi_jax.config import tiny
from kimi_jax.data import BatchIterator, PackedDataset, Record
from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.tb_events import read_scalars
from kimi_jax.training import checkpoints as ck
from kimi_jax.training.logging import METRICS_FILE, read_jsonl
from kimi_jax.training.loop import (LoopSettings, NonFiniteError, RunRecord, StopRequest, read_root_key,
                                    split_root_key, train)
from kimi_jax.training.trainer import Trainer, TrainState
from kimi_jax.training.vanilla import build_vanilla_trainer

CFG = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0)
SEQ_LEN, BATCH, STEPS, SEED = 32, 2, 4, 0
TIMING_FIELDS = ("tokens_per_sec", "steps_per_sec", "memory_mb", "step_time_s", "time")


class ByteTokenizer:
    """Bytes as token ids 3.. (0 pad, 2 EOS): enough for PackedDataset."""
    eos_token_id, pad_token_id, vocab_size = 2, 0, CFG.vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + b % (CFG.vocab_size - 3) for b in text.encode()]


def _texts(seed: int, n: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "state", "chunk", "window", "token", "layer"]
    return [Record(text=" ".join(rng.choice(words, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def data():
    return {"train": PackedDataset(ByteTokenizer(), _texts(0, 12), SEQ_LEN),
            "eval": PackedDataset(ByteTokenizer(), _texts(1, 2), SEQ_LEN)}


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh("fsdp=1", jax.devices()[:1])


def make_trainer(mesh, model, lr: float = 3e-3):
    return build_vanilla_trainer(model, mesh, dtype_name="float32", batch_size=BATCH, eval_batch_size=BATCH,
                                 opts=RunOptions(remat=False), lr=lr, warmup_steps=1, num_steps=STEPS)


def fresh_model():
    return KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))


def root_key():
    return np.asarray(jax.random.PRNGKey(SEED), np.uint32)


def settings(out, **changes) -> LoopSettings:
    return LoopSettings(**{**dict(num_steps=STEPS, output_dir=str(out), log_dir=str(out / "logs"), eval_interval=2,
                                  max_eval_batches=1, save_interval=2, quiet=True), **changes})


def run_loop(trainer, state, out, data, *, batches=None, stop=None, key=None, resumed_from=None, **changes) -> int:
    batches = batches or BatchIterator(data["train"], BATCH, seed=SEED)
    return train(trainer, state, batches, settings=settings(out, **changes),
                 root_key=root_key() if key is None else key, record=RunRecord(source="tiny", run={"seed": SEED}),
                 eval_data=data["eval"], stop=stop, resumed_from=resumed_from)


def records(out, kind: str) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(out, METRICS_FILE)) if r["type"] == kind]


def saved_params(folder) -> dict:
    from kimi_jax.orbax_model import load_model, model_param_arrays

    return {k: np.asarray(v) for k, v in model_param_arrays(load_model(folder)).items()}


class ToyTrainer(Trainer):
    """The loop's interface over a tiny Kimi-Linear's parameters with a host-side step: each step adds lr x the
    batch's mean token id / 1000 to every parameter (so the parameters depend on the data order) and reports that
    mean as its loss; in step `nan_at` it adds NaN instead."""

    stage, loss_metric, dtype_name = "toy", "loss", "float32"

    def __init__(self, mesh, lr: float = 1.0, nan_at: int | None = None):
        self.mesh, self.lr, self.nan_at = mesh, lr, nan_at
        self.batch_sharding = self.eval_sharding = None  # host arrays only
        self.eval_batch_size = BATCH
        self.graphdef, abstract = nnx.split(nnx.eval_shape(fresh_model))
        self.zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)

    def initial_state(self) -> TrainState:
        return TrainState(self.zeros, {"count": np.zeros((), np.int32)})

    def step(self, state, batch, key):
        mean = float(np.mean(batch["input_ids"]))
        delta = np.nan if state.step + 1 == self.nan_at else self.lr * mean / 1000
        params = jax.tree.map(lambda p: (p + delta).astype(p.dtype), state.trainable)
        opt = {"count": state.opt_state["count"] + 1}
        return state.advanced(params, opt), {"loss": np.float32(mean + delta), "grad_norm": np.float32(1.0)}

    def learning_rate(self, step):
        return self.lr

    def materialize(self, state):
        return nnx.merge(self.graphdef, state.trainable), None

    def num_params(self, state):
        return sum(x.size for x in jax.tree.leaves(state.trainable))

    def state_arrays(self, state):
        return ck.flatten(state.opt_state, "opt.")

    def restore(self, folder, like, step):
        from kimi_jax.orbax_model import load_model

        params = nnx.state(load_model(folder))
        params = jax.tree.map(np.asarray, params)
        return TrainState(params, ck.restore_trees(folder, {"opt.": like.opt_state})["opt."], None, step)

    def eval_stats(self, state, batch, key):
        w = float(np.sum(batch["weights"]))
        return {"nll": w * float(np.mean(jax.tree.leaves(state.trainable)[0])), "tokens": w, "correct": 0.0}

    def stage_train_tags(self, record):
        return {"train/loss/total": record["loss"]}


class StopAt:
    """Batches that ask `stop` to stop (as SIGTERM would) while step `step` runs."""

    def __init__(self, batches: BatchIterator, stop: StopRequest, step: int):
        self.batches, self.stop, self.step, self.served = batches, stop, step, 0

    def __next__(self):
        self.served += 1
        if self.served == self.step:
            self.stop.request(signal.SIGTERM)
        return next(self.batches)

    def state(self):
        return self.batches.state()


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """The same records, step for step, up to rounding (timings aside)."""
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    numbers = lambda r: {k: v for k, v in r.items() if k not in TIMING_FIELDS and not isinstance(v, str)}
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        chex.assert_trees_all_close(numbers(a), numbers(b), rtol=1e-6)


def test_the_loop_logs_saves_and_a_killed_run_resumes_to_the_same_records(tmp_path, data, mesh, capsys):
    toy = ToyTrainer(mesh)
    whole = tmp_path / "whole"
    assert run_loop(toy, toy.initial_state(), whole, data) == 0
    assert [r["step"] for r in records(whole, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in records(whole, "eval")] == [0, 2, 4]
    assert all(r["loss"] > 0 and r["lr"] == 1.0 and r["tokens_per_sec"] > 0 for r in records(whole, "train"))
    assert [s for s, _ in ck.list_checkpoints(whole)] == [2, 4]
    state = ck.read_train_state(ck.step_folder(whole, 4))
    assert state["step"] == 4 and state["data_state"]["position"] == 4 and state["run"] == {"seed": SEED}
    assert state["metrics"]["step"] == 4 and state["mesh"]["fsdp"] == 1 and state["devices"] == jax.device_count()
    scalars = read_scalars(str(whole / "logs"))
    for tag in ("train/loss/total", "train/lr", "train/grad_norm", "train/performance/tokens_per_sec"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    assert [s for s, _ in scalars["evaluation/perplexity"]] == [0, 2, 4]
    assert "done: step 4" in capsys.readouterr().out

    # Asked to stop (as by SIGTERM) during step 3: it finishes the step, saves it and says so.
    stopped = tmp_path / "stopped"
    stop = StopRequest()
    batches = StopAt(BatchIterator(data["train"], BATCH, seed=SEED), stop, step=3)
    assert run_loop(toy, toy.initial_state(), stopped, data, batches=batches, stop=stop) == 128 + signal.SIGTERM
    assert [s for s, _ in ck.list_checkpoints(stopped)] == [2, 3]
    assert f"stopped by SIGTERM at step 3; checkpoint {ck.step_folder(stopped, 3)}" in capsys.readouterr().err

    # As if killed before step_3 was written: resuming from step_2 drops the logs of step 3 and reproduces the rest.
    import shutil

    shutil.rmtree(ck.step_folder(stopped, 3))
    folder = ck.step_folder(stopped, 2)
    saved = ck.read_train_state(folder)
    batches = BatchIterator(data["train"], BATCH, seed=SEED)
    batches.restore(saved["data_state"])
    resumed = toy.restore(folder, toy.initial_state(), saved["step"])
    assert run_loop(toy, resumed, stopped, data, batches=batches, key=read_root_key(folder, root_key()),
                    resumed_from=folder) == 0
    assert "dropped 1 records after step 2" in capsys.readouterr().err
    assert_same_records(read_jsonl(os.path.join(stopped, METRICS_FILE)), read_jsonl(os.path.join(whole, METRICS_FILE)))
    assert [s for s, _ in read_scalars(str(stopped / "logs"))["train/loss/total"]] == [1, 2, 3, 4]  # 3 purged
    chex.assert_trees_all_close(saved_params(ck.step_folder(stopped, 4)), saved_params(ck.step_folder(whole, 4)))


def test_a_non_finite_loss_stops_the_loop_and_keeps_the_last_good_checkpoint(tmp_path, data, mesh):
    toy = ToyTrainer(mesh, nan_at=3)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as info:
        run_loop(toy, toy.initial_state(), out, data, save_interval=1)
    assert info.value.exit_code == 3
    assert str(info.value) == (f"non-finite loss at step 3 (loss nan); stopped without saving this state; the last "
                               f"good checkpoint is {ck.step_folder(out, 2)}")
    assert [s for s, _ in ck.list_checkpoints(out)] == [1, 2]
    assert [r["loss"] for r in records(out, "train")][-1] is None  # logged (as null), never saved
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_a_run_already_at_its_last_step_trains_nothing(tmp_path, data, mesh, capsys):
    toy = ToyTrainer(mesh)
    state = dataclasses.replace(toy.initial_state(), step=STEPS)
    assert run_loop(toy, state, tmp_path / "done", data) == 0
    assert "already at step 4 of --num_steps 4; nothing to train" in capsys.readouterr().err
    assert records(tmp_path / "done", "train") == [] and ck.list_checkpoints(tmp_path / "done") == []


@pytest.mark.slow
def test_a_run_logs_and_saves_and_a_stopped_run_resumes_to_the_same_losses(tmp_path, data, mesh, capsys):
    trainer, state = make_trainer(mesh, fresh_model())
    whole = tmp_path / "whole"
    assert run_loop(trainer, state, whole, data) == 0
    train_records, eval_records = records(whole, "train"), records(whole, "eval")
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [0, 2, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] == r["loss"] for r in train_records)
    np.testing.assert_allclose([r["lr"] for r in train_records], [trainer.learning_rate(s) for s in range(1, 5)])
    np.testing.assert_allclose([r["perplexity"] for r in eval_records], np.exp([r["nll"] for r in eval_records]))
    assert [s for s, _ in ck.list_checkpoints(whole)] == [2, 4]
    scalars = read_scalars(str(whole / "logs"))
    assert [s for s, _ in scalars["train/loss/total"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["evaluation/perplexity"]] == [0, 2, 4]
    assert "done: step 4" in capsys.readouterr().out

    # The same run, asked to stop during step 3: step 3 is saved, then it resumes from there.
    stopped = tmp_path / "stopped"
    trainer, state = make_trainer(mesh, fresh_model())
    stop = StopRequest()
    batches = StopAt(BatchIterator(data["train"], BATCH, seed=SEED), stop, step=3)
    assert run_loop(trainer, state, stopped, data, batches=batches, stop=stop) == 128 + signal.SIGTERM
    assert [s for s, _ in ck.list_checkpoints(stopped)] == [2, 3]
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().err

    folder = ck.step_folder(stopped, 3)
    abstract = nnx.eval_shape(fresh_model)
    trainer, like = make_trainer(mesh, abstract)
    saved = ck.read_train_state(folder)
    state = trainer.restore(folder, like, saved["step"])
    batches = BatchIterator(data["train"], BATCH, seed=SEED)
    batches.restore(saved["data_state"])
    key = read_root_key(folder, root_key())
    assert run_loop(trainer, state, stopped, data, batches=batches, key=key, resumed_from=folder) == 0
    assert [s for s, _ in ck.list_checkpoints(stopped)] == [2, 3, 4]
    assert_same_records(read_jsonl(os.path.join(stopped, METRICS_FILE)), read_jsonl(os.path.join(whole, METRICS_FILE)))
    chex.assert_trees_all_close(saved_params(ck.step_folder(stopped, 4)), saved_params(ck.step_folder(whole, 4)),
                                rtol=1e-6)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_without_saving_that_state(tmp_path, data, mesh):
    trainer, state = make_trainer(mesh, fresh_model(), lr=1e30)
    out = tmp_path / "nonfinite"
    with pytest.raises(NonFiniteError) as info:
        run_loop(trainer, state, out, data, save_interval=1, eval_interval=0)
    bad = [r for r in records(out, "train") if r["loss"] is None or r["grad_norm"] is None]
    assert len(bad) == 1 and info.value.exit_code == 3
    step = bad[0]["step"]
    message = str(info.value)
    assert message.startswith("non-finite") and f"at step {step}" in message
    last = f"the last good checkpoint is {ck.step_folder(out, step - 1)}" if step > 1 else "no checkpoint was written"
    assert message.endswith(last)
    assert [s for s, _ in ck.list_checkpoints(out)] == list(range(1, step))  # never the bad state
    for s in range(1, step):
        chex.assert_tree_all_finite(saved_params(ck.step_folder(out, s)))


def test_the_root_key_splits_into_the_train_and_eval_keys():
    train_key, eval_key = split_root_key(root_key())
    chex.assert_shape([train_key, eval_key], (2,))
    assert not np.array_equal(train_key, eval_key)
    chex.assert_trees_all_equal(split_root_key(root_key()), (train_key, eval_key))


def test_a_train_state_is_a_pytree_of_its_arrays_with_a_static_step():
    state = TrainState({"w": np.ones(3)}, {"m": np.zeros(3)}, None, step=5)
    leaves, treedef = jax.tree.flatten(state)
    assert len(leaves) == 2 and jax.tree.unflatten(treedef, leaves).step == 5
    doubled = jax.tree.map(lambda x: 2 * x, state)
    assert doubled.step == 5 and doubled.advanced({"w": 1}, {"m": 2}).step == 6


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigint_and_sigterm_ask_for_a_stop_and_a_second_ctrl_c_aborts(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGTERM
        assert "SIGTERM: stopping after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
