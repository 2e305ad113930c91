"""`python -m experiments.generate` end to end, and `kimi_jax.recursive.io.load_for_generation`.

A tiny model folder (2 layers, KDA + MLA, random weights) with a real Kimi-format tokenizer whose vocabulary is the
model's. Every in-process run uses the same prompt batch shape (B = 2, the same padded length, N new tokens), so the
baseline and recursive programs compile once for the module; N > W gives two chunks per sample.
"""

from __future__ import annotations

import contextlib
import io as std_io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.generate import main
from kimi_jax import orbax_model
from kimi_jax import tokenizer as tokenizer_mod
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.recursive import io
from kimi_jax.recursive.config import RecursiveConfigError, load_preset
from kimi_jax.recursive.sidecar import build_sidecar
from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The quick brown fox", "Hello world, this is a longer prompt"]
N = 70  # > W = 64: every sample commits two chunks
SMALL_SIDECAR = dict(chunk_width=64, max_inner_steps=2, d_state=32, refine_rank=8, gate_hidden=16, mixer_heads=2)
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json")


def tiny_config(tok, **overrides):
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, **{**ids, **overrides})


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """An orbax model folder (kimi_jax.json + params/ + config.json) with the tokenizer files. Shared: copy it."""
    folder = str(tmp_path_factory.mktemp("gen") / "model")
    build_kimi_format_tokenizer([" ".join(local_corpus())[:100_000]], folder, vocab_size=300)
    tok = tokenizer_mod.load(folder)
    orbax_model.save_model(folder, KimiLinearForCausalLM(tiny_config(tok), rngs=nnx.Rngs(3)), source="test")
    return folder


@pytest.fixture(scope="module")
def tok(model_folder):
    return tokenizer_mod.load(model_folder)


def cli(*args) -> tuple[int, str, str]:
    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def base_args(folder, *extra):
    args = ["--model_path", folder]
    for p in PROMPTS:
        args += ["--prompt", p]
    return args + ["--max_new_tokens", N, "--quiet", *extra]


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def tokens_of(result: dict) -> list[list[int]]:
    return [s["tokens"] for s in result["samples"]]


@pytest.fixture(scope="module")
def runs(model_folder, tmp_path_factory):
    """The baseline and `--use_recursive --chunk_width 64 --max_inner_steps 2` on the same prompts."""
    out = tmp_path_factory.mktemp("runs")
    base = cli(*base_args(model_folder, "--output_json", out / "base.json"))
    rec = cli(*base_args(model_folder, "--use_recursive", "--chunk_width", 64, "--max_inner_steps", 2,
                         "--output_json", out / "rec.json"))
    assert base[0] == 0, base
    assert rec[0] == 0, rec
    return {"base": (base, read_json(out / "base.json")), "rec": (rec, read_json(out / "rec.json"))}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_zero_init_surgery_with_verified_commits_reproduces_greedy(runs):
    base, rec = runs["base"][1], runs["rec"][1]
    assert not base["use_recursive"] and rec["use_recursive"]
    assert tokens_of(base) == tokens_of(rec)
    assert [s["text"] for s in base["samples"]] == [s["text"] for s in rec["samples"]]
    assert all(s["num_tokens"] == len(s["tokens"]) for s in rec["samples"])
    if all(s["num_tokens"] == N for s in rec["samples"]):  # no EOS: a full first chunk, then the 6-token rest
        assert [[c["length"] for c in t] for t in rec["traces"]] == [[64, N - 64]] * 2
        assert rec["metrics"]["avg_chunk_length"] == N / 2
    assert rec["metrics"]["avg_refine_steps"] == 1.0  # the zero-init proposal equals the AR draft: fixed point
    assert rec["metrics"]["fixed_point_rate"] == 1.0


