"""`python -m experiments.train` end to end on a tiny Kimi-Linear (2 layers: KDA + MLA, MoE) with a real Kimi-format
tokenizer and real English text (the stdlib's pydoc topics; the demo corpus may need a download).

The training runs are subprocesses (a killed run must really be killed, and the single-device and 8-device runs need
different XLA_FLAGS). They start together from one module fixture, a few at a time, share a persistent compilation
cache (the kill / resume sequence reuses the uninterrupted run's programs) and compile at XLA CPU optimisation level 0
(compilation dominates their runtime). Error cases run in-process: they fail before any device work.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io as std_io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(chunk_width=64, max_inner_steps=2, d_state=32, refine_rank=8, gate_hidden=16, mixer_heads=2, lora_rank=4)
TIMING_FIELDS = ("tokens_per_sec", "steps_per_sec", "memory_mb", "step_time_s", "time")
TRAIN_TAGS = ("train/loss/total", "train/loss/final_ce", "train/loss/masked_ce", "train/loss/halt",
              "train/loss/ponder", "train/loss/length", "train/loss/stability", "train/lr",
              "train/generation/avg_refine_steps", "train/generation/commit_rate",
              "train/generation/avg_chunk_length", "train/performance/tokens_per_sec",
              "train/performance/memory_mb", "train/performance/steps_per_sec")
RUN_TIMEOUT = 600


# ------------------------------------------------------------------------------------------------------ fixtures
def _pick_documents():
    """(train texts, validation texts): real prose; the two shortest substantial topics are held out."""
    import pydoc_data.topics

    topics = sorted(pydoc_data.topics.topics.items())
    texts = [text for _, text in topics if len(text) > 500]
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    held = set(by_length[:3])
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Model folders (HF and orbax, same weights), a data folder, recursive configs and a compile cache."""
    pytest.importorskip("torch")
    from kimi_jax import orbax_model
    from kimi_jax import tokenizer as tokenizer_mod
    from kimi_jax.config import tiny
    from kimi_jax.hf.loading import from_pretrained
    from kimi_jax.recursive.config import load_preset
    from kimi_jax.reference import build_reference, save_reference
    from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus

    root = tmp_path_factory.mktemp("train_cli")
    hf = str(root / "hf")
    build_kimi_format_tokenizer([" ".join(local_corpus())[:100_000]], hf, vocab_size=300)
    tok = tokenizer_mod.load(hf)
    cfg = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=tok.vocab_size,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_reference(build_reference(cfg, 0), hf)
    orbax = str(root / "orbax")
    orbax_model.save_model(orbax, from_pretrained(hf), source=hf)
    for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(hf, name), "rb") as src, open(os.path.join(orbax, name), "wb") as dst:
            dst.write(src.read())
    data = root / "data"
    data.mkdir()
    train, held = _pick_documents()
    for i, text in enumerate(train):
        (data / f"doc_{i:03d}.txt").write_text(text)
    for i, text in enumerate(held):
        (data / f"validation_{i}.txt").write_text(text)
    configs = {}
    for phase in "abc":
        extra = {"unfreeze_layers": [1]} if phase == "c" else {}
        rcfg = load_preset(f"phase_{phase}").replace(**SMALL, **extra)
        configs[phase] = str(root / f"phase_{phase}.json")
        rcfg.to_json(configs[phase])
    cache = root / "jax_cache"
    cache.mkdir()
    return {"root": root, "hf": hf, "orbax": orbax, "data": str(data), "configs": configs, "cache": str(cache),
            "cfg": cfg}


