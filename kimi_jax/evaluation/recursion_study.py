"""The recursion study's analysis (`python -m experiments.demo --study` runs the study and calls these).

The study asks whether recursive refinement (phase a) helps a model that has learned something, at the compute of a
plain fine-tune, and answers with paired intervals (`kimi_jax.evaluation.verdicts`):

* `equal_compute_steps`: the vanilla fine-tune's steps that spend the analytic model FLOPs of the recursive run
  (`kimi_jax.flops`: per step, vanilla = forward x 3; phase a = one clean forward + K window passes);
* `unigram_reference`: the held-out perplexity of add-one unigram statistics of the training split
  (`kimi_jax.evaluation.unigram`), scored in the same windows as a stage so that the pretrained baseline pairs with
  it window by window: "clearly better than unigram statistics" is a "yes" of `verdicts.compare_perplexity` from
  the unigram result to the baseline;
* `training_trajectory`: whether the recursive training metrics moved: the first and last tenth of the train steps
  (mean and standard error over steps) of commit rate, expected refine steps, chunk length, the halt head's
  probability per inner step and the training batches' accuracy per step, and the held-out step accuracy@k at every
  evaluation;
* `chunk_accuracy_by_step`: chunk accuracy@k for k = 1..K of the recursive stage against the vanilla stage's greedy
  chunks and against its own (the baseline's) greedy chunks, paired chunk by chunk;
* `study_report`: the Markdown report and its JSON.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kimi_jax.evaluation import uncertainty as u
from kimi_jax.evaluation.verdicts import PairedComparison, compare_chunk_accuracy

TRAJECTORY_SHARE = 0.1  # the first and last tenth of the train steps are compared
TRAIN_SCALARS = (("commit_rate", "commit rate"), ("expected_steps", "avg refine steps (expected)"),
                 ("avg_chunk_length", "avg chunk length (expected)"))
TRAIN_PER_STEP = (("halt_prob", "halt probability"), ("step_accuracy", "training accuracy"))

__all__ = ["TRAJECTORY_SHARE", "chunk_accuracy_by_step", "equal_compute_steps", "study_report",
           "training_trajectory", "unigram_reference"]


def equal_compute_steps(cfg, rcfg, *, batch_size: int, seq_len: int, recursive_steps: int, remat: bool) -> dict:
    """The analytic FLOPs per step of the vanilla and the recursive (phase a) step for `cfg` at `batch_size` x
    `seq_len`, and the vanilla steps (rounded) that spend the recursive run's total."""
    from kimi_jax.flops import analytic_flops_per_token, recursive_flops_per_token
    from kimi_jax.recursive.objective import num_windows

    tokens = batch_size * seq_len
    flops = analytic_flops_per_token(cfg, seq_len)
    windows = num_windows(seq_len, rcfg.chunk_width, cfg.kda_chunk_size)
    rec = recursive_flops_per_token(flops, rcfg, windows, seq_len, remat)
    vanilla_step, recursive_step = flops["train"] * tokens, rec["train"] * tokens
    steps = max(1, round(recursive_steps * recursive_step / vanilla_step))
    return {"vanilla_flops_per_step": vanilla_step, "recursive_flops_per_step": recursive_step,
            "recursive_steps": int(recursive_steps), "vanilla_steps": int(steps),
            "recursive_flops": recursive_step * recursive_steps, "vanilla_flops": vanilla_step * steps,
            "windows_per_row": int(windows), "remat": bool(remat)}


def unigram_reference(model_dir: str, eval_data: str, *, seq_len: int, stride: int, max_eval_tokens: int | None,
                      batch_size: int = 64, alpha: float = 1.0) -> dict:
    """A results-like ``{"core": ...}`` of add-`alpha` unigram statistics of the training split of `eval_data`
    (``demo``: the demo corpus), counted with the tokenizer of `model_dir` over the model's vocabulary and scored on
    the held-out split exactly as `experiments.evaluate` scores a stage (same documents, prefix token and windows)."""
    from kimi_jax import tokenizer as tokenizer_mod
    from kimi_jax.config import KimiLinearConfig
    from kimi_jax.data import Record, demo_corpus, load_documents
    from kimi_jax.data.pipeline import tokenize_record
    from kimi_jax.evaluation.inputs import load_held_out
    from kimi_jax.evaluation.perplexity import evaluate_perplexity, tokens_fingerprint
    from kimi_jax.evaluation.unigram import fit_unigram, unigram_scorer

    tok = tokenizer_mod.load(model_dir)
    vocab = KimiLinearConfig.from_pretrained(model_dir).vocab_size
    if eval_data == "demo":
        train = [Record(text=d.text, source=d.source) for d in demo_corpus()["train"]]
    else:
        train = load_documents(eval_data, split="train")

    def counted():
        for record in train:
            ids, mask = tokenize_record(tok, record, chat=False)
            yield np.asarray(ids, np.int64)[np.asarray(mask, bool)]

    log_probs = fit_unigram(counted(), vocab, alpha=alpha)
    held = load_held_out(tok, eval_data, max_eval_tokens)
    core = evaluate_perplexity(held.docs, unigram_scorer(log_probs), seq_len=seq_len, stride=stride,
                               batch_size=batch_size, pad_id=0)
    core.update(status="ok", tokens_fingerprint=tokens_fingerprint(held.docs), smoothing=alpha)
    return {"metadata": {"stage": "unigram", "model_path": model_dir}, "core": core}