def test_json_has_every_field(runs, model_folder, tok):
    for key, (_, result) in runs.items():
        assert set(result) >= {"model_path", "recursive_config", "use_recursive", "samples", "metrics", "traces",
                               "timing"}
        assert result["model_path"] == os.path.abspath(model_folder)
        assert len(result["samples"]) == len(PROMPTS) == len(result["traces"])
        for prompt, sample in zip(PROMPTS, result["samples"]):
            assert set(sample) == {"prompt", "prompt_tokens", "tokens", "text", "num_tokens"}
            assert sample["prompt"] == prompt and sample["prompt_tokens"] == tok.encode(prompt)
            assert 1 <= sample["num_tokens"] <= N
            shown = sample["tokens"][:-1] if sample["tokens"][-1] == tok.eos_token_id else sample["tokens"]
            assert sample["text"] == tok.decode(shown)
        timing = result["timing"]
        assert timing["seconds"] > 0 and timing["tokens_per_sec"] > 0
        assert timing["generated_tokens"] == sum(s["num_tokens"] for s in result["samples"])
        assert result["settings"]["model_format"] == "orbax" and result["settings"]["seed"] == 0
    base, rec = runs["base"][1], runs["rec"][1]
    assert base["recursive_config"]["recursive_enabled"] is False and base["metrics"] == {}
    assert base["traces"] == [[], []] and base["settings"]["sidecar"] is None
    cfg = rec["recursive_config"]
    assert (cfg["recursive_enabled"], cfg["chunk_width"], cfg["max_inner_steps"]) == (True, 64, 2)
    assert set(cfg) == set(load_preset("after_surgery").to_dict())
    assert rec["settings"]["sidecar"] == "fresh"
    assert set(rec["metrics"]) >= {"avg_refine_steps", "commit_rate", "avg_chunk_length", "stability_at_k",
                                   "mean_flip_rate"}
    assert rec["metrics"]["stability_at_k"] is None  # not diagnostic
    for sample, chunks in zip(rec["samples"], rec["traces"]):
        assert sum(c["length"] for c in chunks) == sample["num_tokens"]
        assert all(len(row) == 64 for c in chunks for row in c["proposals"])


def test_printed_output(runs):
    (_, out, err), result = runs["rec"]
    for sample in result["samples"]:
        assert repr(sample["prompt"]) in out and sample["text"] in out
    for name in ("avg_refine_steps", "commit_rate", "avg_chunk_length", "stability_at_k", "mean_flip_rate",
                 "tokens/s"):
        assert name in out
    assert "fresh zero-init sidecar" in err
    (_, base_out, _), _ = runs["base"]
    assert "baseline" in base_out and "tokens/s" in base_out and "avg_refine_steps" not in base_out


def test_diagnostic_reports_stability(runs, model_folder, tmp_path):
    rc, _, _ = cli(*base_args(model_folder, "--use_recursive", "--chunk_width", 64, "--max_inner_steps", 2,
                              "--diagnostic", "--output_json", tmp_path / "diag.json"))
    assert rc == 0
    diag = read_json(tmp_path / "diag.json")
    assert diag["metrics"]["stability_at_k"] == 1.0 and diag["metrics"]["mean_flip_rate"] == 0.0
    assert all(len(c["proposals"]) == 2 for t in diag["traces"] for c in t)  # always K steps
    assert tokens_of(diag) == tokens_of(runs["base"][1])


def test_prompts_files_and_batches(runs, model_folder, tmp_path, tok):
    """A .jsonl and a text file; three prompts in batches of two (the last topped up): same compiled shapes."""
    extra = "Short one"
    assert len(tok.encode(extra)) < len(tok.encode(PROMPTS[1]))  # the padded length stays the same
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n\n" for i, p in enumerate(PROMPTS + [extra])))
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(PROMPTS + ["", "   ", extra]) + "\n")
    expected = tokens_of(runs["base"][1])
    for path in (jsonl, text):
        rc, out, _ = cli("--model_path", model_folder, "--prompts_file", path, "--batch_size", 2, "--max_new_tokens",
                         N, "--quiet", "--output_json", tmp_path / "out.json")
        assert rc == 0
        result = read_json(tmp_path / "out.json")
        assert [s["prompt"] for s in result["samples"]] == PROMPTS + [extra]
        assert tokens_of(result)[:2] == expected
        assert result["settings"]["num_batches"] == 2 and result["settings"]["batch_size"] == 2
        assert "[3/3] 'Short one'" in out