def env_for(work, devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    # XLA's CPU backend at optimisation level 0 compiles these programs in about half the time; every run here
    # uses the same flags, so the comparisons between runs are unaffected.
    flags += [f"--xla_force_host_platform_device_count={devices}", "--xla_backend_optimization_level=0"]
    env.update(XLA_FLAGS=" ".join(flags),
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=work["cache"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    return env


def command(*args) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *[str(a) for a in args]]


def vanilla_args(work, out, *extra):
    # The evaluation plan's vanilla command passes --phase a, --chunk_width 128 and --trust_remote_code.
    return ["--model_path", work["hf"], "--data", work["data"], "--seq_len", 128, "--batch_size", 8,
            "--num_steps", 30, "--lr", 3e-3, "--eval_interval", 15, "--save_interval", 10, "--no-remat", "--quiet",
            "--phase", "a", "--chunk_width", 128, "--trust_remote_code", "--output_dir", out, *extra]


def recursive_args(work, out, phase="a", model="orbax", *extra):
    return ["--model_path", work[model], "--use_recursive", "--phase", phase, "--recursive_config",
            work["configs"][phase], "--data", work["data"], "--seq_len", 128, "--batch_size", 4, "--lr", 3e-3,
            "--no-remat", "--quiet", "--output_dir", out, *extra]


def run_cli(work, args, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=REPO, env=env_for(work, devices), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def read_records(out) -> list[dict]:
    from kimi_jax.training.logging import read_jsonl

    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def train_records(out) -> list[dict]:
    return [r for r in read_records(out) if r["type"] == "train"]


def eval_records(out) -> list[dict]:
    return [r for r in read_records(out) if r["type"] == "eval"]


def wait_for(predicate, proc, log, timeout=RUN_TIMEOUT, what=""):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            with open(log) as f:
                raise AssertionError(f"the run ended (status {proc.returncode}) before {what}: {f.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def stop_and_resume(work, args, devices: int) -> subprocess.CompletedProcess:
    """SIGTERM once step_10 is saved (a graceful stop), then the same command again: it resumes and finishes."""
    from kimi_jax.training.checkpoints import is_complete, step_folder

    out = args[args.index("--output_dir") + 1]
    log = str(work["root"] / f"{os.path.basename(out)}_stopped.log")
    with open(log, "w") as f:
        first = subprocess.Popen(command(*args), cwd=REPO, env=env_for(work, devices), stdout=f, stderr=f)
    wait_for(lambda: is_complete(step_folder(out, 10)), first, log, what="checkpoint step_10")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=RUN_TIMEOUT)
    stopped_at = max(r["step"] for r in train_records(out))
    result = run_cli(work, args, devices)
    result.stopped_at = stopped_at
    return result


def kill_and_resume(work, reference) -> dict:
    """SIGKILL after step_10 exists, resume; SIGTERM a few steps later (graceful stop + checkpoint), resume again."""
    from kimi_jax.training.checkpoints import is_complete, step_folder

    reference.result()  # the uninterrupted run filled the compile cache with the same programs
    out = str(work["root"] / "rec_killed")
    args = recursive_args(work, out, "a", "orbax", "--num_steps", 30, "--eval_interval", 15, "--save_interval", 10)
    env = env_for(work, 1)
    logs = [str(work["root"] / f"killed_{i}.log") for i in range(2)]
    with open(logs[0], "w") as log:
        first = subprocess.Popen(command(*args), cwd=REPO, env=env, stdout=log, stderr=log)
    wait_for(lambda: is_complete(step_folder(out, 10)), first, logs[0], what="checkpoint step_10")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    killed_at = max(r["step"] for r in train_records(out))
    with open(logs[1], "w") as log:
        second = subprocess.Popen(command(*args), cwd=REPO, env=env, stdout=log, stderr=log)
    wait_for(lambda: any(r["step"] >= 17 for r in train_records(out)), second, logs[1],
             what="step 17 of the resumed run")
    second.send_signal(signal.SIGTERM)
    second.wait(timeout=RUN_TIMEOUT)
    with open(logs[1]) as f:
        second_err = f.read()
    third = run_cli(work, args)
    return {"out": out, "first_status": first.returncode, "killed_at": killed_at, "second_status": second.returncode,
            "second_err": second_err, "third": third}


@pytest.fixture(scope="module")
def runs(work):
    """Every training run of this module, started at once on a small pool; each value is a Future."""
    root = work["root"]
    jobs = {
        "rec_a": lambda: run_cli(work, recursive_args(work, str(root / "rec_a"), "a", "orbax", "--num_steps", 30,
                                                      "--eval_interval", 15, "--save_interval", 10)),
        "vanilla": lambda: run_cli(work, vanilla_args(work, str(root / "vanilla"))),
        # Expert parallelism (experts over `expert`, tokens by all-to-all): stopped after step 10, resumed to 30.
        "sharded": lambda: stop_and_resume(work, vanilla_args(work, str(root / "sharded"), "--mesh",
                                                              "data=2,expert=4", "--eval_interval", 0), devices=8),
        "rec_b": lambda: run_cli(work, recursive_args(work, str(root / "rec_b"), "b", "hf", "--num_steps", 4,
                                                      "--eval_interval", 0, "--save_interval", 2, "--remat")),
        "rec_c": lambda: run_cli(work, recursive_args(work, str(root / "rec_c"), "c", "hf", "--num_steps", 4,
                                                      "--eval_interval", 0, "--save_interval", 0)),
        "nonfinite": lambda: run_cli(work, ["--model_path", work["hf"], "--data", work["data"], "--seq_len", 128,
                                            "--batch_size", 4, "--num_steps", 6, "--lr", 1e30, "--warmup_steps", 0,
                                            "--eval_interval", 0, "--save_interval", 1, "--no-remat", "--quiet",
                                            "--train_groups", "lm_head,norms", "--grad_accum", 2, "--output_dir",
                                            str(root / "nonfinite")]),
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    futures["killed"] = pool.submit(kill_and_resume, work, futures["rec_a"])
    futures["generate"] = pool.submit(
        lambda: (futures["rec_a"].result(),
                 subprocess.run([sys.executable, "-m", "experiments.generate", "--model_path",
                                 str(root / "rec_a" / "step_30"), "--use_recursive", "--prompt", "The value of",
                                 "--max_new_tokens", "8", "--quiet", "--output_json", str(root / "gen.json")], cwd=REPO,
                                env=env_for(work, 1), capture_output=True, text=True, timeout=RUN_TIMEOUT))[1])
    yield futures
    pool.shutdown(wait=True)


def finished(runs, name) -> subprocess.CompletedProcess:
    result = runs[name].result()
    assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def flat_params(folder) -> dict[str, np.ndarray]:
    """Every parameter array of a kimi_jax model folder, read with orbax alone (no model is built)."""
    import jax

    from kimi_jax.orbax_model import restore_arrays, stored_arrays

    targets = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stored_arrays(folder).items()}
    return {k: np.asarray(v) for k, v in restore_arrays(folder, targets).items()}


def hf_params(work) -> dict[str, np.ndarray]:
    """The input model's parameters: the orbax folder was saved from `from_pretrained(hf)`, so they are the same."""
    if "hf_params" not in work:
        work["hf_params"] = flat_params(work["orbax"])
    return work["hf_params"]


def changed_keys(before: dict, after: dict) -> set:
    assert set(before) == set(after)
    return {k for k in before if not np.array_equal(before[k], after[k])}


# -------------------------------------------------------------------------------------------------- vanilla
@pytest.mark.slow
def test_vanilla_training_lowers_the_held_out_loss(runs, work):
    from kimi_jax.training.vanilla import vanilla_lr

    result = finished(runs, "vanilla")
    out = str(work["root"] / "vanilla")
    assert "--phase, --chunk_width are ignored in the vanilla stage" in result.stderr
    assert "--trust_remote_code is ignored" in result.stderr
    evals = eval_records(out)
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[0]["tokens"] == evals[-1]["tokens"] > 0  # every held-out row, every time
    assert evals[-1]["nll"] < evals[0]["nll"] - 0.5, evals
    assert evals[-1]["perplexity"] == pytest.approx(np.exp(evals[-1]["nll"]))
    train = train_records(out)
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in train)
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 0.5
    for r in train:  # the logged learning rate is the optimizer's (warmup min(100, 30 // 10) = 3, cosine)
        assert r["lr"] == pytest.approx(vanilla_lr(3e-3, 3, 30, "cosine", r["step"] - 1), rel=1e-6, abs=1e-12)
        assert r["tokens_per_sec"] > 0 and r["memory_mb"] > 0
    assert "done: step 30" in result.stdout and "tokens/s" in result.stdout


@pytest.mark.slow
def test_vanilla_checkpoints_are_complete_model_folders(runs, work):
    from kimi_jax.recursive import io
    from kimi_jax import model_folder
    from kimi_jax.training import checkpoints as ck

    finished(runs, "vanilla")
    out = str(work["root"] / "vanilla")
    assert [s for s, _ in ck.list_checkpoints(out)] == [10, 20, 30]
    assert model_folder.resolve(out)[0] == ck.step_folder(out, 30)
    with open(os.path.join(out, "latest")) as f:
        assert f.read().strip() == "step_30"
    folder = ck.step_folder(out, 30)
    assert {"config.json", "kimi_jax.json", "params", "tiktoken.model", "tokenizer_config.json",
            "special_tokens_map.json", "train_state", "train_state.json"} <= set(os.listdir(folder))
    assert [name for name in os.listdir(out) if name.startswith(".")] == [".lock"]  # no temporaries left
    with open(os.path.join(out, ".lock")) as f:
        assert f.read() == ""  # released
    state = ck.read_train_state(folder)
    assert state["step"] == 30 and state["data_state"]["position"] == 30 and state["run"]["stage"] == "vanilla"
    assert state["metrics"]["step"] == 30
    with open(os.path.join(folder, "kimi_jax.json")) as f:
        meta = json.load(f)
    assert meta["training"]["stage"] == "vanilla" and meta["training"]["step"] == 30
    model, sidecar, _, tok = io.load_for_generation(folder, overrides={"recursive_enabled": False}, notice=None)
    assert sidecar is None and tok.vocab_size <= model.config.vocab_size
    trained = flat_params(folder)
    assert len(changed_keys(hf_params(work), trained)) > 0.9 * len(trained)  # full fine-tuning moved everything


@pytest.mark.slow
def test_expert_parallel_run_resumes_and_matches_the_single_device_run(runs, work):
    finished(runs, "vanilla")
    finished(runs, "sharded")
    assert 10 <= runs["sharded"].result().stopped_at < 30, "the first run was not stopped part-way"
    single, sharded = train_records(str(work["root"] / "vanilla")), train_records(str(work["root"] / "sharded"))
    assert [r["step"] for r in sharded] == list(range(1, 31))
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in single], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in sharded], [r["grad_norm"] for r in single], rtol=1e-3)
    from kimi_jax.training.checkpoints import read_train_state

    state = read_train_state(os.path.join(str(work["root"] / "sharded"), "step_30"))
    assert state["mesh"]["data"] == 2 and state["mesh"]["expert"] == 4 and state["devices"] == 8


