"""A stage's results file: assembling the sections with their metadata (validated against `schema.json`), writing
`{output_dir}/{stage}_results.json` (and `{stage}_step_{N}_results.json` for a checkpoint step) atomically, the
TensorBoard scalars `evaluation/{stage}/...` and the summary a command prints.

The latest file `{stage}_results.json` keeps a result of a later step of the same training run (same parent folder):
evaluating an older checkpoint afterwards only writes its step file. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable, Mapping

import numpy as np

from kimi_jax.errors import WriteError
from kimi_jax.evaluation.inputs import EvalInputs
from kimi_jax.evaluation.schema import validate_results
from kimi_jax.evaluation.settings import EvalSettings
from kimi_jax.evaluation.stage import LoadedStage, StagePlan, print_notice
from kimi_jax.safe_io import Writes, describe_write_error, write_json_atomic

SCHEMA_VERSION = 1
NOTHING_WRITTEN = "no results file was written"
SECTIONS = ("core", "reasoning", "generation", "performance", "greedy_chunk_accuracy")  # and "recursive" with it
CORE_SCALARS = ("perplexity", "bits_per_byte", "token_accuracy", "nll_per_token")
RECURSIVE_SCALARS = ("avg_refine_steps", "commit_rate", "avg_chunk_length", "stability_at_k")
SUMMARY_RECURSIVE_METRICS = RECURSIVE_SCALARS + ("mean_flip_rate",)
MIB = 2 ** 20
_STEP_SUFFIX_RE = re.compile(r"_step_\d+_results\.json$")


class ResultsWriteError(WriteError):
    """A results file or TensorBoard folder could not be written (a full disk, a read-only folder): exit status 1."""


# ------------------------------------------------------------------------------------------------ assembling
def assemble_results(settings: EvalSettings, plan: StagePlan, loaded: LoadedStage, inputs: EvalInputs,
                     sections: Mapping[str, dict | None], section_seconds: Mapping[str, float]) -> dict:
    """The stage's results: metadata (what was evaluated, on which data, with which settings, where, when) and the
    `sections` (SECTIONS, plus "recursive" when it is not None), validated against the schema (a failure here is a
    bug of the program, not bad input)."""
    from kimi_jax.evaluation.system import code_version, hardware, utc_timestamp

    info, sidecar = loaded.info, loaded.sidecar
    metadata = {
        "stage": settings.stage,
        "model_path": os.path.abspath(plan.folder),
        "model_path_given": plan.model_path_given,
        "model_format": info.get("model_format"),
        "step": plan.step,
        "use_recursive": plan.use_recursive,
        "recursive_config": loaded.rcfg.to_dict() if plan.use_recursive else None,
        "recursive_config_source": info.get("recursive_config_source") if plan.use_recursive else None,
        "sidecar": ({"kind": info.get("sidecar"), "num_params": int(sidecar.num_params()),
                     "zero_init": bool(loaded.zero_init)} if sidecar is not None else None),
        "eval_data": dict(inputs.held_out.identity, scored_tokens=inputs.held_out.scored_tokens,
                          truncated=inputs.held_out.truncated),
        "seed": settings.seed,
        "dtype": np.dtype(loaded.model.dtype).name,
        "code_version": code_version(),
        "hardware": hardware(),
        "timestamp": utc_timestamp(),
        "command_line": plan.command_line,
        "settings": {"seq_len": settings.seq_len, "stride": settings.effective_stride,
                     "batch_size": settings.batch_size, "max_samples": settings.max_samples,
                     "max_eval_tokens": settings.max_eval_tokens, "max_new_tokens": settings.max_new_tokens,
                     "num_fewshot": settings.num_fewshot, "num_chunks": settings.num_chunks,
                     "generation_prompts": len(inputs.generation_prompts), "prompt_length": inputs.prompt_length,
                     "eos_token_ids": loaded.eos_ids, "pad_token_id": int(loaded.pad_id)},
        "section_seconds": dict(section_seconds),
        "wall_seconds": time.perf_counter() - plan.t_start,
    }
    result = {"schema_version": SCHEMA_VERSION, "metadata": metadata, **{name: sections[name] for name in SECTIONS}}
    if sections.get("recursive") is not None:
        result["recursive"] = sections["recursive"]
    validate_results(result)
    return result


# ------------------------------------------------------------------------------------------------ files
def output_paths(output_dir: str, stage: str, step: int | None) -> list[str]:
    """`{stage}_results.json` (the latest), plus `{stage}_step_{N}_results.json` for a checkpoint step."""
    paths = [os.path.join(output_dir, f"{stage}_results.json")]
    if step is not None:
        paths.append(os.path.join(output_dir, f"{stage}_step_{step}_results.json"))
    return paths


def newer_step_exists(path: str, result: dict) -> bool:
    """Whether `path` holds a result of a later step of the same training run (same parent folder)."""
    step = result["metadata"]["step"]
    if step is None or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    same_run = (os.path.dirname(str(old.get("model_path", ""))) ==
                os.path.dirname(result["metadata"]["model_path"]))
    return same_run and isinstance(old.get("step"), int) and old["step"] > step


def scalars_of(result: dict) -> dict[str, float]:
    """The TensorBoard scalars of a result: {evaluation/{stage}/{name}: value}, None values left out."""
    stage = result["metadata"]["stage"]
    out = {}
    core, reasoning = result["core"], result["reasoning"]
    if core["status"] == "ok":
        for name in CORE_SCALARS:
            out[name] = core[name]
    if reasoning["status"] == "ok":
        out["reasoning_accuracy"] = reasoning["reasoning_accuracy"]
        out["gsm8k_flexible_extract"] = reasoning["flexible_extract"]
    if result["generation"]["status"] == "ok":
        out["distinct_2"] = result["generation"]["distinct_2"]
        out["repetition_rate_4gram"] = result["generation"]["repetition_rate_4gram"]
    perf = result["performance"]
    if perf["status"] == "ok":
        path = perf["recursive"] if perf["recursive"] is not None else perf["baseline"]
        out["decode_tokens_per_sec"] = path["decode_tokens_per_sec"]
    if result["greedy_chunk_accuracy"]["status"] == "ok":
        out["greedy_chunk_accuracy"] = result["greedy_chunk_accuracy"]["token_accuracy"]
    rec = result.get("recursive")
    if rec is not None:
        for name in RECURSIVE_SCALARS:
            out[name] = rec["metrics"].get(name)
        acc = rec["chunk_accuracy_at_k"]
        if acc.get("status") == "ok":
            out["chunk_accuracy_at_K"] = acc["token_accuracy_at_k"][-1]
    return {f"evaluation/{stage}/{k}": v for k, v in out.items() if v is not None}


def write_results(result: dict, plan: StagePlan, writes: Writes, notice: Callable[[str], None] = print_notice
                  ) -> None:
    """The results files (atomically: each is the old or the new content, never a part) and, unless `plan.logdir`
    is None, the TensorBoard scalars at the checkpoint step (0 without one), recording in `writes` what is done.
    A failed write is a ResultsWriteError naming the file and what was written before it."""
    import jax

    if jax.process_index() != 0:
        return
    stage = result["metadata"]["stage"]
    try:
        os.makedirs(plan.output_dir, exist_ok=True)
        for path in output_paths(plan.output_dir, stage, plan.step):
            if not _STEP_SUFFIX_RE.search(path) and newer_step_exists(path, result):
                notice(f"kept {path}: it holds a later step of the same run; this result is in the step file")
                continue
            writes.begin(path, "json")
            write_json_atomic(path, result)
            writes.finish()
        if plan.logdir is not None:
            from kimi_jax.tb_events import write_scalars

            writes.begin(plan.logdir, "tensorboard")
            write_scalars(plan.logdir, scalars_of(result), plan.step if plan.step is not None else 0)
            writes.finish()
    except OSError as e:
        path = writes.current[0] if writes.current is not None else plan.output_dir
        raise ResultsWriteError(f"{describe_write_error(e, path)}; {writes.describe(NOTHING_WRITTEN)}") from None


# ------------------------------------------------------------------------------------------------ summary
def fmt_value(v) -> str:
    """A figure for a summary line: 4 significant digits, "n/a" for a missing one."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_lines(result: dict, written: list[str], logdir: str | None) -> list[str]:
    """What a command prints after a run: each section's headline figures, then the files written."""
    meta = result["metadata"]
    lines = [f"stage {meta['stage']}: {meta['model_path']}" + (f" (step {meta['step']})" if meta["step"] is not None
                                                               else "")
             + (", recursive" if meta["use_recursive"] else ", baseline")]
    core = result["core"]
    if core["status"] == "ok":
        lines.append(f"core ({core['path']} path): perplexity {fmt_value(core['perplexity'])}  bits/byte "
                     f"{fmt_value(core['bits_per_byte'])}  token accuracy {fmt_value(core['token_accuracy'])}  over "
                     f"{core['num_tokens']} tokens" + (" (truncated)" if core["truncated"] else ""))
    else:
        lines.append(f"core: skipped ({core['reason']})")
    r = result["reasoning"]
    if r["status"] == "ok":
        lines.append(f"gsm8k ({r['num_fewshot']}-shot, n={r['n']}): strict-match {fmt_value(r['strict_match'])}  "
                     f"flexible-extract {fmt_value(r['flexible_extract'])}")
    else:
        lines.append(f"gsm8k: skipped ({r['reason']})")
    g = result["generation"]
    if g["status"] == "ok":
        lines.append(f"generation ({g['num_samples']} samples): mean length {fmt_value(g['length']['mean_tokens'])}  "
                     f"distinct-1/2/3 {fmt_value(g['distinct_1'])}/{fmt_value(g['distinct_2'])}/{fmt_value(g['distinct_3'])}  "
                     f"4-gram repetition {fmt_value(g['repetition_rate_4gram'])}")
    p = result["performance"]
    if p["status"] == "ok":
        for name in ("baseline", "recursive"):
            if p[name] is not None:
                lines.append(f"performance ({name}): prefill {fmt_value(p[name]['prefill_tokens_per_sec'])} tokens/s  "
                             f"decode {fmt_value(p[name]['decode_tokens_per_sec'])} tokens/s (compilation excluded)")
        lines.append(f"peak memory {p['peak_memory_bytes'] / MIB:.1f} MiB ({p['peak_memory_source']})")
    gc = result["greedy_chunk_accuracy"]
    if gc["status"] == "ok":
        lines.append(f"greedy chunk accuracy (W={gc['chunk_width']}, {gc['num_chunks']} chunks): "
                     f"{fmt_value(gc['token_accuracy'])}")
    rec = result.get("recursive")
    if rec is not None:
        m = rec["metrics"]
        lines.append("recursive: " + "  ".join(f"{k} {fmt_value(m.get(k))}" for k in SUMMARY_RECURSIVE_METRICS))
        acc = rec["chunk_accuracy_at_k"]
        if acc["status"] == "ok":
            lines.append(f"chunk accuracy@k (k=1..{acc['max_inner_steps']}, {acc['num_chunks']} chunks): "
                         + " ".join(fmt_value(v) for v in acc["token_accuracy_at_k"])
                         + f"  vs baseline greedy {fmt_value(acc['baseline_greedy']['token_accuracy'])}")
    for path in written:
        if path == logdir:
            lines.append(f"wrote TensorBoard scalars to {path} (the folder under --log_dir, default ./logs of the "
                         f"current folder; --no_tensorboard writes none)")
        else:
            lines.append(f"wrote {path}")
    lines.append(f"evaluation took {meta['wall_seconds']:.1f} s")
    return lines


__all__ = ["NOTHING_WRITTEN", "ResultsWriteError", "SCHEMA_VERSION", "SECTIONS", "assemble_results",
           "fmt_value", "newer_step_exists", "output_paths", "scalars_of", "summary_lines", "write_results"]