def _summary(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "stderr": u.mean_stderr(values), "n": len(values)}


def training_trajectory(metrics_path: str, share: float = TRAJECTORY_SHARE) -> dict:
    """The recursive run's metrics at its start and end, from its metrics.jsonl (train and eval records)."""
    from kimi_jax.training.logging import read_jsonl

    records = read_jsonl(metrics_path)
    train = sorted((r for r in records if r.get("type") == "train"), key=lambda r: r["step"])
    evals = sorted((r for r in records if r.get("type") == "eval"), key=lambda r: r["step"])
    if not train:
        return {"train_steps": 0, "start": {}, "end": {}, "evaluations": []}
    n = max(1, math.ceil(share * len(train)))
    parts = {"start": train[:n], "end": train[-n:]}
    out = {"train_steps": len(train), "steps_per_part": n,
           "start_steps": [parts["start"][0]["step"], parts["start"][-1]["step"]],
           "end_steps": [parts["end"][0]["step"], parts["end"][-1]["step"]]}
    for name, rows in parts.items():
        summary = {key: _summary([float(r[key]) for r in rows]) for key, _ in TRAIN_SCALARS
                   if all(key in r for r in rows)}
        for key, _ in TRAIN_PER_STEP:
            if all(isinstance(r.get(key), list) for r in rows):
                summary[key] = [_summary([float(r[key][k]) for r in rows]) for k in range(len(rows[0][key]))]
        out[name] = summary
    out["evaluations"] = [{"step": r["step"], "step_accuracy": r.get("step_accuracy"), "final_ce": r.get("final_ce"),
                           "perplexity": r.get("perplexity")} for r in evals]
    return out


def _greedy(result: dict):
    section = result.get("greedy_chunk_accuracy") or {}
    if section.get("status") != "ok":
        return None, None, None
    return section.get("token_accuracy"), section.get("per_chunk_correct"), section.get("chunk_width")


def chunk_accuracy_by_step(recursive: dict, vanilla: dict) -> dict[str, list[PairedComparison]]:
    """{"vs vanilla greedy": [...], "vs own greedy": [...]}: chunk accuracy@k (k = 1..K) of the recursive stage
    against the greedy continuation of the vanilla stage and of the recursive stage's own base, paired by chunk."""
    acc = ((recursive.get("recursive") or {}).get("chunk_accuracy_at_k")) or {}
    values, correct = acc.get("token_accuracy_at_k") or [], acc.get("per_chunk_correct_at_k") or []
    out = {}
    for label, reference in (("vs vanilla greedy", vanilla), ("vs own greedy", recursive)):
        g_value, g_correct, width = _greedy(reference)
        out[label] = [compare_chunk_accuracy(f"chunk accuracy@{k}", g_value, g_correct, v, c, width)
                      for k, (v, c) in enumerate(zip(values, correct), 1)]
    return out


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _pm(s: dict | None) -> str:
    if not s:
        return "n/a"
    return _fmt(s["mean"]) if s["stderr"] is None else f"{_fmt(s['mean'])} ± {_fmt(s['stderr'], 2)}"


