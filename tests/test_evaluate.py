"""`python -m experiments.evaluate` end to end on a tiny model with a real Kimi-format tokenizer.

One session-scoped set of runs on the same model and settings (the held-out demo text, truncated; 2 GSM8K problems,
1-shot; 2 generation prompts; 16 new tokens; W = 64, K = 2): the baseline, the zero-init surgery, and a "trained"
checkpoint `run/step_7` whose sidecar has random non-zero refine-cell outputs (given as the training output folder
`run/`, so the newest step is found). All in one process, so the recursive programs compile once.
"""

from __future__ import annotations

import contextlib
import copy
import io as std_io
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import EVAL_NEW_TOKENS as N

from experiments import evaluate
from kimi_jax import model_folder
from kimi_jax.evaluation import results as eval_results, stage as eval_stage
from kimi_jax.evaluation.schema import SchemaError, validate_results
from kimi_jax.recursive import io
from kimi_jax.tb_events import read_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args) -> tuple[int, str, str]:
    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = evaluate.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def folders(evaluation_folders):
    """tests/conftest.py: the model, configs and trained-sidecar run shared with tests/test_compare.py."""
    return evaluation_folders


@pytest.fixture(scope="session")
def runs(evaluation_runs):
    return evaluation_runs


def tokens_of(result):
    return [s["tokens"] for s in result["generation"]["samples"]]


def completions_of(result):
    return [i["completion"] for i in result["reasoning"]["items"]]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_every_result_validates_and_records_its_identity(runs, folders):
    for stage in ("baseline", "after_surgery", "finetuned_recursive"):
        result = runs[stage]["json"]
        validate_results(result)
        meta = result["metadata"]
        assert meta["stage"] == stage and meta["seed"] == 1234 and meta["dtype"] == "float32"
        assert meta["command_line"].startswith("python -m experiments.evaluate --model_path ")
        assert meta["eval_data"]["spec"] == "demo" and meta["eval_data"]["truncated"]
        assert meta["eval_data"]["scored_tokens"] == result["core"]["num_tokens"] == 2000
        assert meta["hardware"]["backend"] == "cpu" and meta["model_format"] == "orbax"
        assert meta["wall_seconds"] > 0 and set(meta["section_seconds"]) >= {"core", "performance", "generation"}
        assert result["generation"]["num_samples"] == 2 and result["performance"]["status"] == "ok"
        assert ("recursive" in result) == meta["use_recursive"] == (stage != "baseline")
    base, surgery, trained = (runs[s]["json"]["metadata"] for s in ("baseline", "after_surgery",
                                                                     "finetuned_recursive"))
    assert base["step"] is None and base["recursive_config"] is None and base["sidecar"] is None
    assert surgery["step"] is None and surgery["sidecar"]["kind"] == "fresh" and surgery["sidecar"]["zero_init"]
    assert surgery["recursive_config"]["chunk_width"] == 64 and surgery["recursive_config"]["max_inner_steps"] == 2
    assert trained["step"] == 7 and trained["model_path"] == os.path.abspath(folders["step"])
    assert trained["sidecar"]["kind"] == "saved" and not trained["sidecar"]["zero_init"]
    assert trained["recursive_config"] == surgery["recursive_config"]
    assert "training output folder: evaluating its newest checkpoint" in runs["finetuned_recursive"]["stderr"]
    assert runs["finetuned_recursive"]["json"]["greedy_chunk_accuracy"] == runs["baseline"]["json"][
        "greedy_chunk_accuracy"]  # phase A: the base, hence its greedy continuation, is unchanged
    # same data, same settings, same tokens scored
    for key in ("eval_data", "settings"):
        assert base[key] == surgery[key] == trained[key]