@pytest.mark.slow
def test_restricted_groups_and_a_non_finite_loss_stop_the_run_cleanly(runs, work):
    from kimi_jax.orbax_model import param_key
    from kimi_jax.model import KimiLinearForCausalLM
    from kimi_jax.training.vanilla import param_group
    from kimi_jax.training import checkpoints as ck

    result = runs["nonfinite"].result()
    out = str(work["root"] / "nonfinite")
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    bad = [r for r in train_records(out) if r["loss"] is None or r["grad_norm"] is None]
    assert len(bad) == 1
    step = bad[0]["step"]
    assert step >= 2 and last.startswith("error: non-finite") and f"at step {step}" in last
    assert f"the last good checkpoint is {ck.step_folder(out, step - 1)}" in last
    assert [s for s, _ in ck.list_checkpoints(out)] == list(range(1, step))  # never the bad state
    from flax import nnx

    abstract = nnx.eval_shape(lambda: KimiLinearForCausalLM(work["cfg"], rngs=nnx.Rngs(0)))
    groups = {param_key(p): param_group(p) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    moved = {groups[k] for k in changed_keys(hf_params(work), flat_params(ck.step_folder(out, step - 1)))}
    assert moved == {"lm_head", "norms"}


# -------------------------------------------------------------------------------------------------- recursive
@pytest.mark.slow
def test_recursive_phase_a_trains_the_sidecar_and_keeps_the_base(runs, work):
    from kimi_jax.recursive import io
    from kimi_jax.recursive.config import RecursiveConfig
    from kimi_jax.recursive.sidecar import build_sidecar
    from kimi_jax.training import checkpoints as ck

    finished(runs, "rec_a")
    out = str(work["root"] / "rec_a")
    train = train_records(out)
    assert [r["step"] for r in train] == list(range(1, 31))
    for r in train:
        for name in ("total", "final_ce", "masked_ce", "halt", "length", "ponder", "stability", "grad_norm",
                     "expected_steps", "commit_rate", "avg_chunk_length"):
            assert r[name] is not None and np.isfinite(r[name]), (r["step"], name)
        assert len(r["step_accuracy"]) == 2
    assert np.mean([r["total"] for r in train[-5:]]) < np.mean([r["total"] for r in train[:5]]) - 0.3
    evals = eval_records(out)
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[-1]["loss/total"] < evals[0]["loss/total"]
    assert len(set(r["perplexity"] for r in evals)) == 1  # phase a: the clean path is the frozen base
    folder = ck.step_folder(out, 30)
    assert {"recursive_config.json", "sidecar", "params", "train_state"} <= set(os.listdir(folder))
    saved_rcfg = RecursiveConfig.from_json(os.path.join(folder, "recursive_config.json"))
    assert (saved_rcfg.phase, saved_rcfg.chunk_width, saved_rcfg.max_inner_steps) == ("a", 64, 2)
    # The base: bit-identical to the input model (and params/ hard-linked from it, not rewritten).
    assert not changed_keys(flat_params(work["orbax"]), flat_params(folder))
    meta = os.path.join("params", "_METADATA")
    assert os.stat(os.path.join(folder, meta)).st_ino == os.stat(os.path.join(work["orbax"], meta)).st_ino
    # The sidecar moved away from its zero-init surgery state, refine-cell outputs included.
    sidecar, _ = io.load_sidecar(folder, work["cfg"])
    fresh = io.sidecar_arrays(build_sidecar(work["cfg"], saved_rcfg))
    moved = changed_keys({k: np.asarray(v) for k, v in fresh.items()},
                         {k: np.asarray(v) for k, v in io.sidecar_arrays(sidecar).items()})
    assert "cells.b" in moved and "halt_head.w2" in moved


@pytest.mark.slow
def test_tensorboard_has_every_tag(runs, work):
    from kimi_jax.tb_events import read_scalars

    finished(runs, "rec_a")
    out = str(work["root"] / "rec_a")
    scalars = read_scalars(os.path.join(out, "logs"))
    for tag in TRAIN_TAGS:
        assert [s for s, _ in scalars[tag]] == list(range(1, 31)), tag
    for tag in ("evaluation/perplexity", "evaluation/loss/total", "evaluation/final_ce",
                "evaluation/step_accuracy/k1", "evaluation/step_accuracy/k2"):
        assert [s for s, _ in scalars[tag]] == [0, 15, 30], tag
    train = train_records(out)
    np.testing.assert_allclose([v for _, v in scalars["train/loss/total"]], [r["total"] for r in train], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["train/generation/avg_refine_steps"]],
                               [r["expected_steps"] for r in train], rtol=1e-6)
    for k in (1, 2):  # the halt head's mean probability at inner step k
        np.testing.assert_allclose([v for _, v in scalars[f"train/generation/halt_prob/k{k}"]],
                                   [r["halt_prob"][k - 1] for r in train], rtol=1e-6)
    finished(runs, "vanilla")
    vanilla = read_scalars(os.path.join(str(work["root"] / "vanilla"), "logs"))
    assert {"train/loss/total", "train/loss/final_ce", "train/lr", "evaluation/perplexity"} <= set(vanilla)


