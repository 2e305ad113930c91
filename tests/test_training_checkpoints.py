"""kimi_jax.training: async atomic checkpoints, tree flattening, JSONL and TensorBoard logs, learning-rate helpers."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kimi_jax import model_folder
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.training import checkpoints as ck
from kimi_jax.training import logging as tlog
from kimi_jax.tb_events import read_scalars

CFG = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0)


def model_state():
    return nnx.split(KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0)))[1]


def save_step(writer, step, params, opt, extra=None, **kw):
    writer.save(step, config=CFG.to_hf_dict(), meta={"dtype": "float32", "num_params": 1, "source": "test"},
                params=params, state_arrays={**ck.flatten(opt, "opt."), "rng": np.arange(2, dtype=np.uint32)},
                state_json={"data_state": {"position": step}, "run": {"stage": "vanilla"}, **(extra or {})}, **kw)


def test_flatten_unflatten_round_trips_an_optimizer_state():
    state = model_state()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(state)
    flat = ck.flatten(opt, "opt.")
    assert len(flat) == len(jax.tree.leaves(opt)) and all(k.startswith("opt.") for k in flat)
    assert any(".mu." in k for k in flat) and any(k.endswith("count") for k in flat)
    marked = {k: np.full(np.shape(v), i, np.asarray(v).dtype) for i, (k, v) in enumerate(flat.items())}
    back = ck.unflatten(opt, marked, "opt.")
    assert jax.tree.structure(back) == jax.tree.structure(opt)
    for (k, want), got in zip(marked.items(), jax.tree.leaves(back)):
        np.testing.assert_array_equal(got, want, err_msg=k)
    with pytest.raises(KeyError):
        ck.unflatten(opt, dict(list(marked.items())[1:]), "opt.")


def test_writer_saves_async_atomically_keeps_the_newest_and_restores_exactly(tmp_path):
    from kimi_jax.orbax_model import load_model, model_param_arrays

    out = str(tmp_path / "run")
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(1))
    params = model_param_arrays(model)
    opt = optax.adamw(1e-3).init(nnx.split(model)[1])
    opt = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt)
    writer = ck.CheckpointWriter(out, max_to_keep=2, model_files={"tiktoken.model": b"abc 0\n"})
    for step in (5, 10, 15):
        save_step(writer, step, params, opt)
    assert writer.wait() == (15, ck.step_folder(out, 15))
    writer.close()
    assert [s for s, _ in ck.list_checkpoints(out)] == [10, 15]  # max_to_keep
    assert sorted(os.listdir(out)) == ["latest", "step_10", "step_15"]  # no temporary folder left
    with open(os.path.join(out, "latest")) as f:
        assert f.read() == "step_15\n"
    assert (os.stat(os.path.join(out, "latest")).st_mode & 0o044) == 0o044  # readable like any other output file
    folder, _ = model_folder.resolve(out)
    assert folder == ck.step_folder(out, 15)
    with open(os.path.join(folder, "tiktoken.model"), "rb") as f:
        assert f.read() == b"abc 0\n"
    state = ck.read_train_state(folder)
    assert state["step"] == 15 and state["data_state"] == {"position": 15} and state["format"] == ck.FORMAT
    restored = load_model(folder)  # params/ is a plain kimi_jax model folder
    for key, want in model_param_arrays(restored).items():
        np.testing.assert_array_equal(np.asarray(want), np.asarray(params[key]), err_msg=key)
    got = ck.restore_trees(folder, {"opt.": opt})["opt."]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(opt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restoring_a_tree_the_checkpoint_does_not_hold_names_the_folder_and_the_key(tmp_path):
    writer = ck.CheckpointWriter(str(tmp_path / "run"))
    opt = {"w": np.ones((2, 3), np.float32)}
    save_step(writer, 1, {"w": np.zeros(2, np.float32)}, opt)
    writer.close()
    folder = ck.step_folder(str(tmp_path / "run"), 1)
    state_dir = os.path.join(folder, ck.TRAIN_STATE_DIR)
    np.testing.assert_array_equal(ck.restore_trees(folder, {"rng": np.zeros(2, np.uint32)})["rng"], [0, 1])
    with pytest.raises(ck.TrainCheckpointError, match=f"^{state_dir}: 'trainable.w' is missing \\(1 of 1 arrays\\)"):
        ck.restore_trees(folder, {"trainable.": {"w": np.ones((2, 3), np.float32)}})
    with pytest.raises(ck.TrainCheckpointError, match=f"^{state_dir}: 'opt.w' has shape \\(2, 3\\), expected \\(3,\\)"):
        ck.restore_trees(folder, {"opt.": {"w": np.ones(3, np.float32)}})


def test_params_are_hard_linked_when_unchanged_and_written_when_linking_fails(tmp_path):
    from kimi_jax.orbax_model import model_param_arrays, save_model

    source = str(tmp_path / "source")
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(2))
    save_model(source, model)
    opt = optax.sgd(1.0).init(nnx.split(model)[1])
    writer = ck.CheckpointWriter(str(tmp_path / "run"))
    save_step(writer, 1, model_param_arrays(model), opt, link_params_from=source)
    save_step(writer, 2, None, opt, link_params_from=source)  # nothing to write: linking is the only way
    save_step(writer, 3, model_param_arrays(model), opt, link_params_from=str(tmp_path / "missing"))  # falls back
    writer.close()
    src_files = sorted(os.path.relpath(os.path.join(r, f), source + "/params")
                       for r, _, fs in os.walk(source + "/params") for f in fs)
    for step in (1, 2):
        for rel in src_files:
            a = os.stat(os.path.join(source, "params", rel))
            b = os.stat(os.path.join(ck.step_folder(tmp_path / "run", step), "params", rel))
            assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev), rel
    third = ck.step_folder(tmp_path / "run", 3)
    assert ck.is_complete(third)
    assert os.stat(os.path.join(third, "params", "_METADATA")).st_nlink == 1  # written, not linked


def test_a_failed_save_leaves_earlier_checkpoints_and_no_partial_folder(tmp_path, monkeypatch):
    from kimi_jax.orbax_model import model_param_arrays

    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(3))
    opt = optax.sgd(1.0).init(nnx.split(model)[1])
    out = str(tmp_path / "run")
    writer = ck.CheckpointWriter(out)
    save_step(writer, 1, model_param_arrays(model), opt)
    writer.wait()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer._state, "save", broken)
    with pytest.raises(ck.CheckpointSaveError) as info:
        save_step(writer, 2, model_param_arrays(model), opt)
    writer.close()
    assert str(info.value) == (f"cannot write checkpoint step 2: no space left on device writing "
                               f"{ck.step_folder(out, 2)} (nothing of it was left on disk)")
    assert sorted(os.listdir(out)) == ["latest", "step_1"]
    assert ck.latest_checkpoint(out)[0] == 1


def test_an_existing_step_folder_is_never_replaced(tmp_path):
    from kimi_jax.orbax_model import model_param_arrays

    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(3))
    opt = optax.sgd(1.0).init(nnx.split(model)[1])
    out = tmp_path / "run"
    (out / "step_1").mkdir(parents=True)
    (out / "step_1" / "notes.txt").write_text("the user's")
    writer = ck.CheckpointWriter(str(out))
    with pytest.raises(ck.CheckpointSaveError, match=f"{out}/step_1 already exists; this run does not replace it"):
        save_step(writer, 1, model_param_arrays(model), opt)
    writer.close()
    assert sorted(os.listdir(out)) == ["step_1"] and os.listdir(out / "step_1") == ["notes.txt"]


def test_discovery_ignores_incomplete_and_stale_folders(tmp_path):
    out = tmp_path / "run"
    (out / "step_7").mkdir(parents=True)  # no train_state.json: incomplete (never renamed into place by us)
    (out / ".step_9.tmp").mkdir()
    (out / ".latest.abc.tmp").write_text("x")
    (out / "notes.txt").write_text("keep")
    assert ck.list_checkpoints(out) == [] and ck.latest_checkpoint(out) is None
    with pytest.raises(model_folder.ModelFolderError, match="nor is it a training output folder"):
        model_folder.resolve(out)
    assert ck.remove_stale(str(out)) == [".latest.abc.tmp", ".step_9.tmp"]  # named, for the run's notice
    assert sorted(os.listdir(out)) == ["notes.txt", "step_7"]
    removed = ck.remove_run_outputs(str(out), extra_files=("metrics.jsonl",))
    assert removed == ["step_7"] and sorted(os.listdir(out)) == ["notes.txt"]
    (out / "step_3").mkdir()
    (out / "step_3" / ck.TRAIN_STATE_FILE).write_text(json.dumps({"format": "other", "step": 3}))
    with pytest.raises(ck.TrainCheckpointError, match="format 'other'"):
        ck.read_train_state(out / "step_3")


def test_jsonl_truncation_skips_torn_lines_and_later_steps(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for step in range(6):
            f.write(json.dumps({"type": "train", "step": step, "loss": float(step)}) + "\n")
        f.write('{"type": "train", "step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in tlog.read_jsonl(path)] == list(range(6))
    assert tlog.truncate_jsonl(path, 3) == 2
    assert [r["step"] for r in tlog.read_jsonl(path)] == [0, 1, 2, 3]
    assert tlog.to_python({"a": np.float32("nan"), "b": np.arange(3), "c": jnp.float32(2.5)}) == {
        "a": None, "b": [0, 1, 2], "c": 2.5}


def test_jsonl_truncation_cuts_a_tail_in_place_and_leaves_a_clean_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"type": "train", "step": s}) + "\n" for s in range(1, 6)))
    before = os.stat(path)
    assert tlog.truncate_jsonl(str(path), 5) == 0
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns  # not rewritten: a full disk cannot fail a resume here
    with open(path, "a") as f:
        f.write('{"type": "train", "step": 6}\n{"type": "tr')  # a killed run's record past step 5, torn line
    assert tlog.truncate_jsonl(str(path), 5) == 1
    assert os.stat(path).st_ino == before.st_ino and os.path.getsize(path) == before.st_size  # cut, not copied
    with open(path, "r+") as f:  # a torn line between good records: the file is rewritten without it
        lines = f.readlines()
        f.seek(0)
        f.writelines(lines[:2] + ['{"ty\n'] + lines[2:])
    assert tlog.truncate_jsonl(str(path), 5) == 0
    assert [r["step"] for r in tlog.read_jsonl(str(path))] == [1, 2, 3, 4, 5]
    assert os.path.getsize(path) == before.st_size


def test_a_failed_log_write_is_one_error_naming_the_file_and_leaves_no_torn_record(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out, logs = tmp_path / "out", str(tmp_path / "logs")
    out.mkdir()
    os.symlink("/dev/full", out / tlog.METRICS_FILE)  # every write: "No space left on device"
    log = tlog.MetricsLog(str(out), logs)
    with pytest.raises(tlog.LogWriteError) as info:
        log.record({"type": "train", "step": 1, "loss": 1.0})
    assert str(info.value) == (f"cannot write the training log: no space left on device writing "
                               f"{out / tlog.METRICS_FILE}")
    assert isinstance(info.value, ck.TrainWriteError)  # exit status 1 in experiments.train
    log.close()


def test_metrics_log_and_event_reader_honour_purge_steps(tmp_path):
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    first = tlog.MetricsLog(out, logs, purge_step=0)
    for step in range(1, 6):
        first.scalars({"train/loss/total": 10.0 - step, "train/skip": float("nan"), "train/none": None}, step)
        first.record({"type": "train", "step": step, "loss": np.float32(step)})
    first.close()
    import time

    time.sleep(1.1)  # event file names carry the second they were created in
    second = tlog.MetricsLog(out, logs, purge_step=4)  # resumed after a checkpoint at step 3
    for step in range(4, 8):
        second.scalars({"train/loss/total": 100.0 + step}, step)
    second.close()
    scalars = read_scalars(logs)
    assert set(scalars) == {"train/loss/total"}
    assert scalars["train/loss/total"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0),
                                           (7, 107.0)]
    assert [r["loss"] for r in tlog.read_jsonl(os.path.join(out, tlog.METRICS_FILE))] == [1, 2, 3, 4, 5]
    disabled = tlog.MetricsLog(str(tmp_path / "never"), str(tmp_path / "never_logs"), enabled=False)
    disabled.scalars({"x": 1.0}, 1)
    disabled.record({"x": 1})
    disabled.close()
    assert not os.path.exists(tmp_path / "never")


def test_memory_is_reported_in_megabytes():
    mb = tlog.memory_mb()
    assert math.isfinite(mb) and 10 < mb < 1e7
