"""Shared fixtures: random transformers reference models, saved once per session, and jitted JAX entry points.

Everything expensive here is built lazily and cached for the whole session, so test modules that use the same
reference config share one torch model, one checkpoint folder per (layout, shards) and one loaded JAX model.
The jitted functions are module-level, so their compile caches are shared across test modules too (XLA compiles
dominate the CPU runtime of this suite; reuse shapes where you can).
"""

from __future__ import annotations

import functools
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for experiments.demo
from experiments.demo import fast_compile_flags  # noqa: E402  (stdlib only: JAX is not imported yet)

# The suite's time is mostly XLA:CPU compiling hundreds of small programs, not running them: like the demo, compile
# them with LLVM's cheap pipeline (tests/test_recursive_window.py on 2 cores: 127 s -> 80 s). The maths is the same
# (no fast-math either way); only how well the machine code is optimised changes. Every child process a test starts
# gets the same flags (`child_env`). Eight fake CPU devices for the sharding tests; must be set before JAX creates
# its backend. Single-device tests simply use device 0.
DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = fast_compile_flags(os.environ.get("XLA_FLAGS", ""))
if DEVICE_COUNT_FLAG not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" --{DEVICE_COUNT_FLAG}=8"
# One persistent compilation cache for both pytest-xdist workers and every child process: test modules
# (jax.clear_caches() after each, see below) and command-line runs compile many of the same programs. It persists
# across runs (JAX keys entries by program, flags and versions), capped in size (JAX evicts the least recently used).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(__import__("tempfile").gettempdir(),
                                                                "kimi_jax_tests_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))