@pytest.mark.slow
def test_kill_and_resume_reproduce_the_uninterrupted_run(runs, work):
    from kimi_jax.training import checkpoints as ck
    from kimi_jax.tb_events import read_scalars

    finished(runs, "rec_a")
    info = runs["killed"].result()
    assert info["first_status"] == -signal.SIGKILL and 10 <= info["killed_at"] < 30
    assert info["second_status"] == 128 + signal.SIGTERM, info["second_err"][-3000:]
    assert "stopped by SIGTERM" in info["second_err"]
    assert info["third"].returncode == 0, info["third"].stderr[-3000:]
    assert "resuming from" in info["third"].stderr
    out, reference = info["out"], str(work["root"] / "rec_a")
    import re

    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", info["second_err"]).group(1))
    assert 17 <= stopped < 30
    steps = [s for s, _ in ck.list_checkpoints(out)]
    assert {10, stopped, 30} <= set(steps)  # the SIGTERM run saved the step it stopped at
    got, want = read_records(out), read_records(reference)
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    for a, b in zip(got, want):
        for key in b:
            if key in TIMING_FIELDS:
                continue
            if isinstance(b[key], (int, float, list)) and not isinstance(b[key], bool):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=0, err_msg=f"{b['type']} {b['step']} {key}")
            else:
                assert a[key] == b[key], (b["step"], key)
    scalars, reference_scalars = read_scalars(os.path.join(out, "logs")), read_scalars(os.path.join(reference, "logs"))
    assert [s for s, _ in scalars["train/loss/total"]] == list(range(1, 31))  # the killed run's tail is purged
    np.testing.assert_allclose([v for _, v in scalars["train/loss/total"]],
                               [v for _, v in reference_scalars["train/loss/total"]], rtol=1e-6)