def test_window_flags_without_recursion_say_so(runs, model_folder):
    rc, _, err = cli(*base_args(model_folder, "--chunk_width", 64, "--diagnostic"))
    assert rc == 0
    assert "notice: --chunk_width, --diagnostic have no effect without recursion (pass --use_recursive)" in err


@pytest.mark.slow
def test_trained_sidecar_with_baseline_verified_reproduces_greedy(runs, model_folder, tmp_path):
    """A saved sidecar with random non-zero weights (a "trained" checkpoint): its own recursive_config.json is used,
    the proposals differ from greedy, and baseline_verified still commits exactly the greedy tokens."""
    folder = shutil.copytree(model_folder, tmp_path / "trained")
    rcfg = load_preset("phase_a").replace(**SMALL_SIDECAR)
    sidecar = build_sidecar(orbax_model.load_model(folder).config, rcfg)
    rng = np.random.default_rng(0)
    nnx.update(sidecar, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, a.dtype),
                                     nnx.state(sidecar, nnx.Param)))
    io.save_sidecar(folder, sidecar, rcfg)
    rc, _, err = cli(*base_args(folder, "--use_recursive", "--commit_mode", "baseline_verified", "--output_json",
                                tmp_path / "bv.json"))
    assert rc == 0
    assert f"notice: loaded the saved sidecar from {os.path.join(folder, 'sidecar')}" in err
    result = read_json(tmp_path / "bv.json")
    assert result["settings"]["sidecar"] == "saved"
    assert result["recursive_config"] == rcfg.replace(commit_mode="baseline_verified").to_dict()
    assert tokens_of(result) == tokens_of(runs["base"][1])


