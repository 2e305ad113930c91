"""The evaluation runner in process: `kimi_jax.evaluation` settings, stage plan, inputs, each results section
(core_metrics, performance, generation, reasoning, recursive_metrics), results files and `runner.evaluate_stage`.

The tiny model and Kimi-format tokenizer of tests/conftest.py's `evaluation_folders`, a small held-out file and
hand-written GSM8K problems. Every generation has one shape (batch 2, prompts padded to 64 tokens, 4 new tokens) and
every perplexity batch [2, 64], so each program compiles once for the module. `python -m experiments.evaluate` end
to end is tests/test_evaluate.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import time

import chex
import numpy as np
import pytest

from kimi_jax.decoding import left_pad
from kimi_jax.errors import EXIT_WRITE, UsageError
from kimi_jax.evaluation import generation_quality as gq
from kimi_jax.evaluation import gsm8k
from kimi_jax.evaluation import results as eval_results
from kimi_jax.evaluation.batched_generation import BatchedGenerator, strip_eos
from kimi_jax.evaluation.core_metrics import core_metrics
from kimi_jax.evaluation.generation import generation
from kimi_jax.evaluation.inputs import (NO_GENERATION_PROMPTS, PROMPT_ALIGN, HeldOut, load_held_out, load_inputs,
                                        padded_prompt_length)
from kimi_jax.evaluation.performance import (DECODE_END_TO_END, DECODE_FALLBACK, DECODE_MARGINAL, MAX_TIMING_ROUNDS,
                                             TIMING_REPEATS, add_peak_memory, performance)
from kimi_jax.evaluation.reasoning import reasoning
from kimi_jax.evaluation.recursive_metrics import chunk_accuracy, recursive_section
from kimi_jax.evaluation.runner import evaluate_stage
from kimi_jax.evaluation.schema import validate_results
from kimi_jax.evaluation.settings import EvalSettings
from kimi_jax.evaluation.stage import load_stage_model, plan_stage, resolve_model_path
from kimi_jax.safe_io import Writes
from kimi_jax.tb_events import read_scalars
from kimi_jax.tokenizer_fixtures import local_corpus

NEW_TOKENS = 4
SEQ_LEN = 64
BATCH = 2
CHUNK_WIDTH = 64
SHORT_TEXTS = ["The quick brown fox jumps.", "Hello world, a short line."]  # the generation prompts
PROBLEMS = [  # GSM8K-shaped items; the questions are short so that every prompt fits PROMPT_ALIGN tokens
    {"id": 0, "question": "What is 2 + 3?", "answer": "5", "gold": "5"},
    {"id": 1, "question": "What is 4 - 1?", "answer": "3", "gold": "3"},
    {"id": 2, "question": "What is 6 / 2?", "answer": "3", "gold": "3"},
]
GSM8K_SOURCE = {"source": "hand-written test problems", "origin": "tests/test_eval_runner.py", "cache_dir": None,
                "wheel_sha256": None, "fingerprint": gsm8k.items_fingerprint(PROBLEMS), "num_problems": len(PROBLEMS)}
COMMAND_LINE = "python -m experiments.evaluate --model_path tiny --stage "  # the schema's pattern


def settings_for(stage: str, data: str, **changes) -> EvalSettings:
    base = EvalSettings(stage=stage, eval_data=data, max_samples=2, max_new_tokens=NEW_TOKENS, num_fewshot=1,
                        seq_len=SEQ_LEN, batch_size=BATCH, num_chunks=2, progress=False,
                        chunk_width=None if stage in ("after_surgery", "finetuned_recursive") else CHUNK_WIDTH)
    return dataclasses.replace(base, **changes)


def fake_gsm8k():
    return list(PROBLEMS), dict(GSM8K_SOURCE)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A held-out .jsonl file: two short records (the generation prompts), then longer text for the chunk rows."""
    path = tmp_path_factory.mktemp("held_out") / "validation.jsonl"
    long_text = " ".join(local_corpus())[:1500]
    with open(path, "w") as f:
        for text in SHORT_TEXTS + [long_text]:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def make_plan(settings, folder, tmp, notices=None, log_dir=True):
    return plan_stage(settings, folder, model_path_given=folder, output_dir=str(tmp / "out"),
                      log_dir=str(tmp / "logs") if log_dir else None, command_line=COMMAND_LINE + settings.stage,
                      t_start=time.perf_counter(), notice=notices.append if notices is not None else lambda m: None)