@pytest.mark.slow
def test_recursive_checkpoint_generates(runs, work):
    finished(runs, "rec_a")
    result = runs["generate"].result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded the saved sidecar" in result.stderr
    with open(work["root"] / "gen.json") as f:
        out = json.load(f)
    assert out["use_recursive"] and out["recursive_config"]["phase"] == "a"
    assert out["samples"][0]["num_tokens"] >= 1


@pytest.mark.slow
def test_phase_b_trains_only_lora_and_the_sidecar(runs, work):
    from kimi_jax.recursive import io
    from kimi_jax.recursive.config import RecursiveConfig
    from kimi_jax.recursive.sidecar import build_sidecar
    from kimi_jax.training import checkpoints as ck

    finished(runs, "rec_b")
    out = str(work["root"] / "rec_b")
    assert [s for s, _ in ck.list_checkpoints(out)] == [2, 4]
    assert all(np.isfinite(r["total"]) for r in train_records(out))
    base = hf_params(work)
    for step in (2, 4):  # written from memory at step 2 (HF source), hard-linked from step 2 at step 4
        assert not changed_keys(base, flat_params(ck.step_folder(out, step)))
    meta = os.path.join("params", "_METADATA")
    assert os.stat(os.path.join(ck.step_folder(out, 4), meta)).st_ino == os.stat(
        os.path.join(ck.step_folder(out, 2), meta)).st_ino
    folder = ck.step_folder(out, 4)
    rcfg = RecursiveConfig.from_json(os.path.join(folder, "recursive_config.json"))
    sidecar, _ = io.load_sidecar(folder, work["cfg"], rcfg)
    fresh = {k: np.asarray(v) for k, v in io.sidecar_arrays(build_sidecar(work["cfg"], rcfg)).items()}
    moved = changed_keys(fresh, {k: np.asarray(v) for k, v in io.sidecar_arrays(sidecar).items()})
    assert any(k.startswith("lora.") for k in moved) and "cells.b" in moved


@pytest.mark.slow
def test_phase_c_trains_only_the_unfrozen_blocks(runs, work):
    from flax import nnx

    from kimi_jax.model import KimiLinearForCausalLM
    from kimi_jax.recursive import io
    from kimi_jax.recursive.config import RecursiveConfig
    from kimi_jax.training.recursive import unfrozen_rows
    from kimi_jax.training import checkpoints as ck

    finished(runs, "rec_c")
    out = str(work["root"] / "rec_c")
    train = train_records(out)
    assert all(np.isfinite(r["total"]) and np.isfinite(r["l2sp"]) for r in train)
    assert [s for s, _ in ck.list_checkpoints(out)] == [4]  # --save_interval 0: only the end
    folder = ck.step_folder(out, 4)
    rcfg = RecursiveConfig.from_json(os.path.join(folder, "recursive_config.json"))
    abstract = nnx.eval_shape(lambda: KimiLinearForCausalLM(work["cfg"], rngs=nnx.Rngs(0)))
    rows = unfrozen_rows(work["cfg"], rcfg, nnx.state(abstract))
    assert rows and all(".blocks." in k for k in rows)
    before, after = hf_params(work), flat_params(folder)
    moved = changed_keys(before, after)
    assert moved and moved <= set(rows)  # nothing outside the unfrozen block (routers, embeddings, ...) moved
    for key in moved:
        frozen_rows = ~rows[key]
        np.testing.assert_array_equal(before[key][frozen_rows], after[key][frozen_rows])
    assert not any(k.endswith(("ffn.router", "ffn.correction_bias")) for k in moved)
    assert io.has_sidecar(folder)