@pytest.mark.slow
def test_surgery_preserves_the_baseline(runs):
    base, surgery = runs["baseline"]["json"], runs["after_surgery"]["json"]
    assert base["core"]["path"] == "baseline" and surgery["core"]["path"] == "clean"
    drop = lambda core: {k: v for k, v in core.items() if k not in ("path", "path_note")}
    assert drop(base["core"]) == drop(surgery["core"])  # bit-identical: the same program on the same weights
    assert base["core"]["perplexity"] > 1 and 0 <= base["core"]["token_accuracy"] <= 1
    assert tokens_of(base) == tokens_of(surgery)
    assert [s["text"] for s in base["generation"]["samples"]] == [s["text"] for s in surgery["generation"]["samples"]]
    if base["reasoning"]["status"] == "ok":
        assert completions_of(base) == completions_of(surgery)
        assert base["reasoning"]["fewshot_ids"] == surgery["reasoning"]["fewshot_ids"]
        assert base["reasoning"]["strict_match"] == surgery["reasoning"]["strict_match"]
    rec = surgery["recursive"]
    assert rec["diagnostic_matches_timed_run"] is True
    assert rec["metrics"]["avg_refine_steps"] == 1.0 and rec["metrics"]["fixed_point_rate"] == 1.0
    assert rec["metrics"]["stability_at_k"] == 1.0 and rec["metrics"]["mean_flip_rate"] == 0.0
    assert rec["metrics"]["num_chunks"] == sum(rec["metrics_by_source"][s]["num_chunks"] for s in rec["sources"])
    acc = rec["chunk_accuracy_at_k"]
    assert acc["status"] == "ok" and acc["num_chunks"] == 2 and acc["max_inner_steps"] == 2
    assert acc["agreement_with_baseline_greedy_at_k"] == [1.0, 1.0]
    assert acc["token_accuracy_at_k"] == [acc["baseline_greedy"]["token_accuracy"]] * 2
    # every stage reports the greedy continuation on the same chunks: identical for the same weights
    assert base["greedy_chunk_accuracy"] == surgery["greedy_chunk_accuracy"]
    assert base["greedy_chunk_accuracy"]["status"] == "ok" and base["greedy_chunk_accuracy"]["chunk_width"] == 64
    assert base["greedy_chunk_accuracy"]["token_accuracy"] == acc["baseline_greedy"]["token_accuracy"]
    assert "--chunk_width" not in runs["baseline"]["stderr"]  # meaningful without recursion: no "no effect" notice
    perf = surgery["performance"]
    assert perf["baseline"]["num_chunks"] is None and perf["recursive"]["num_chunks"] >= 1
    assert perf["baseline"]["prefill_tokens_per_sec"] == perf["recursive"]["prefill_tokens_per_sec"] > 0
    assert perf["recursive"]["new_tokens"] == perf["baseline"]["new_tokens"]  # the same tokens, generated twice
    assert base["performance"]["recursive"] is None


@pytest.mark.slow
def test_a_trained_sidecar_changes_the_recursive_generations_but_not_the_clean_path(runs):
    base, trained = runs["baseline"]["json"], runs["finetuned_recursive"]["json"]
    drop = lambda core: {k: v for k, v in core.items() if k not in ("path", "path_note")}
    assert drop(base["core"]) == drop(trained["core"])  # phase A leaves the base, hence the commit path, unchanged
    assert tokens_of(base) != tokens_of(trained)
    rec = trained["recursive"]
    assert rec["metrics"]["fixed_point_rate"] < 1.0  # the refined proposals leave the AR draft
    acc = rec["chunk_accuracy_at_k"]
    assert min(acc["agreement_with_baseline_greedy_at_k"]) < 1.0
    assert acc["baseline_greedy"] == runs["after_surgery"]["json"]["recursive"]["chunk_accuracy_at_k"][
        "baseline_greedy"]  # the comparison column is the same model's greedy continuation


@pytest.mark.slow
def test_reasoning_section(runs):
    result = runs["baseline"]["json"]["reasoning"]
    if result["status"] == "skipped":
        assert "GSM8K data unavailable" in result["reason"]
        pytest.skip(result["reason"])
    assert result["n"] == len(result["items"]) == 2 and result["num_fewshot"] == 1
    assert not set(result["fewshot_ids"]) & {i["id"] for i in result["items"]}
    assert result["stop_sequences"] == ["Question:", "</s>", "<|im_end|>"]
    assert result["reasoning_accuracy"] == result["strict_match"]
    for item in result["items"]:
        assert "Question:" not in item["completion"]
        assert 1 <= item["num_tokens"] <= N
        assert item["strict_correct"] == (item["strict_answer"] == item["gold"])