@pytest.fixture(scope="module")
def baseline(evaluation_folders, data, tmp_path_factory):
    """(settings, plan, loaded stage, inputs, generator) of the baseline stage."""
    from kimi_jax import tokenizer as tokenizer_mod

    settings = settings_for("baseline", data)
    plan = make_plan(settings, evaluation_folders["model"], tmp_path_factory.mktemp("baseline"))
    inputs = load_inputs(tokenizer_mod.load(plan.folder), settings, lambda m: None, load_gsm8k=fake_gsm8k)
    loaded = load_stage_model(settings, plan, lambda m: None)
    generator = BatchedGenerator.for_stage(loaded, settings.batch_size, inputs.prompt_length, settings.max_new_tokens)
    return settings, plan, loaded, inputs, generator


# ------------------------------------------------------------------------------------------------ settings, plan
@pytest.mark.parametrize("changes,message", [
    ({"seq_len": 0}, "--seq_len must be >= 1, got 0"),
    ({"max_samples": -3}, "--max_samples must be >= 1, got -3"),
    ({"num_fewshot": -1}, "--num_fewshot must be >= 0"),
    ({"num_fewshot": gsm8k.NUM_PROBLEMS}, f"--num_fewshot must be < {gsm8k.NUM_PROBLEMS}"),
    ({"stride": 65, "seq_len": 64}, "--stride must be in 1..--seq_len (64), got 65"),
    ({"use_recursive": True}, "--use_recursive contradicts --stage baseline"),
    ({"eval_data": ""}, "--eval_data must be 'demo' or a path"),
    ({"stage": "final"}, "--stage must be one of"),
])
def test_settings_refuse_what_no_run_can_use(changes, message):
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        dataclasses.replace(EvalSettings(stage="baseline"), **changes).check()


def test_settings_defaults_and_stride():
    settings = EvalSettings(stage="after_surgery")
    settings.check()
    assert settings.recursive and not EvalSettings(stage="finetuned_vanilla").recursive
    assert settings.effective_stride == settings.seq_len // 2
    assert dataclasses.replace(settings, stride=7).effective_stride == 7
    assert dataclasses.replace(settings, seq_len=1).effective_stride == 1


def test_plan_settles_configs_and_creates_nothing(evaluation_folders, data, tmp_path):
    notices = []
    settings = settings_for("baseline", data, chunk_width=None, max_inner_steps=3, recursive_config="phase_a")
    plan = make_plan(settings, evaluation_folders["model"], tmp_path, notices)
    assert not plan.use_recursive and not plan.rcfg.recursive_enabled and plan.recursive_config is None
    assert plan.chunk_rcfg.chunk_width == 128 and plan.chunk_rcfg.max_inner_steps == 1  # the after_surgery preset's
    assert plan.step is None and plan.logdir == str(tmp_path / "logs" / "evaluation" / "baseline")
    assert notices == ["--max_inner_steps, --recursive_config have no effect at --stage baseline (it evaluates the "
                       "model without recursion)"]
    assert os.listdir(tmp_path) == []  # output folders are checked, not created

    plan = make_plan(settings_for("after_surgery", data, recursive_config=evaluation_folders["rc"]),
                     evaluation_folders["model"], tmp_path, log_dir=False)
    assert plan.use_recursive and plan.rcfg.recursive_enabled and plan.chunk_rcfg is plan.rcfg
    assert plan.rcfg.chunk_width == CHUNK_WIDTH and plan.logdir is None
    plan = make_plan(settings_for("finetuned_recursive", data), evaluation_folders["step"], tmp_path)
    assert plan.step == 7