# ------------------------------------------------------------------------------------------------------ errors
def cli(*args) -> tuple[int, str, str]:
    from experiments.train import main

    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


ERROR_CASES = {
    "no model": ([], "--model_path (or --model_name) is required"),
    "missing model folder": (["--model_path", "/nonexistent/model"], "no such folder"),
    "unknown flag": (["--model_path", "{hf}", "--bogus"], "unrecognized arguments: --bogus"),
    "stage conflict": (["--model_path", "{hf}", "--stage", "vanilla", "--use_recursive"], "contradicts"),
    "train_groups in recursive": (["--model_path", "{hf}", "--use_recursive", "--train_groups", "ffn"],
                                  "--train_groups applies to the vanilla stage"),
    "batch vs grad_accum": (["--model_path", "{hf}", "--batch_size", 6, "--grad_accum", 4], "not divisible"),
    "negative lr": (["--model_path", "{hf}", "--lr", -1], "--lr must be a finite number > 0"),
    "linear schedule recursive": (["--model_path", "{hf}", "--use_recursive", "--schedule", "linear"],
                                  "warmup + cosine"),
    "grad_accum recursive": (["--model_path", "{hf}", "--use_recursive", "--grad_accum", 2], "--grad_accum"),
    "unknown group": (["--model_path", "{hf}", "--train_groups", "attention", "--quiet"],
                      "unknown group 'attention'"),
    "chunk width": (["--model_path", "{hf}", "--use_recursive", "--chunk_width", 100, "--quiet"],
                    "--chunk_width 100 with"),
    "seq_len too short": (["--model_path", "{hf}", "--use_recursive", "--recursive_config", "{rec_a}", "--seq_len",
                           64, "--quiet"], "--seq_len 64 is too short for one recursive window"),
    "phase conflict": (["--model_path", "{hf}", "--use_recursive", "--phase", "b", "--recursive_config", "{rec_a}",
                        "--quiet"], "--phase b contradicts"),
    "phase c without blocks": (["--model_path", "{hf}", "--use_recursive", "--phase", "c", "--quiet"],
                               "selects no layer"),
    "missing data": (["--model_path", "{hf}", "--data", "/nonexistent/data.txt", "--quiet"],
                     "/nonexistent/data.txt"),
    "too few rows": (["--model_path", "{hf}", "--data", "{data}", "--batch_size", 100000, "--quiet"],
                     "exceeds the dataset"),
    "resume without checkpoint": (["--model_path", "{hf}", "--data", "{data}", "--resume", "--quiet",
                                   "--output_dir", "{empty}"], "holds no complete checkpoint"),
    "bad mesh": (["--model_path", "{hf}", "--data", "{data}", "--mesh", "fsdp=3", "--quiet", "--seq_len", 128,
                  "--output_dir", "{empty}"], "--mesh"),
    "output inside the model": (["--model_path", "{hf}", "--data", "/nonexistent", "--output_dir", "{hf}/run"],
                                "--output_dir {hf}/run lies inside the input --model_path {hf}"),
    "log_dir is the model": (["--model_path", "{hf}", "--data", "/nonexistent", "--log_dir", "{hf}"],
                             "--log_dir {hf} is the input --model_path {hf}"),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_bad_flags_are_one_error_line(name, work, tmp_path):
    args, message = ERROR_CASES[name]
    fill = {"hf": work["hf"], "rec_a": work["configs"]["a"], "data": work["data"], "empty": str(tmp_path / "o")}
    args = [a.format(**fill) if isinstance(a, str) else a for a in args]
    if "--output_dir" not in args and args[:1] == ["--model_path"]:
        args += ["--output_dir", str(tmp_path / "o")]  # never the default ./checkpoints/... inside the repo
    message = message.format(**fill)
    rc, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert message in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "o")  # a run that cannot start leaves no folder (nor its lock file)
    assert not os.path.exists(os.path.join(work["hf"], "run"))


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused(runs, work):
    finished(runs, "vanilla")
    out = str(work["root"] / "vanilla")
    before = sorted(os.listdir(out))
    rc, _, err = cli(*vanilla_args(work, out)[:-len(["--output_dir", out])], "--output_dir", out, "--lr", 1e-3)
    lines = [line for line in err.strip().splitlines() if not line.startswith("notice:")]
    assert rc == 2 and len(lines) == 1 and "other settings (lr: 0.003 there, 0.001 now)" in lines[0], err
    assert sorted(os.listdir(out)) == before


def test_defaults_follow_the_evaluation_plan(tmp_path, monkeypatch):
    from experiments.train import build_parser
    from kimi_jax.training.run import resolve_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    s = resolve_settings(build_parser().parse_args(["--model_name", "m", "--log_dir", "./logs/vanilla_finetune"]))
    assert s.stage == "vanilla" and s.output_dir == str(tmp_path / "checkpoints" / "vanilla_finetune")
    assert s.log_dir == str(tmp_path / "logs" / "vanilla_finetune") and s.args.data == "demo"
    s = resolve_settings(build_parser().parse_args(["--model_path", "m", "--use_recursive", "--num_steps", "50"]))
    assert s.stage == "recursive" and s.output_dir == str(tmp_path / "checkpoints" / "recursive_finetune")
    assert s.log_dir == os.path.join(s.output_dir, "logs") and s.warmup_steps == 5 and s.schedule == "cosine"