@pytest.mark.slow
def test_step_checkpoint_files_and_tensorboard(runs):
    out = runs["out"]
    assert read_json(out / "finetuned_recursive_step_7_results.json") == read_json(
        out / "finetuned_recursive_results.json")
    assert not os.path.exists(out / "baseline_step_0_results.json")
    names = sorted(os.listdir(out))
    assert names == sorted(["baseline_results.json", "after_surgery_results.json",
                            "finetuned_recursive_results.json", "finetuned_recursive_step_7_results.json"]), names
    scalars = read_scalars(str(runs["logs"] / "evaluation" / "finetuned_recursive"))
    tag = "evaluation/finetuned_recursive/"
    trained = runs["finetuned_recursive"]["json"]
    assert scalars[tag + "perplexity"] == [(7, pytest.approx(trained["core"]["perplexity"], rel=1e-6))]
    assert scalars[tag + "bits_per_byte"][0][0] == 7 and scalars[tag + "token_accuracy"][0][0] == 7
    assert scalars[tag + "avg_refine_steps"] == [(7, pytest.approx(trained["recursive"]["metrics"]
                                                                    ["avg_refine_steps"]))]
    assert tag + "commit_rate" in scalars
    if trained["reasoning"]["status"] == "ok":
        assert scalars[tag + "reasoning_accuracy"] == [(7, trained["reasoning"]["reasoning_accuracy"])]
    base = read_scalars(str(runs["logs"] / "evaluation" / "baseline"))
    assert base["evaluation/baseline/perplexity"][0][0] == 0 and "evaluation/baseline/avg_refine_steps" not in base
    assert "wrote " + str(out / "finetuned_recursive_step_7_results.json") in runs["finetuned_recursive"]["stdout"]


CORRUPTIONS = [
    (lambda r: r["core"].__setitem__("perplexity", "low"), "$.core.perplexity: expected number or null"),
    (lambda r: r["metadata"].pop("stage"), "$.metadata.stage: required field is missing"),
    (lambda r: r["metadata"].__setitem__("step", -1), "$.metadata.step: must be >= 0"),
    (lambda r: r["core"].__setitem__("token_accuracy", 1.5), "$.core.token_accuracy: must be <= 1"),
    (lambda r: r["core"].__setitem__("bits_per_byte", float("nan")), "$.core.bits_per_byte: expected number or null"),
    (lambda r: r.pop("recursive"), "$.recursive: required field is missing"),
    (lambda r: r["generation"]["samples"][0].pop("tokens"), "$.generation.samples[0].tokens: required field"),
    (lambda r: r["recursive"]["chunk_accuracy_at_k"]["token_accuracy_at_k"].append("x"),
     "$.recursive.chunk_accuracy_at_k.token_accuracy_at_k[2]: expected number"),
    (lambda r: r["core"].__setitem__("status", "skipped"), "$.core.reason: required field is missing"),
    (lambda r: r["metadata"].__setitem__("sidecar", None), "$.metadata.sidecar: expected object"),
    (lambda r: r.__setitem__("extra", 1), "$.extra: unexpected field"),
    (lambda r: r.pop("greedy_chunk_accuracy"), "$.greedy_chunk_accuracy: required field is missing"),
]


@pytest.mark.slow
@pytest.mark.parametrize("corrupt,message", CORRUPTIONS)
def test_a_corrupted_result_fails_validation_naming_the_field(runs, corrupt, message):
    result = copy.deepcopy(runs["after_surgery"]["json"])
    validate_results(result)
    corrupt(result)
    with pytest.raises(SchemaError) as e:
        validate_results(result)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.slow
def test_a_baseline_result_must_not_carry_recursive_fields(runs):
    result = copy.deepcopy(runs["baseline"]["json"])
    result["recursive"] = runs["after_surgery"]["json"]["recursive"]
    with pytest.raises(SchemaError, match=r"^\$: must not match"):
        validate_results(result)


def _stub_evaluation(monkeypatch, result):
    """Skip the (already tested) evaluation itself: the CLI's checks, writes, summary and messages stay real."""
    monkeypatch.setattr(evaluate, "evaluate_stage", lambda args, plan: copy.deepcopy(result))