def study_report(*, sizes: dict, compute: dict, timings: dict, unigram: PairedComparison, baseline: dict,
                 unigram_result: dict, vanilla_vs_baseline: PairedComparison, chunks: dict[str, list],
                 trajectory: dict, command: str) -> tuple[str, dict]:
    """(Markdown, JSON-ready dict) of the study."""
    core = baseline.get("core") or {}
    ucore = unigram_result["core"]
    lines = ["# Recursion study", "", f"Command: `{command}`", "",
             "## Setup", "",
             f"A {sizes['params_m']:.2f} M-parameter Kimi-Linear ({sizes['layers']} layers, hidden {sizes['hidden']}, "
             f"vocab {sizes['vocab_size']}) pretrained here for {sizes['pretrain_steps']} steps of {sizes['batch']} x "
             f"{sizes['seq_len']} tokens on the demo corpus's train split; recursive phase a with W = "
             f"{sizes['chunk_width']}, K = {sizes['inner_steps']} for {compute['recursive_steps']} steps against a "
             f"vanilla fine-tune of {compute['vanilla_steps']} steps at the same analytic FLOPs "
             f"({compute['recursive_flops']:.3g} vs {compute['vanilla_flops']:.3g}; per step "
             f"{compute['recursive_flops_per_step']:.3g} vs {compute['vanilla_flops_per_step']:.3g}). Wall time: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".", "",
             "## 1. Is the pretrained model clearly better than unigram statistics?", "",
             f"**{unigram.verdict}**: held-out {unigram.describe()} (unigram -> pretrained baseline; add-one unigram "
             f"counts of the train split; baseline perplexity {_fmt(core.get('perplexity'))}, 95% CI "
             f"{_ci(core.get('perplexity_ci95'))}; unigram {_fmt(ucore.get('perplexity'))}, "
             f"{_ci(ucore.get('perplexity_ci95'))}; token accuracy {_fmt(core.get('token_accuracy'))} vs "
             f"{_fmt(ucore.get('token_accuracy'))}).", "",
             "## 2. Did the recursive training metrics move?", "",
             f"Mean ± standard error over the train steps {trajectory.get('start_steps')} (start) and "
             f"{trajectory.get('end_steps')} (end) of metrics.jsonl:", "",
             "| metric | start | end |", "|---|---|---|"]
    start, end = trajectory.get("start", {}), trajectory.get("end", {})
    for key, label in TRAIN_SCALARS:
        if key in start:
            lines.append(f"| {label} | {_pm(start[key])} | {_pm(end.get(key))} |")
    for key, label in TRAIN_PER_STEP:
        for k, (a, b) in enumerate(zip(start.get(key, []), end.get(key, [])), 1):
            lines.append(f"| {label} at step {k} | {_pm(a)} | {_pm(b)} |")
    if trajectory.get("evaluations"):
        lines += ["", "Held-out step accuracy@k (the training objective's windows, ground-truth targets):", "",
                  "| step | " + " | ".join(f"k = {k}" for k in range(1, sizes["inner_steps"] + 1)) + " |",
                  "|---|" + "---|" * sizes["inner_steps"]]
        for e in trajectory["evaluations"]:
            lines.append(f"| {e['step']} | " + " | ".join(_fmt(v) for v in (e["step_accuracy"] or [])) + " |")
    lines += ["", "## 3. Does recursion help, at equal compute?", "",
              "Chunk accuracy@k of the recursive stage (leak-free, aligned held-out chunks) against greedy chunks, "
              "paired chunk by chunk; the vanilla stage is the equal-compute fine-tune:", ""]
    for label, comparisons in chunks.items():
        for c in comparisons:
            lines.append(f"- {label}: **{c.verdict}**: {c.describe()}")
    lines += ["", "## 4. Did the vanilla fine-tune help?", "", f"**{vanilla_vs_baseline.verdict}**: "
              f"{vanilla_vs_baseline.describe()} (baseline -> finetuned_vanilla)", ""]
    data = {"command": command, "sizes": sizes, "compute": compute, "timings_s": timings,
            "unigram": {"perplexity": ucore.get("perplexity"), "perplexity_ci95": ucore.get("perplexity_ci95"),
                        "token_accuracy": ucore.get("token_accuracy"), "num_windows": ucore.get("num_windows"),
                        "comparison": _as_dict(unigram)},
            "trajectory": trajectory,
            "chunk_accuracy": {label: [_as_dict(c) for c in cs] for label, cs in chunks.items()},
            "vanilla_vs_baseline": _as_dict(vanilla_vs_baseline)}
    return "\n".join(lines), data


def _ci(ci) -> str:
    return "n/a" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _as_dict(c: PairedComparison) -> dict:
    return {"metric": c.metric, "a": c.a, "b": c.b, "difference": c.difference, "ci95": [c.low, c.high]
            if c.has_uncertainty else None, "n": c.n, "verdict": c.verdict, "method": c.method}