@pytest.mark.slow
def test_finished_run_resumes_to_nothing_on_another_mesh(runs, work, tmp_path):
    """Resuming the finished single-device run on 8 devices restores every array into the new shardings and stops."""
    import shutil

    finished(runs, "vanilla")
    out = str(tmp_path / "vanilla")
    shutil.copytree(str(work["root"] / "vanilla"), out)
    rc, stdout, err = cli(*vanilla_args(work, out)[:-2], "--output_dir", out, "--quiet")
    assert rc == 0, err
    assert "resuming from" in err and "already at step 30 of --num_steps 30; nothing to train" in err
    assert [r["step"] for r in train_records(out)] == list(range(1, 31))


@pytest.mark.slow
def test_no_resume_deletes_nothing_when_the_run_cannot_start(runs, work, tmp_path):
    import shutil

    from kimi_jax.training import checkpoints as ck

    finished(runs, "vanilla")
    out = str(tmp_path / "vanilla")
    shutil.copytree(str(work["root"] / "vanilla"), out)
    rc, _, err = cli(*vanilla_args(work, out)[:-2], "--output_dir", out, "--no-resume", "--mesh", "fsdp=3")
    assert rc == 2 and "--mesh" in err.strip().splitlines()[-1]
    assert [s for s, _ in ck.list_checkpoints(out)] == [10, 20, 30]
    assert os.path.isfile(os.path.join(out, "metrics.jsonl"))


def test_every_flag_shows_its_default():
    from experiments.train import build_parser

    for action in build_parser()._actions:
        if not action.option_strings or action.nargs == 0 or action.dest == "help":  # flags without a value
            continue
        text = action.help or ""
        assert "see above" not in text, action.dest  # the explanations are in the epilog, below the flags
        assert "default" in text or "required" in text or action.dest == "model_name", (action.dest, text)


# ------------------------------------------------------------------------------------------- one run per folder
def outputs(out) -> dict:
    """{path: size} of every file of a run's output folder but its lock file (whose holder line comes and goes)."""
    return {os.path.relpath(os.path.join(root, name), out): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(out) for name in names if name != ".lock"}


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_and_deletes_nothing(runs, work, tmp_path):
    """Run A holds --output_dir (stopped after its first step, before any checkpoint); B with the same --output_dir is
    refused, naming A. After A is killed, C reports A's stale lock and refuses to delete A's outputs without
    --no-resume. Nothing of A's is touched."""
    from kimi_jax.training.logging import read_jsonl

    finished(runs, "vanilla")  # its programs are in the compile cache
    out = str(tmp_path / "shared")
    args = vanilla_args(work, out, "--eval_interval", 0, "--save_interval", 30)
    log = str(tmp_path / "a.log")
    with open(log, "w") as f:
        first = subprocess.Popen(command(*args), cwd=REPO, env=env_for(work, 1), stdout=f, stderr=f)
    try:
        metrics = os.path.join(out, "metrics.jsonl")
        wait_for(lambda: any(r.get("type") == "train" for r in read_jsonl(metrics)), first, log,
                 what="the first run's first step")
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, but writing nothing more
        before = outputs(out)
        with open(metrics, "rb") as f:
            records = f.read()
        rc, _, err = cli(*args, "--num_steps", 2)
        errors = [line for line in err.strip().splitlines() if not line.startswith("notice:")]
        assert rc == 2 and len(errors) == 1, err
        assert f"--output_dir {out} is in use by another run" in errors[0] and f"pid {first.pid}" in errors[0]
    finally:
        first.kill()
        first.wait(timeout=60)
    rc, _, err = cli(*args, "--num_steps", 2)
    notices = [line for line in err.strip().splitlines() if line.startswith("notice:")]
    errors = [line for line in err.strip().splitlines() if not line.startswith("notice:")]
    assert rc == 2 and len(errors) == 1, err
    assert any(f"pid {first.pid}, which no longer runs" in line for line in notices), err
    assert "holds an earlier run's outputs" in errors[0] and "metrics.jsonl" in errors[0]
    assert "pass --no-resume to start over" in errors[0]
    assert outputs(out) == before
    with open(metrics, "rb") as f:
        assert f.read() == records


def copy_of_vanilla_run(work, tmp_path, name="vanilla") -> str:
    import shutil

    out = str(tmp_path / name)
    shutil.copytree(str(work["root"] / "vanilla"), out)
    return out