@pytest.mark.slow
def test_tensorboard_default_folder_is_announced(runs, folders, tmp_path, monkeypatch):
    _stub_evaluation(monkeypatch, runs["baseline"]["json"])
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli("--model_path", folders["model"], "--stage", "baseline", "--output_dir", "results", "--quiet")
    assert rc == 0, err
    logdir = tmp_path / "logs" / "evaluation" / "baseline"
    assert (f"wrote TensorBoard scalars to {logdir} (the folder under --log_dir, default ./logs of the current "
            f"folder; --no_tensorboard writes none)") in out.splitlines()
    assert "evaluation/baseline/perplexity" in read_scalars(str(logdir))
    assert f"wrote {tmp_path / 'results' / 'baseline_results.json'}" in out.splitlines()
    rc, out, _ = cli("--model_path", folders["model"], "--stage", "baseline", "--output_dir", "r2", "--log_dir",
                     "tb", "--no_tensorboard", "--quiet")
    assert rc == 0 and "TensorBoard" not in out and not (tmp_path / "tb").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_after_the_results_file_was_replaced_says_so(runs, folders, tmp_path, monkeypatch,
                                                                 signal_name):
    """Ctrl-C (130) or SIGTERM (143) right after the results JSON was replaced: the message names what is on disk."""
    import signal

    _stub_evaluation(monkeypatch, runs["baseline"]["json"])
    out = tmp_path / "out"
    out.mkdir()
    path = out / "baseline_results.json"
    path.write_text('{"old": true}')
    real_write = eval_results.write_json_atomic

    def write_then_signal(target, data, **kwargs):
        real_write(target, data, **kwargs)
        os.kill(os.getpid(), getattr(signal, signal_name))

    monkeypatch.setattr(eval_results, "write_json_atomic", write_then_signal)
    rc, _, err = cli("--model_path", folders["model"], "--stage", "baseline", "--output_dir", out, "--log_dir",
                     tmp_path / "logs", "--quiet")
    name = "interrupted" if signal_name == "SIGINT" else "terminated (SIGTERM)"
    assert (rc, err.strip().splitlines()) == (130 if signal_name == "SIGINT" else 143, [f"error: {name}; wrote {path}"])
    assert read_json(path) == runs["baseline"]["json"] and not (tmp_path / "logs").exists()