def child_env(**extra) -> dict:
    """The environment for a child process (a CLI run as a user runs it): this process's, with the fast-compile
    flags and the shared compilation cache but one real CPU device (no fake device count), plus `extra`."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if DEVICE_COUNT_FLAG not in f)
    env.update({k: str(v) for k, v in extra.items()})
    return env


sys.path.insert(0, os.path.dirname(__file__))  # tests/sharding_cases.py for workers and tests alike
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config import tiny
from kimi_jax.model import RunOptions

try:  # torch is in the `test` extra; test_config.py does not need it.
    import torch

    # On a 2-core CI box torch's OpenMP threads fight XLA's (and other pytest processes) and a tiny greedy
    # `generate` goes from ~0.15 s to ~15 s. One thread is plenty for the tiny references.
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None


# ---------------------------------------------------------------------------------------------- reference configs
# name -> zero-argument config factory. Keep this list short: every config costs XLA compiles.
REFERENCE_CONFIGS = {
    # 7 layers, MLA at 0-indexed 2, 3 (adjacent) and 6 (last); dense layer 0; top-2 routing, 1 shared expert.
    "irregular": lambda: tiny(num_hidden_layers=7, mla_layers=(2, 3, 6), first_k_dense=1),
    # Two dense layers, top-3 of 8 with grouped routing (2 groups, keep 1), 2 shared experts, q_lora_rank=12.
    "dense2": lambda: tiny(num_hidden_layers=4, mla_layers=(1, 3), first_k_dense=2, num_experts_per_token=3,
                           num_shared_experts=2, num_expert_group=2, topk_group=1, q_lora_rank=12),
    # Smallest useful model (KDA+MoE, MLA+MoE): cheap compiles for remat / grad / dispatch / generate edge cases.
    "small": lambda: tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0),
}

REFERENCE_SEEDS = {"irregular": 0, "dense2": 1, "small": 2}


class ReferenceCase:
    """A random transformers KimiLinearForCausalLM plus lazily written checkpoints and loaded JAX models."""

    def __init__(self, name: str, root):
        from kimi_jax.reference import build_reference

        self.name = name
        self.cfg = REFERENCE_CONFIGS[name]()
        self.seed = REFERENCE_SEEDS[name]
        self.ref = build_reference(self.cfg, self.seed)
        self.root = root
        self._folders: dict = {}
        self._models: dict = {}

    def folder(self, layout: str = "hub", num_shards: int = 1) -> str:
        """A checkpoint folder (shared: copy it before modifying anything in it)."""
        from kimi_jax.reference import save_reference

        key = (layout, num_shards)
        if key not in self._folders:
            self._folders[key] = save_reference(self.ref, str(self.root / f"{layout}-{num_shards}"), layout=layout,
                                                num_shards=num_shards)
        return self._folders[key]

    def model(self, layout: str = "hub", num_shards: int = 1, dtype=jnp.float32):
        import kimi_jax

        key = (layout, num_shards, jnp.dtype(dtype).name)
        if key not in self._models:
            self._models[key] = kimi_jax.from_pretrained(self.folder(layout, num_shards), dtype=dtype)
        return self._models[key]

    def ref_logits(self, ids, attention_mask=None) -> np.ndarray:
        from kimi_jax.reference import reference_logits

        return reference_logits(self.ref, np.asarray(ids), attention_mask)

    def random_ids(self, batch: int, length: int, seed: int = 0) -> np.ndarray:
        # Avoid the special ids 0..2 (pad/bos/eos) so prompts look like text.
        return np.random.default_rng(1000 + seed).integers(3, self.cfg.vocab_size, (batch, length)).astype(np.int64)


# ------------------------------------------------------------------------------------------- parallel scheduling
# The README's test command runs two pytest-xdist workers with `--dist loadfile` (each module stays in one process
# with its module fixtures and compiles). With --no-loadscope-reorder (setup.cfg) modules are handed out in
# collection order, so the longest go first and the short ones fill in at the end. (`--dist loadgroup` would let
# modules share a worker, but xdist 3.8 cannot rename pytest 9.2's node ids and falls back to per-test scheduling.)
LONGEST_FIRST = ("test_demo", "test_multiprocess", "test_compare", "test_evaluate", "test_train_cli",
                 "test_training_recursive", "test_recursive_chunked_generation", "test_generate_cli", "test_sharding",
                 "test_plan")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    module = lambda item: os.path.splitext(os.path.basename(str(item.fspath)))[0]
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: file order within and after


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. One pytest process compiles thousands of XLA:CPU
    programs; kept alive they hold ~6 GB and their code mappings (the kernel allows 65,530 per process), and a full
    clean-clone run died inside an XLA compile ~750 tests in while every module passed on its own."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def reference_factory(tmp_path_factory):
    """`get(name)` -> ReferenceCase, built once per session per name (see REFERENCE_CONFIGS)."""
    pytest.importorskip("torch")
    cases: dict = {}

    def get(name: str) -> ReferenceCase:
        if name not in cases:
            cases[name] = ReferenceCase(name, tmp_path_factory.mktemp(f"ref-{name}"))
        return cases[name]

    return get


def copy_checkpoint(src: str, dst) -> str:
    """Copy a (shared) checkpoint folder so a test can damage it."""
    dst = os.fspath(dst)
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def checkpoint_copy(tmp_path):
    """`copy(src_folder, name="ckpt")` -> path of a private copy under this test's tmp_path."""

    def copy(src: str, name: str = "ckpt") -> str:
        return copy_checkpoint(src, tmp_path / name)

    return copy


# ---------------------------------------------------------------------------------------------- jitted entry points
@functools.partial(nnx.jit, static_argnames=("opts",))
def _forward(model, ids, opts: RunOptions = RunOptions()):
    return model(ids, opts=opts)


@nnx.jit
def _forward_cached(model, ids, cache):
    return model(ids, cache=cache)


def forward(model, ids, opts: RunOptions = RunOptions()) -> np.ndarray:
    """Full forward (no cache) -> logits [B, T, V] as numpy fp32."""
    return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), opts=opts))


def forward_cached(model, ids, cache):
    """Forward through a decode cache -> (numpy logits, new cache)."""
    logits, cache = _forward_cached(model, jnp.asarray(ids, jnp.int32), cache)
    return np.asarray(logits), cache


@pytest.fixture(scope="session")
def jit_forward():
    return forward


@pytest.fixture(scope="session")
def jit_forward_cached():
    return forward_cached


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def flat_params(model) -> dict:
    """{path tuple: numpy array} over every nnx.Param of a model."""
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---------------------------------------------------------------------------------------------- evaluation runs
EVAL_SMALL_SIDECAR = dict(chunk_width=64, max_inner_steps=2, d_state=32, refine_rank=8, gate_hidden=16, mixer_heads=2)
EVAL_NEW_TOKENS = 16
EVAL_COMMON = ["--eval_data", "demo", "--max_eval_tokens", "2000", "--max_samples", "2", "--num_chunks", "2",
               "--num_fewshot", "1", "--max_new_tokens", str(EVAL_NEW_TOKENS), "--seq_len", "128", "--batch_size", "2",
               "--quiet"]