@pytest.mark.slow
def test_resuming_never_rewrites_a_later_step_folder(runs, work, tmp_path):
    """step_30 without its training state (kept as a model folder) is not a checkpoint to resume from; resuming from
    step_20 would have to write step_30 again: refused before anything changes."""
    import shutil

    from kimi_jax.training import checkpoints as ck

    finished(runs, "vanilla")
    out = copy_of_vanilla_run(work, tmp_path)
    shutil.rmtree(os.path.join(out, "step_30", ck.TRAIN_STATE_DIR))
    before = sorted(os.listdir(os.path.join(out, "step_30")))
    rc, _, err = cli(*vanilla_args(work, out))
    errors = [line for line in err.strip().splitlines() if not line.startswith("notice:")]
    assert rc == 2 and len(errors) == 1, err
    assert "holds step_30, which is not a complete checkpoint, after step_20" in errors[0]
    assert sorted(os.listdir(os.path.join(out, "step_30"))) == before
    assert len(train_records(out)) == 30  # nothing truncated either


# ------------------------------------------------------------------------------------------ damaged checkpoints
def _damage_checkpoint(folder: str, how: str) -> str:
    from test_bad_model_folders import empty_folder, truncate_largest, zero_header_of_largest

    target, damage = {"truncated params file": ("params", truncate_largest),
                      "empty params folder": ("params", empty_folder),
                      "zeroed train_state file": ("train_state", zero_header_of_largest)}[how]
    damage(os.path.join(folder, target))
    return os.path.join(folder, target)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["empty params folder", "zeroed train_state file"])
def test_resuming_from_a_damaged_checkpoint_is_one_error_line(runs, work, tmp_path, how):
    finished(runs, "vanilla")
    out = copy_of_vanilla_run(work, tmp_path)
    damaged = _damage_checkpoint(os.path.join(out, "step_30"), how)
    rc, _, err = cli(*vanilla_args(work, out))
    errors = [line for line in err.strip().splitlines() if not line.startswith("notice:")]
    assert rc == 2 and len(errors) == 1, err
    assert errors[0].startswith(f"error: cannot resume from {out}/step_30: {damaged}"), errors[0]
    assert "pass --no-resume to start over" in errors[0]
    assert len(train_records(out)) == 30  # the logs are untouched


@pytest.mark.slow
def test_resuming_from_a_truncated_checkpoint_prints_no_traceback(runs, work, tmp_path):
    """A truncated data file fails one read of many that orbax runs at once; the others must not echo (as a
    subprocess: the echoes came from background threads, also after the error line)."""
    finished(runs, "vanilla")
    out = copy_of_vanilla_run(work, tmp_path)
    damaged = _damage_checkpoint(os.path.join(out, "step_30"), "truncated params file")
    result = run_cli(work, vanilla_args(work, out))
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("notice:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: cannot resume from {out}/step_30: {damaged}: array '"), errors[0]
    assert "truncated data" in errors[0]


# ------------------------------------------------------------------------------------------------- a full disk
FULL_DISK_SCRIPT = """
out="$DISK/out"
cp -r {vanilla} "$out" && rm -rf "$out/step_20" "$out/step_30" && echo step_10 > "$out/latest"
sums() {{ (cd "$out/step_10" && find . -type f | sort | xargs md5sum | md5sum); }}
echo "BEFORE $(sums)"
avail=$(df -k --output=avail "$DISK" | tail -1)
head -c $(( (avail - 256) * 1024 )) /dev/zero > "$DISK/filler" 2>/dev/null
{train} 2> {err} > /dev/null
echo "RC $?"
echo "AFTER $(sums)"
echo "LATEST $(cat "$out/latest")"
echo "LS $(ls -A "$out" | tr '\\n' ' ')"
echo "TMP $(find "$out" -name '.*tmp*' | tr '\\n' ' ')"
"""


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_nothing_partial(runs, work, tmp_path):
    """The vanilla run, resumed from step_10 on a nearly full disk: saving step_20 fails. One error line naming the
    checkpoint, exit 1, step_10 and `latest` untouched, no `.step_20.tmp` or temporary files left."""
    import shlex

    from conftest import run_on_small_disk

    finished(runs, "vanilla")
    disk = tmp_path / "disk"
    out = str(disk / "out")
    err = tmp_path / "stderr.txt"
    train = " ".join(shlex.quote(a) for a in command(*vanilla_args(work, out)))
    script = FULL_DISK_SCRIPT.format(vanilla=shlex.quote(str(work["root"] / "vanilla")), train=train,
                                     err=shlex.quote(str(err)))
    proc = run_on_small_disk(script, size="16m", mount_point=disk, env=env_for(work, 1), timeout=RUN_TIMEOUT)
    report = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    stderr = err.read_text()
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("notice:")]
    assert report["RC"] == "1" and len(errors) == 1, (proc.stdout, proc.stderr, stderr[-3000:])  # notices, one error
    assert errors[0].startswith(f"error: cannot write checkpoint step 20: no space left on device writing "
                                f"{out}/step_20"), errors[0]
    assert errors[0].endswith(f"the last good checkpoint is {out}/step_10")
    assert report["AFTER"] == report["BEFORE"] and report["LATEST"] == "step_10"
    assert report["LS"].split() == [".lock", "latest", "logs", "metrics.jsonl", "step_10"], report["LS"]
    assert report.get("TMP", "").strip() == ""