def test_command_line_subprocess(runs, model_folder, tmp_path, tok):
    """The real command line, with the chat template."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "chat.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.generate", "--model_path", model_folder, "--prompt",
                           PROMPTS[0], "--chat", "--max_new_tokens", "5", "--output_json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = read_json(out)
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    assert chat.startswith("<|im_user|>user<|im_middle|>")
    assert result["samples"][0]["prompt"] == PROMPTS[0]
    assert result["samples"][0]["prompt_tokens"] == tok.encode(chat)
    assert result["settings"]["chat"] is True
    assert f"wrote {out}" in proc.stdout and "tokens/s" in proc.stdout


# ------------------------------------------------------------------------------------------------ bad input
def _write(path, text):
    path.write_text(text)
    return path


def _with_config(folder, tmp, **changes):
    """A copy of the model folder without its weights (config.json is read before them), config.json changed."""
    copy = tmp / "model"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("params"))
    os.makedirs(copy / "params")
    config = read_json(copy / "config.json")
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


ERROR_CASES = {
    "missing model folder": (lambda f, t: ["--model_path", t / "nope", "--prompt", "x"], "--model_path"),
    "not a model folder": (lambda f, t: ["--model_path", t, "--prompt", "x"], "not a model folder"),
    "unknown preset": (lambda f, t: ["--model_path", f, "--prompt", "x", "--recursive_config", "phase_z"],
                       "phase_z: neither a recursive preset"),
    "bad recursive config file": (lambda f, t: ["--model_path", f, "--prompt", "x", "--recursive_config",
                                                _write(t / "bad.json", '{"chunk_width": 100}')],
                                  "bad.json: field 'chunk_width' must be a positive multiple of 64"),
    "recursive config typo": (lambda f, t: ["--model_path", f, "--prompt", "x", "--recursive_config",
                                            _write(t / "typo.json", '{"chunk_widht": 64}')],
                              "unknown field 'chunk_widht' (did you mean 'chunk_width'?)"),
    "chunk_width not a multiple of 64": (lambda f, t: ["--model_path", f, "--prompt", "x", "--use_recursive",
                                                       "--chunk_width", "100"],
                                         "overrides chunk_width=100"),
    "max_inner_steps 0": (lambda f, t: ["--model_path", f, "--prompt", "x", "--use_recursive",
                                        "--max_inner_steps", "0"], "field 'max_inner_steps'"),
    "empty prompts file": (lambda f, t: ["--model_path", f, "--prompts_file", _write(t / "p.txt", "\n  \n")],
                           "no prompts"),
    "missing prompts file": (lambda f, t: ["--model_path", f, "--prompts_file", t / "none.txt"], "no such file"),
    "jsonl without prompt": (lambda f, t: ["--model_path", f, "--prompts_file",
                                           _write(t / "p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')],
                             "p.jsonl, line 2: expected an object with a \"prompt\" field"),
    "jsonl not json": (lambda f, t: ["--model_path", f, "--prompts_file", _write(t / "p.jsonl", "{oops\n")],
                       "line 1: not valid JSON"),
    "empty prompt": (lambda f, t: ["--model_path", f, "--prompt", " "], "--prompt: prompt 1 is empty"),
    "no prompt": (lambda f, t: ["--model_path", f], "one of the arguments --prompt --prompts_file is required"),
    "both prompt sources": (lambda f, t: ["--model_path", f, "--prompt", "x", "--prompts_file", "p"],
                            "not allowed with argument"),
    "bad commit mode": (lambda f, t: ["--model_path", f, "--prompt", "x", "--commit_mode", "greedy"],
                        "argument --commit_mode: invalid choice: 'greedy'"),
    "bad draft seed": (lambda f, t: ["--model_path", f, "--prompt", "x", "--draft_seed", "random"],
                       "argument --draft_seed: invalid choice"),
    "chunk_width not an int": (lambda f, t: ["--model_path", f, "--prompt", "x", "--chunk_width", "wide"],
                               "argument --chunk_width: invalid int value: 'wide'"),
    "unknown flag": (lambda f, t: ["--model_path", f, "--prompt", "x", "--temperature", "0.7"],
                     "unrecognized arguments: --temperature"),
    "no model path": (lambda f, t: ["--prompt", "x"], "the following arguments are required: --model_path"),
    "zero new tokens": (lambda f, t: ["--model_path", f, "--prompt", "x", "--max_new_tokens", "0"],
                        "--max_new_tokens must be >= 1"),
    "zero batch size": (lambda f, t: ["--model_path", f, "--prompt", "x", "--batch_size", "0"],
                        "--batch_size must be >= 1"),
    "output folder missing": (lambda f, t: ["--model_path", f, "--prompt", "x", "--output_json",
                                            t / "no" / "out.json"], "does not exist"),
    "output is a folder": (lambda f, t: ["--model_path", f, "--prompt", "x", "--output_json", t],
                           "is a folder"),
    "output is the prompts file": (lambda f, t: ["--model_path", f, "--prompts_file", _write(t / "p.txt", "x\n"),
                                                 "--output_json", t / "p.txt"], "is the input --prompts_file"),
    "output inside the model": (lambda f, t: ["--model_path", f, "--prompt", "x", "--output_json",
                                              os.path.join(f, "out.json")], "lies inside the input --model_path"),
    "config.json field type": (lambda f, t: ["--model_path", _with_config(f, t, hidden_size=[64]), "--prompt", "x"],
                               "config.json: field 'hidden_size' must be an integer, got [64] (a list)"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_error_line_and_exit_2(case, model_folder, tmp_path):
    make_args, expected = ERROR_CASES[case]
    rc, out, err = cli(*make_args(model_folder, tmp_path))
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".json") and p not in ("bad.json", "typo.json")]


def test_a_prompt_beyond_the_tokenizers_model_max_length_gets_a_notice(runs, model_folder, tmp_path, tok):
    folder = shutil.copytree(model_folder, tmp_path / "short", ignore=shutil.ignore_patterns("params"))
    os.symlink(os.path.join(model_folder, "params"), folder / "params")
    config = read_json(folder / "tokenizer_config.json")
    longest = max(len(tok.encode(p)) for p in PROMPTS)
    config["model_max_length"] = longest + N - 1  # the longest prompt (prompt 2) plus N is one token too long
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rc, _, err = cli(*base_args(folder))
    assert rc == 0, err  # generated anyway: a notice, not a refusal
    notices = [line for line in err.splitlines() if "model_max_length" in line]
    assert notices == [f"notice: 1 prompt(s) (2) plus --max_new_tokens {N} exceed the tokenizer's model_max_length "
                       f"{longest + N - 1} (prompt 2: {longest} + {N} tokens); the model was not trained on longer "
                       f"contexts, so the continuation may degrade; generating anyway"], err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_after_output_json_was_replaced_says_so(runs, model_folder, tmp_path, monkeypatch,
                                                             signal_name):
    import signal

    from kimi_jax import safe_io

    out = tmp_path / "out.json"
    out.write_text('{"old": true}')
    real_write = safe_io.write_json_atomic

    def write_then_signal(path, data, **kwargs):
        real_write(path, data, **kwargs)
        os.kill(os.getpid(), getattr(signal, signal_name))

    monkeypatch.setattr(safe_io, "write_json_atomic", write_then_signal)
    rc, _, err = cli(*base_args(model_folder, "--output_json", out))
    name = "interrupted" if signal_name == "SIGINT" else "terminated (SIGTERM)"
    assert rc == (130 if signal_name == "SIGINT" else 143)
    assert err.strip().splitlines()[-1] == f"error: {name}; wrote {out}", err
    assert tokens_of(read_json(out)) == tokens_of(runs["base"][1])


def test_bad_input_from_the_command_line(model_folder):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "experiments.generate", "--model_path", model_folder, "--prompt",
                           "x", "--use_recursive", "--chunk_width", "100"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: overrides chunk_width=100") and "multiple of 64" in lines[0]


# ------------------------------------------------------------------------------------------ load_for_generation
def small_trained(folder, **changes):
    rcfg = load_preset("after_surgery").replace(**{**SMALL_SIDECAR, **changes})
    sidecar = build_sidecar(orbax_model.load_model(folder).config, rcfg)
    sidecar.cells.b[...] = jnp.full(sidecar.cells.b.shape, 0.25, jnp.float32)
    io.save_sidecar(folder, sidecar, rcfg)
    return sidecar, rcfg


def test_load_for_generation_config_priority_and_sidecar_choice(model_folder, tmp_path):
    notices: list[str] = []
    info: dict = {}
    model, sidecar, rcfg, tok = io.load_for_generation(model_folder, notice=notices.append, info=info)
    assert isinstance(model, KimiLinearForCausalLM) and tok.vocab_size == model.config.vocab_size
    assert rcfg == load_preset("after_surgery") and info["sidecar"] == "fresh" and info["model_format"] == "orbax"
    assert np.all(np.asarray(sidecar.cells.b[...]) == 0)  # the surgery
    assert len(notices) == 1 and "no saved sidecar" in notices[0]

    folder = shutil.copytree(model_folder, tmp_path / "trained")
    saved, saved_rcfg = small_trained(folder)
    notices.clear()
    _, sidecar, rcfg, _ = io.load_for_generation(folder, notice=notices.append, info=info)
    assert rcfg == saved_rcfg and info["sidecar"] == "saved"  # the folder's own config comes second
    np.testing.assert_array_equal(np.asarray(sidecar.cells.b[...]), np.asarray(saved.cells.b[...]))
    assert "loaded the saved sidecar" in notices[0]

    # Overrides that keep the shapes keep the saved sidecar; ones that change them fall back to the surgery.
    _, sidecar, rcfg, _ = io.load_for_generation(folder, overrides={"commit_mode": "learned", "seed": "leftover"},
                                                 notice=None, info=info)
    assert (rcfg.commit_mode, rcfg.seed, info["sidecar"]) == ("learned", "leftover", "saved")
    notices.clear()
    # K is not a shape: a sidecar trained with K = 2 runs with K = 3 (the step index is a sinusoidal feature).
    _, sidecar, rcfg, _ = io.load_for_generation(folder, overrides={"max_inner_steps": 3}, notice=None, info=info)
    assert rcfg.max_inner_steps == 3 and info["sidecar"] == "saved"
    _, sidecar, rcfg, _ = io.load_for_generation(folder, overrides={"chunk_width": 128}, notice=notices.append,
                                                 info=info)
    assert rcfg.chunk_width == 128 and info["sidecar"] == "fresh"
    assert np.all(np.asarray(sidecar.cells.b[...]) == 0)
    assert "does not fit" in notices[0] and "chunk_width 64 saved vs 128 requested" in notices[0]
    # An explicit config comes first.
    _, sidecar, rcfg, _ = io.load_for_generation(folder, recursive_config="after_surgery", notice=notices.append,
                                                 info=info)
    assert rcfg == load_preset("after_surgery") and info["sidecar"] == "fresh"
    assert "chunk_width 64 saved vs 128 requested" in notices[-1]
    path = load_preset("after_surgery").replace(**SMALL_SIDECAR, commit_mode="learned").to_json(tmp_path / "r.json")
    _, sidecar, rcfg, _ = io.load_for_generation(folder, recursive_config=path, notice=None, info=info)
    assert rcfg.commit_mode == "learned" and info["sidecar"] == "saved" and info["recursive_config_source"] == path
    # Recursion off: no sidecar at all.
    _, sidecar, rcfg, _ = io.load_for_generation(folder, overrides={"recursive_enabled": False}, notice=None,
                                                 info=info)
    assert sidecar is None and not rcfg.recursive_enabled and info["sidecar"] is None
    with pytest.raises(RecursiveConfigError, match=r"^overrides chunk_width=96: .*multiple of 64"):
        io.load_for_generation(folder, overrides={"chunk_width": 96}, notice=None)
    with pytest.raises(RecursiveConfigError, match="unknown field 'chunk'"):
        io.load_for_generation(folder, overrides={"chunk": 64}, notice=None)


def test_load_for_generation_bad_folders(model_folder, tmp_path):
    with pytest.raises(io.LoadError, match="no such model folder"):
        io.load_for_generation(tmp_path / "missing")
    with pytest.raises(io.LoadError, match="not a model folder"):
        io.load_for_generation(tmp_path)
    # A tokenizer with more ids than the model's vocabulary belongs to another model.
    small = str(tmp_path / "small")
    shutil.copytree(model_folder, small, ignore=shutil.ignore_patterns("params", "kimi_jax.json", "config.json"))
    tok = tokenizer_mod.load(small)
    cfg = tiny_config(tok, vocab_size=tok.vocab_size - 1, pad_token_id=0)
    orbax_model.save_model(small, KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(io.LoadError, match=f"the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size "
                                           f"is {tok.vocab_size - 1}"):
        io.load_for_generation(small, notice=None)


def test_hf_folder(runs, model_folder, tmp_path):
    """An HF folder (transformers' random model, hub names): loads, and the surgery reproduces greedy there too."""
    pytest.importorskip("torch")
    from kimi_jax.reference import build_reference, save_reference

    tok = tokenizer_mod.load(model_folder)
    folder = save_reference(build_reference(tiny_config(tok), seed=4), str(tmp_path / "hf"))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(model_folder, name), folder)
    info: dict = {}
    model, _, _, _ = io.load_for_generation(folder, overrides={"recursive_enabled": False}, notice=None, info=info)
    assert info["model_format"] == "hf" and model.config.vocab_size == tok.vocab_size
    rc, _, _ = cli(*base_args(folder, "--output_json", tmp_path / "b.json"))
    assert rc == 0
    rc, _, _ = cli(*base_args(folder, "--use_recursive", "--chunk_width", 64, "--max_inner_steps", 2,
                              "--output_json", tmp_path / "r.json"))
    assert rc == 0
    base, rec = read_json(tmp_path / "b.json"), read_json(tmp_path / "r.json")
    assert base["settings"]["model_format"] == "hf"
    assert tokens_of(base) == tokens_of(rec)
    assert tokens_of(base) != tokens_of(runs["base"][1])  # other weights, other tokens


def test_kda_impl_reaches_the_model_and_keeps_the_tokens(runs, model_folder, monkeypatch, tmp_path):
    """`--kda_impl pallas_gpu` (interpret mode here) is what the KDA layers run, and greedy tokens equal the default's."""
    from kimi_jax.layers import kda as kda_layer

    seen = []
    real = kda_layer.resolve_kda_impl
    monkeypatch.setattr(kda_layer, "resolve_kda_impl", lambda impl, platform=None: seen.append(impl) or real(
        impl, platform))
    rc, out, err = cli(*base_args(model_folder, "--kda_impl", "pallas_gpu", "--output_json", tmp_path / "k.json"))
    assert rc == 0, err
    assert seen and set(seen) == {"pallas_gpu"}
    assert tokens_of(read_json(tmp_path / "k.json")) == tokens_of(runs["base"][1])