def _evaluate_cli(*args):
    import contextlib
    import io as std_io

    from experiments import evaluate

    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = evaluate.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _read_json(path):
    import json

    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def evaluation_folders(tmp_path_factory):
    """{"model": orbax folder + tokenizer, "rc": small after_surgery config, "run": training output folder whose
    step_7 holds a trained (non-zero) sidecar, "root": a scratch folder}. Shared by test_evaluate.py and
    test_compare.py."""
    from kimi_jax import orbax_model, tokenizer as tokenizer_mod
    from kimi_jax.model import KimiLinearForCausalLM
    from kimi_jax.recursive import io
    from kimi_jax.recursive.config import load_preset
    from kimi_jax.recursive.sidecar import build_sidecar
    from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus

    root = tmp_path_factory.mktemp("evaluate")
    model = str(root / "model")
    build_kimi_format_tokenizer([" ".join(local_corpus())[:100_000]], model, vocab_size=300)
    tok = tokenizer_mod.load(model)
    cfg = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=tok.vocab_size,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    orbax_model.save_model(model, KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(3)), source="test")
    rcfg = load_preset("after_surgery").replace(**EVAL_SMALL_SIDECAR)
    rc = rcfg.to_json(str(root / "rc.json"))
    step = str(root / "run" / "step_7")
    shutil.copytree(model, step)
    sidecar = build_sidecar(cfg, rcfg)
    rng = np.random.default_rng(0)
    sidecar.cells.b[...] = jnp.asarray(rng.normal(size=sidecar.cells.b.shape) * 0.5, jnp.float32)
    io.save_sidecar(step, sidecar, rcfg)
    return {"model": model, "rc": rc, "run": str(root / "run"), "step": step, "root": root}


@pytest.fixture(scope="session")
def evaluation_runs(evaluation_folders):
    """The baseline, the zero-init surgery and the trained-sidecar checkpoint, evaluated with the same settings."""
    folders = evaluation_folders
    root = folders["root"]
    out, logs = root / "out", root / "logs"
    common = EVAL_COMMON + ["--output_dir", out, "--log_dir", logs]
    results = {}
    for name, args in {
        "baseline": ["--model_path", folders["model"], "--stage", "baseline", "--chunk_width", "64"],
        "after_surgery": ["--model_path", folders["model"], "--stage", "after_surgery", "--use_recursive",
                          "--recursive_config", folders["rc"]],
        "finetuned_recursive": ["--model_path", folders["run"], "--stage", "finetuned_recursive"],
    }.items():
        rc, stdout, stderr = _evaluate_cli(*args, *common)
        assert rc == 0, stderr[-3000:]
        results[name] = {"json": _read_json(out / f"{name}_results.json"), "stdout": stdout, "stderr": stderr}
    results["out"], results["logs"] = out, logs
    return results




# ---------------------------------------------------------------------------------------------- a full disk
SMALL_DISK_SCRIPT = 'mount -t tmpfs -o size="$DISK_SIZE" kimi_jax_test_disk "$DISK" || exit 97; {script}'


def run_on_small_disk(script: str, *, size: str, mount_point, env=None, timeout: float = 600):
    """Run the bash `script` with a fresh tmpfs of `size` (e.g. "2m") mounted at `mount_point` (exported as $DISK), in
    a private user + mount namespace (`unshare -rm`: no privileges needed, nothing visible outside). The tmpfs and
    everything on it vanish when the script ends, so the script must inspect what it needs (print `ls -A`, sizes,
    ...) itself. Skips the test where the machine allows no such namespace. Returns the CompletedProcess."""
    import subprocess

    os.makedirs(mount_point, exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged mount namespace here (unshare -rm: {probe.stderr.decode().strip()})")
    full_env = dict(os.environ if env is None else env, DISK=str(mount_point), DISK_SIZE=size)
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", SMALL_DISK_SCRIPT.format(script=script)],
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 97, f"could not mount a tmpfs: {proc.stderr}"
    return proc