def test_a_training_output_folder_means_its_newest_checkpoint(evaluation_folders, tmp_path):
    notices = []
    run = evaluation_folders["run"]
    assert resolve_model_path(run, notices.append) == evaluation_folders["step"]
    assert notices == [f"{run} is a training output folder: evaluating its newest checkpoint "
                       f"{evaluation_folders['step']}"]
    assert resolve_model_path(evaluation_folders["model"], notices.append) == evaluation_folders["model"]
    assert len(notices) == 1
    with pytest.raises(UsageError, match="no such folder"):
        resolve_model_path(str(tmp_path / "none"), notices.append)


@pytest.mark.parametrize("stage,folder,message", [
    ("finetuned_recursive", "model", "needs a trained sidecar"),
    ("after_surgery", "step", "is trained (non-zero refine-cell or LoRA outputs)"),
])
def test_plan_enforces_the_stage_sidecar_rule(evaluation_folders, data, tmp_path, stage, folder, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        make_plan(settings_for(stage, data), evaluation_folders[folder], tmp_path)


# ------------------------------------------------------------------------------------------------ inputs
def test_inputs(baseline):
    settings, _, loaded, inputs, _ = baseline
    tok = loaded.tokenizer
    held = inputs.held_out
    assert held.identity["num_documents"] == 3 and held.identity["split"] == "validation"
    assert held.scored_tokens == held.identity["num_tokens"] and not held.truncated
    assert inputs.generation_prompts == SHORT_TEXTS  # max_samples 2: the first two held-out documents
    assert inputs.generation_rows == [tok.encode(t) for t in SHORT_TEXTS]
    task = inputs.gsm8k
    assert task.skip_reason is None and task.source == GSM8K_SOURCE and len(task.exemplars) == 1
    assert len(task.problems) == 2 and not {e["id"] for e in task.exemplars} & {p["id"] for p in task.problems}
    prefix = gsm8k.fewshot_prefix(task.exemplars)
    assert task.rows == [tok.encode(prefix + gsm8k.prompt_for(p["question"])) for p in task.problems]
    longest = max(len(r) for r in inputs.generation_rows + task.rows)
    assert inputs.prompt_length % PROMPT_ALIGN == 0 and inputs.prompt_length - PROMPT_ALIGN < longest
    assert longest <= inputs.prompt_length == PROMPT_ALIGN  # the module's one generation shape
    with pytest.raises(UsageError, match="outside the model's vocabulary"):
        inputs.check_vocabulary(min(min(r) for r in inputs.generation_rows))
    inputs.check_vocabulary(loaded.model.config.vocab_size)


def test_held_out_truncation_and_skipped_gsm8k(baseline, data):
    from kimi_jax.evaluation.inputs import load_gsm8k_task

    tok = baseline[2].tokenizer
    full, cut = load_held_out(tok, data, None), load_held_out(tok, data, 20)
    assert cut.truncated and cut.scored_tokens <= 20 < full.scored_tokens
    assert cut.identity["num_tokens"] == full.scored_tokens  # the split's size is recorded, not the cut's
    notices = []

    def unavailable():
        raise gsm8k.GSM8KUnavailable("offline")

    task = load_gsm8k_task(tok, settings_for("baseline", data), notices.append, unavailable)
    assert task.skip_reason == "GSM8K data unavailable: offline" and task.rows == []
    assert notices == ["skipping GSM8K: GSM8K data unavailable: offline"]
    skipped = load_gsm8k_task(tok, settings_for("baseline", data, skip_reasoning=True), notices.append, unavailable)
    assert skipped.skip_reason == "--skip_reasoning" and len(notices) == 1
    assert padded_prompt_length([]) == PROMPT_ALIGN and padded_prompt_length([[1] * 65]) == 2 * PROMPT_ALIGN


def test_left_padded_batches():
    ids, mask = left_pad([[5, 6], [7], []], 4, 0)
    chex.assert_shape((ids, mask), (3, 4))
    chex.assert_type(ids, np.int32)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([[1, 2, 3]], 2, 0)
    gen = BatchedGenerator(None, [9], 1, batch_size=3, prompt_length=4, max_new_tokens=2, opts=None)
    ids, mask = gen.batch_inputs([[5, 6], [7]])  # the last batch is topped up with copies of its last row
    np.testing.assert_array_equal(ids, [[1, 1, 5, 6], [1, 1, 1, 7], [1, 1, 1, 7]])
    with pytest.raises(ValueError, match="1..3 rows"):
        gen.batch_inputs([])
    assert strip_eos([4, 9], [9]) == ([4], True) and strip_eos([9, 4], [9]) == ([9, 4], False)
    assert strip_eos([], [9]) == ([], False)


# ------------------------------------------------------------------------------------------------ sections
def _nll_by_full_forward(model, doc) -> np.ndarray:
    """-log p of every target of a document shorter than the window, from one forward of the whole document."""
    from conftest import forward

    logits = forward(model, doc.ids[None, :-1])[0].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -logp[np.arange(doc.num_targets), doc.ids[1:]]


def test_core_metrics_match_a_full_forward(baseline):
    settings, _, loaded, inputs, _ = baseline
    short_docs = [d for d in inputs.held_out.docs if d.num_targets < SEQ_LEN]
    held = HeldOut(records=[], identity={}, prefix_id=inputs.held_out.prefix_id, docs=short_docs, truncated=False)
    core = core_metrics(loaded, held, settings)
    nll = np.concatenate([_nll_by_full_forward(loaded.model, d) for d in short_docs])
    assert core["status"] == "ok" and core["path"] == "baseline" and core["num_tokens"] == nll.size
    np.testing.assert_allclose(core["nll_per_token"], nll.mean(), rtol=1e-4)
    assert core["perplexity"] == pytest.approx(math.exp(core["nll_per_token"]), rel=1e-9)
    assert core["prefix_token_id"] == held.prefix_id and core["truncated"] is False
    assert core_metrics(loaded, held, dataclasses.replace(settings, skip_perplexity=True)) == {
        "status": "skipped", "reason": "--skip_perplexity"}


def test_generation_performance_and_reasoning_sections(baseline):
    settings, _, loaded, inputs, generator = baseline
    tok, rows = loaded.tokenizer, inputs.generation_rows
    perf, timed = performance(generator, loaded, rows)
    run = generation(generator, loaded, inputs.generation_prompts, rows, settings)
    section = run.section
    assert section["status"] == "ok" and section["path"] == "baseline" and section["num_samples"] == len(rows)
    assert run.traces == [] and timed == run.tokens  # the timed run made the same tokens as the samples
    first = [int(np.argmax(_last_logits(loaded.model, r))) for r in rows]
    assert [t[0] for t in run.tokens] == first  # greedy: the argmax after each prompt
    for sample, tokens in zip(section["samples"], run.tokens):
        shown, ended = strip_eos(tokens, loaded.eos_ids)
        assert sample["tokens"] == tokens and sample["num_tokens"] == len(tokens) <= NEW_TOKENS
        assert sample["text"] == tok.decode(shown) and sample["ended_with_eos"] == ended
    stats = gq.generation_stats([strip_eos(t, loaded.eos_ids)[0] for t in run.tokens], [len(t) for t in run.tokens],
                                [strip_eos(t, loaded.eos_ids)[1] for t in run.tokens], NEW_TOKENS)
    assert {k: section[k] for k in stats} == stats

    assert perf["status"] == "ok" and perf["recursive"] is None
    base = perf["baseline"]
    assert base["batch_size"] == BATCH and base["prompt_length"] == inputs.prompt_length
    assert TIMING_REPEATS <= base["timing_repeats"] <= MAX_TIMING_ROUNDS and base["num_chunks"] is None
    assert base["decode_tokens_per_sec"] > 0 and base["decode_method"] in (DECODE_MARGINAL, DECODE_FALLBACK,
                                                                          DECODE_END_TO_END)
    assert base["prefill_tokens"] == BATCH * inputs.prompt_length and base["prefill_tokens_per_sec"] > 0
    assert base["new_tokens"] == sum(len(t) for t in timed)
    add_peak_memory(perf)
    assert perf["peak_memory_bytes"] > 0 and perf["peak_memory_source"]

    task = inputs.gsm8k
    section, traces = reasoning(generator, loaded, task, settings)
    assert section["status"] == "ok" and section["path"] == "baseline" and traces == []
    assert section["n"] == len(section["items"]) == len(task.problems) and section["data"] == GSM8K_SOURCE
    assert section["fewshot_ids"] == [e["id"] for e in task.exemplars] and section["max_new_tokens"] == NEW_TOKENS
    for item, problem in zip(section["items"], task.problems):
        assert item["id"] == problem["id"] and 1 <= item["num_tokens"] <= NEW_TOKENS
        assert item["strict_correct"] == (item["strict_answer"] == problem["answer"])
    assert section["strict_match"] == np.mean([i["strict_correct"] for i in section["items"]])
    skipped = dataclasses.replace(task, skip_reason="--skip_reasoning")
    assert reasoning(generator, loaded, skipped, settings) == ({"status": "skipped", "reason": "--skip_reasoning"},
                                                               [])
    assert performance(generator, loaded, []) == ({"status": "skipped", "reason": NO_GENERATION_PROMPTS}, None)
    assert generation(generator, loaded, [], [], settings).section["status"] == "skipped"


def _last_logits(model, row) -> np.ndarray:
    from conftest import forward

    return forward(model, np.asarray([row]))[0, -1]


def test_chunk_accuracy_skips_when_the_held_out_tokens_are_too_few(baseline):
    settings, plan, loaded, inputs, _ = baseline
    short = HeldOut(records=[], identity={}, prefix_id=0, docs=inputs.held_out.docs[:1], truncated=False)
    acc, greedy = chunk_accuracy(loaded, short, plan.chunk_rcfg, settings)
    assert acc == greedy and acc["status"] == "skipped"
    assert acc["reason"].endswith(f"fewer than one row of {2 * CHUNK_WIDTH + 1}")
    assert recursive_section(loaded, {}, None, acc) is None  # no recursion: no recursive section


# ------------------------------------------------------------------------------------------------ results
def test_results_files_scalars_and_summary(baseline, tmp_path):
    settings, plan, loaded, inputs, _ = baseline
    result = _toy_result(settings, plan, loaded, inputs)
    plan = dataclasses.replace(plan, output_dir=str(tmp_path / "out"), logdir=str(tmp_path / "tb"), step=3)
    writes = Writes()
    eval_results.write_results(result, plan, writes)
    files = [str(tmp_path / "out" / "baseline_results.json"), str(tmp_path / "out" / "baseline_step_3_results.json")]
    assert writes.done == files + [plan.logdir]
    for path in files:
        with open(path) as f:
            assert json.load(f) == result
    scalars = read_scalars(plan.logdir)
    assert scalars["evaluation/baseline/perplexity"] == [(3, pytest.approx(2.0))]
    assert set(scalars) == set(eval_results.scalars_of(result))
    lines = eval_results.summary_lines(result, writes.done, plan.logdir)
    assert lines[0] == f"stage baseline: {result['metadata']['model_path']}, baseline"
    assert "core: skipped" not in lines[1] and lines[1].startswith("core (baseline path): perplexity 2 ")
    assert lines[-2].startswith(f"wrote TensorBoard scalars to {plan.logdir}")


def test_a_failed_results_write_is_a_write_error(baseline, tmp_path, monkeypatch):
    settings, plan, loaded, inputs, _ = baseline
    result = _toy_result(settings, plan, loaded, inputs)
    plan = dataclasses.replace(plan, output_dir=str(tmp_path / "out"), logdir=None, step=None)

    def full_disk(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eval_results, "write_json_atomic", full_disk)
    with pytest.raises(eval_results.ResultsWriteError) as e:
        eval_results.write_results(result, plan, Writes())
    assert e.value.exit_code == EXIT_WRITE
    assert str(e.value) == (f"no space left on device writing {tmp_path / 'out' / 'baseline_results.json'}; "
                            f"{tmp_path / 'out' / 'baseline_results.json'} was not written (an earlier file there "
                            f"is unchanged)")


UNCERTAINTY_SUFFIXES = ("_stderr", "_ci95")
PER_UNIT_FIELDS = ("per_document", "per_window", "uncertainty_unit", "per_chunk_correct", "per_chunk_correct_at_k")


def _without_uncertainty(value):
    """A result as written before the uncertainty fields existed."""
    if isinstance(value, dict):
        return {k: _without_uncertainty(v) for k, v in value.items()
                if not k.endswith(UNCERTAINTY_SUFFIXES) and k not in PER_UNIT_FIELDS}
    if isinstance(value, list):
        return [_without_uncertainty(v) for v in value]
    return value


def test_sections_carry_standard_errors_and_old_results_still_validate(baseline):
    from kimi_jax.evaluation.uncertainty import mean_stderr

    settings, plan, loaded, inputs, generator = baseline
    core = core_metrics(loaded, inputs.held_out, settings)
    per = core["per_document"]
    assert len(per["nll_sum"]) == core["num_documents"] == 3 and sum(per["num_tokens"]) == core["num_tokens"]
    assert sum(per["num_correct"]) == core["num_correct"] and sum(per["num_bytes"]) == core["num_bytes"]
    np.testing.assert_allclose(sum(per["nll_sum"]), core["nll_sum"], rtol=1e-12)
    win = core["per_window"]
    assert len(win["nll_sum"]) == core["num_windows"] and sum(win["num_tokens"]) == core["num_tokens"]
    np.testing.assert_allclose(sum(win["nll_sum"]), core["nll_sum"], rtol=1e-12)
    for name in ("perplexity", "bits_per_byte", "token_accuracy", "nll_per_token"):
        low, high = core[f"{name}_ci95"]
        assert low <= core[name] <= high and core[f"{name}_stderr"] >= 0, name
    section, _ = reasoning(generator, loaded, inputs.gsm8k, settings)
    assert section["strict_match_stderr"] == mean_stderr([float(i["strict_correct"]) for i in section["items"]])
    run = generation(generator, loaded, inputs.generation_prompts, inputs.generation_rows, settings)
    assert run.section["length"]["mean_tokens_stderr"] == mean_stderr(
        [float(s["num_tokens"]) for s in run.section["samples"]])
    acc, greedy = chunk_accuracy(loaded, inputs.held_out, plan.chunk_rcfg, settings)
    assert sum(greedy["per_chunk_correct"]) == greedy["token_accuracy"] * greedy["num_chunks"] * CHUNK_WIDTH
    sections = {"core": core, "reasoning": section, "generation": run.section,
                "performance": {"status": "skipped", "reason": "not measured here"}, "greedy_chunk_accuracy": greedy,
                "recursive": None}
    result = eval_results.assemble_results(settings, plan, loaded, inputs, sections, {"core": 0.5})
    json.dumps(result, allow_nan=False)  # plain JSON numbers and lists
    old = _without_uncertainty(result)
    assert "per_window" not in old["core"] and "strict_match_stderr" not in old["reasoning"]
    validate_results(old)  # results written before the uncertainty fields still load
    broken = json.loads(json.dumps(result))
    broken["core"]["perplexity_ci95"] = [1.0]
    with pytest.raises(ValueError, match=re.escape("$.core.perplexity_ci95")):
        validate_results(broken)


def _toy_result(settings, plan, loaded, inputs) -> dict:
    """A valid result from hand-made sections (the writers and the summary do not care how they were measured)."""
    skipped = {"status": "skipped", "reason": "not measured here"}
    core = {"status": "ok", "path": "baseline", "path_note": "n/a", "perplexity": 2.0, "nll_per_token": math.log(2),
            "bits_per_byte": 0.5, "token_accuracy": 0.25, "nll_sum": 4 * math.log(2), "num_tokens": 4,
            "num_correct": 1, "num_bytes": 8, "num_documents": 1, "num_windows": 1, "seq_len": SEQ_LEN,
            "stride": SEQ_LEN // 2, "prefix_token_id": 0, "tokens_fingerprint": "0" * 64, "truncated": False}
    sections = {"core": core, "reasoning": skipped, "generation": skipped, "performance": skipped,
                "greedy_chunk_accuracy": skipped, "recursive": None}
    return eval_results.assemble_results(settings, plan, loaded, inputs, sections, {"core": 0.5})


# ------------------------------------------------------------------------------------------------ the runner
@pytest.mark.slow
def test_evaluate_stage_baseline(baseline, evaluation_folders, monkeypatch):
    settings, plan, loaded, inputs, _ = baseline
    monkeypatch.setattr(gsm8k, "load_gsm8k", fake_gsm8k)
    result = evaluate_stage(settings, plan, notice=lambda m: None)
    validate_results(result)
    meta = result["metadata"]
    assert meta["stage"] == "baseline" and meta["model_path"] == os.path.abspath(evaluation_folders["model"])
    assert set(meta["section_seconds"]) == {"core", "performance", "generation", "reasoning", "chunk_accuracy"}
    assert meta["settings"]["prompt_length"] == inputs.prompt_length and meta["eval_data"]["num_documents"] == 3
    assert "recursive" not in result and result["reasoning"]["n"] == 2
    gc = result["greedy_chunk_accuracy"]
    assert gc["status"] == "ok" and gc["chunk_width"] == CHUNK_WIDTH and 1 <= gc["num_chunks"] <= 2
    # the sections equal what each module gives on its own
    assert result["core"] == {**core_metrics(loaded, inputs.held_out, settings)}
    assert [s["tokens"] for s in result["generation"]["samples"]] == generation(
        BatchedGenerator.for_stage(loaded, BATCH, inputs.prompt_length, NEW_TOKENS), loaded,
        inputs.generation_prompts, inputs.generation_rows, settings).tokens


@pytest.mark.slow
def test_evaluate_stage_after_surgery_reproduces_the_baseline(baseline, evaluation_folders, tmp_path, monkeypatch):
    """The zero-init surgery: the recursive generator's samples are the baseline's greedy ones, one refine step per
    chunk, and the diagnostic runs reproduce the timed run."""
    base_settings, _, _, inputs, base_generator = baseline
    monkeypatch.setattr(gsm8k, "load_gsm8k", fake_gsm8k)
    settings = settings_for("after_surgery", base_settings.eval_data, recursive_config=evaluation_folders["rc"],
                            skip_perplexity=True)
    plan = make_plan(settings, evaluation_folders["model"], tmp_path)
    result = evaluate_stage(settings, plan, notice=lambda m: None)
    loaded = baseline[2]
    base_tokens = generation(base_generator, loaded, inputs.generation_prompts, inputs.generation_rows,
                             base_settings).tokens
    assert [s["tokens"] for s in result["generation"]["samples"]] == base_tokens
    rec = result["recursive"]
    assert rec["diagnostic_matches_timed_run"] is True and rec["sources"] == ["generation", "gsm8k"]
    assert rec["metrics"]["avg_refine_steps"] == 1.0 and rec["metrics"]["stability_at_k"] == 1.0
    assert rec["chunk_accuracy_at_k"]["agreement_with_baseline_greedy_at_k"] == [1.0, 1.0]
    assert result["metadata"]["sidecar"]["kind"] == "fresh" and result["metadata"]["sidecar"]["zero_init"]
    assert result["core"] == {"status": "skipped", "reason": "--skip_perplexity"}
    perf = result["performance"]
    assert set(perf["recursive"]) == set(perf["baseline"]) and perf["recursive"]["num_chunks"] >= 1
    assert perf["recursive"]["new_tokens"] == perf["baseline"]["new_tokens"]