def test_an_interrupt_before_any_write_says_nothing_was_written(folders, tmp_path, monkeypatch):
    def interrupted(args, plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_stage", interrupted)
    rc, _, err = cli("--model_path", folders["model"], "--stage", "baseline", "--output_dir", tmp_path / "out",
                     "--quiet")
    assert (rc, err.strip()) == (130, "error: interrupted; no results file was written")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_failed_write_is_one_line_naming_the_file(runs, folders, tmp_path, monkeypatch):
    import errno

    _stub_evaluation(monkeypatch, runs["finetuned_recursive"]["json"])
    real_write, calls = eval_results.write_json_atomic, []

    def full_disk_on_the_second_file(target, data, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(target, data, **kwargs)

    monkeypatch.setattr(eval_results, "write_json_atomic", full_disk_on_the_second_file)
    out = tmp_path / "out"
    rc, _, err = cli("--model_path", folders["run"], "--stage", "finetuned_recursive", "--output_dir", out,
                     "--quiet", "--no_tensorboard")
    latest, step_file = out / "finetuned_recursive_results.json", out / "finetuned_recursive_step_7_results.json"
    assert rc == 1 and err.strip().splitlines()[-1] == (
        f"error: no space left on device writing {step_file}; wrote {latest}; {step_file} was not written (an "
        f"earlier file there is unchanged)"), err
    assert sorted(os.listdir(out)) == [latest.name]


@pytest.mark.slow
def test_results_are_written_atomically(runs, tmp_path, monkeypatch):
    assert not [n for n in os.listdir(runs["out"]) if n.startswith(".")]  # no temporary files left behind
    path = str(tmp_path / "baseline_results.json")
    eval_results.write_json_atomic(path, {"old": True})

    def broken_fsync(fd):  # the new content is half on its way to the disk when the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        eval_results.write_json_atomic(path, {"new": True})
    monkeypatch.undo()
    assert read_json(path) == {"old": True} and os.listdir(tmp_path) == ["baseline_results.json"]


# ------------------------------------------------------------------------------------------------ helpers
def test_step_parsing_and_output_paths(tmp_path):
    assert eval_stage.checkpoint_step("/x/run/step_5000") == 5000
    assert eval_stage.checkpoint_step("/x/run/step_12/") == 12
    assert eval_stage.checkpoint_step(str(tmp_path)) is None
    (tmp_path / "kimi_jax.json").write_text(json.dumps({"training": {"step": 30}}))
    assert eval_stage.checkpoint_step(str(tmp_path)) == 30  # not a step_N name: the checkpoint's own record
    assert eval_stage.checkpoint_step("/x/step_5x") is None
    assert eval_results.output_paths("/o", "finetuned_recursive", 5000) == [
        "/o/finetuned_recursive_results.json", "/o/finetuned_recursive_step_5000_results.json"]
    assert eval_results.output_paths("/o", "baseline", None) == ["/o/baseline_results.json"]


def test_training_output_folder_resolves_to_its_newest_step(folders, tmp_path):
    run = tmp_path / "run"
    for step in (3, 12):
        shutil.copytree(folders["model"], run / f"step_{step}", ignore=shutil.ignore_patterns("params"))
        os.makedirs(run / f"step_{step}" / "params")
    os.makedirs(run / "step_40")  # not a model folder: ignored
    os.makedirs(run / ".step_50.tmp")
    folder, note = model_folder.resolve(str(run))
    assert folder == str(run / "step_12") and "newest checkpoint" in note
    assert model_folder.resolve(folders["model"]) == (folders["model"], None)
    with pytest.raises(model_folder.ModelFolderError, match="not a model folder"):
        model_folder.resolve(str(tmp_path / "run" / "step_40"))


def test_the_latest_file_keeps_a_later_step_of_the_same_run(tmp_path):
    path = tmp_path / "finetuned_recursive_results.json"
    later = {"metadata": {"model_path": "/ckpt/run/step_9", "step": 9}}
    path.write_text(json.dumps(later))
    mine = lambda step, run="run": {"metadata": {"model_path": f"/ckpt/{run}/step_{step}", "step": step}}
    assert eval_results.newer_step_exists(str(path), mine(7))
    assert not eval_results.newer_step_exists(str(path), mine(10))
    assert not eval_results.newer_step_exists(str(path), mine(7, run="other"))  # another run: the newest result wins
    assert not eval_results.newer_step_exists(str(tmp_path / "none.json"), mine(7))


# ------------------------------------------------------------------------------------------------ bad input
def _write(path, text):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _model_with_config(folders, tmp, **changes):
    """A copy of the test model's folder without its weights (config.json is read before them) whose config.json
    has `changes`; `changes` = {"config.json": "folder"} makes config.json a folder."""
    folder = tmp / "model"
    shutil.copytree(folders["model"], folder, ignore=shutil.ignore_patterns("params"))
    os.makedirs(folder / "params")
    if changes.pop("config.json", None) == "folder":
        os.remove(folder / "config.json")
        os.makedirs(folder / "config.json")
        return folder
    config = read_json(folder / "config.json")
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


ERROR_CASES = {
    "no stage": (lambda f, t: ["--model_path", f["model"]], "the following arguments are required: --stage"),
    "unknown stage": (lambda f, t: ["--model_path", f["model"], "--stage", "final"],
                      "argument --stage: invalid choice: 'final'"),
    "recursion at a baseline stage": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline",
                                                    "--use_recursive"], "--use_recursive contradicts --stage baseline"),
    "missing model folder": (lambda f, t: ["--model_path", t / "nope", "--stage", "baseline"], "no such folder"),
    "not a model folder": (lambda f, t: ["--model_path", t, "--stage", "baseline"], "not a model folder"),
    "zero seq_len": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--seq_len", "0"],
                     "--seq_len must be >= 1"),
    "stride above seq_len": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--seq_len", "64",
                                           "--stride", "65"], "--stride must be in 1..--seq_len (64), got 65"),
    "negative fewshot": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--num_fewshot", "-1"],
                         "--num_fewshot must be >= 0"),
    "zero max_samples": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--max_samples", "0"],
                         "--max_samples must be >= 1"),
    "max_new_tokens not an int": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline",
                                                "--max_new_tokens", "many"], "invalid int value: 'many'"),
    "unknown preset": (lambda f, t: ["--model_path", f["model"], "--stage", "after_surgery", "--recursive_config",
                                     "phase_z"], "phase_z: neither a recursive preset"),
    "chunk_width not a multiple of 64": (lambda f, t: ["--model_path", f["model"], "--stage", "after_surgery",
                                                       "--chunk_width", "100"], "overrides chunk_width=100"),
    "greedy chunk width not a multiple of 64": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline",
                                                              "--chunk_width", "96"],
                                                "field 'chunk_width' must be a positive multiple of 64"),
    "bad commit mode": (lambda f, t: ["--model_path", f["model"], "--stage", "after_surgery", "--commit_mode",
                                      "greedy"], "argument --commit_mode: invalid choice: 'greedy'"),
    "eval data missing": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--eval_data",
                                        t / "none.jsonl", "--skip_reasoning"], "none.jsonl: no such file or folder"),
    "eval data too small to hold out": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline",
                                                      "--eval_data", _write(t / "train.txt", "word\n"),
                                                      "--skip_reasoning"], "train.txt: too little text"),
    "eval data empty jsonl": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--eval_data",
                                            _write(t / "data.jsonl", ""), "--skip_reasoning"],
                              "data.jsonl: holds no records"),
    "eval data empty txt": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--eval_data",
                                          _write(t / "corpus.txt", "\n \n"), "--skip_reasoning"],
                            "corpus.txt: holds no records"),
    "eval data not UTF-8": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--eval_data",
                                          _write(t / "data.jsonl", b'{"text": "a b"}\n{"text": "caf\xe9"}\n'),
                                          "--skip_reasoning"], "data.jsonl, line 2: not UTF-8 text (byte 0xe9"),
    "eval data malformed line": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--eval_data",
                                               _write(t / "data.jsonl", '{"text": "a"}\n\n{"text": "b",}\n'),
                                               "--skip_reasoning"], "data.jsonl, line 3: not valid JSON"),
    "config.json field type": (lambda f, t: ["--model_path", _model_with_config(f, t, rms_norm_eps="abc"),
                                             "--stage", "baseline"],
                               "config.json: field 'rms_norm_eps' must be a finite number, got \"abc\""),
    "config.json is a folder": (lambda f, t: ["--model_path", _model_with_config(f, t, **{"config.json": "folder"}),
                                              "--stage", "baseline"], "config.json: is a folder, not a file"),
    "output_dir inside the model": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline",
                                                  "--output_dir", os.path.join(f["model"], "results")],
                                    "results lies inside the input --model_path"),
    "log_dir is the model": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--log_dir",
                                           f["model"]], "evaluation/baseline lies inside the input --model_path"),
    "output_dir is a file": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--output_dir",
                                           _write(t / "file", "x")], "exists and is not a folder"),
    "finetuned_recursive without a sidecar": (lambda f, t: ["--model_path", f["model"], "--stage",
                                                            "finetuned_recursive"], "needs a trained sidecar"),
    "after_surgery on a trained sidecar": (lambda f, t: ["--model_path", f["step"], "--stage", "after_surgery",
                                                         "--skip_reasoning", "--eval_data",
                                                         _write(t / "validation.txt", "Held-out text. " * 20)],
                                           "is trained (non-zero refine-cell or LoRA outputs)"),
    "too many shots": (lambda f, t: ["--model_path", f["model"], "--stage", "baseline", "--num_fewshot", "100",
                                     "--eval_data", _write(t / "validation.txt", "Held-out text. " * 20)],
                       "--num_fewshot must be < 100"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_error_line_and_exit_2(case, folders, tmp_path):
    make_args, expected = ERROR_CASES[case]
    args = [str(a) for a in make_args(folders, tmp_path)]
    out_dir = tmp_path / "out"
    if "--output_dir" not in args:
        args += ["--output_dir", str(out_dir)]
    if "--log_dir" not in args:
        args += ["--log_dir", str(tmp_path / "logs")]
    before = sorted(os.listdir(folders["model"]))
    rc, _, err = cli(*args, "--quiet")
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not out_dir.exists() and not (tmp_path / "logs").exists()  # created only when results are written
    assert sorted(os.listdir(folders["model"])) == before


def test_bad_input_from_the_command_line(folders):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--model_path", folders["model"],
                           "--stage", "finetuned_vanilla", "--use_recursive"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: --use_recursive contradicts --stage finetuned_vanilla (it evaluates the model without "
                     "recursion); use --stage after_surgery or finetuned_recursive"]
