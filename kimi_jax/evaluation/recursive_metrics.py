"""The recursive sections of a stage's results.

* `greedy_chunk_accuracy` (every stage) and the recursive model's leak-free chunk accuracy@k (recursive stages):
  aligned held-out chunks of W tokens, W the recursive config's chunk width (without recursion --chunk_width, else
  the after_surgery preset's), scored by `kimi_jax.evaluation.chunk_accuracy`. The greedy continuation of the true
  prefix is the reference every stage reports, so the recursive model's accuracy@k has its comparison column.
* `recursive` (recursive stages): the generator's metrics (`kimi_jax.recursive.metrics`: refine steps, commit rate,
  chunk length, stability@K, flip rate, ...) over the chunk traces of the diagnostic generation and GSM8K runs, in
  all and per source, whether the diagnostic runs reproduced the timed run's tokens, and the chunk accuracy@k.
"""

from __future__ import annotations

from typing import Mapping

from kimi_jax.evaluation.chunk_accuracy import chunk_rows, evaluate_chunk_accuracy
from kimi_jax.evaluation.inputs import HeldOut
from kimi_jax.evaluation.settings import EvalSettings

TRACE_SOURCES = ("generation", "gsm8k")  # the runs whose chunk traces the `recursive` section summarises


def chunk_accuracy(loaded, held_out: HeldOut, chunk_rcfg, settings: EvalSettings) -> tuple[dict, dict]:
    """(chunk accuracy@k of the stage's sidecar, the `greedy_chunk_accuracy` section) on the aligned held-out chunks
    of `chunk_rcfg.chunk_width` tokens; both skipped when the held-out tokens do not fill one row.

    Without recursion (`loaded.use_recursive` false) a zero-init sidecar with `chunk_rcfg`'s (one) inner step only
    serves the greedy continuation."""
    from kimi_jax.recursive.sidecar import build_sidecar

    max_chunks = settings.num_chunks  # --max_samples caps GSM8K and the generation prompts, not the chunks
    rows, starts = chunk_rows([d.ids for d in held_out.docs], chunk_rcfg.chunk_width, settings.seq_len, max_chunks)
    if rows.shape[0] == 0:
        skipped = {"status": "skipped",
                   "reason": f"the held-out tokens ({sum(d.ids.size for d in held_out.docs)}) are fewer than one row "
                             f"of {(starts.size + 1) * chunk_rcfg.chunk_width + 1}"}
        return skipped, dict(skipped)
    sidecar = loaded.sidecar if loaded.use_recursive else build_sidecar(loaded.model.config, chunk_rcfg)
    acc = {"status": "ok", **evaluate_chunk_accuracy(loaded.model, sidecar, chunk_rcfg, rows, starts, max_chunks,
                                                      progress=settings.progress, opts=loaded.opts)}
    greedy = {"status": "ok", "chunk_width": acc["chunk_width"], "num_chunks": acc["num_chunks"],
              "row_length": acc["row_length"], "windows_per_row": acc["windows_per_row"], **acc["baseline_greedy"]}
    return acc, greedy


def recursive_section(loaded, traces_by_source: Mapping[str, list], diagnostic_matches_timed_run: bool | None,
                      chunk_accuracy_at_k: dict) -> dict | None:
    """The `recursive` section of a recursive stage (None without recursion): the generator's metrics over the chunk
    traces of each source in `traces_by_source` ({"generation" | "gsm8k": [ChunkTrace]}) and in all."""
    from kimi_jax.recursive.metrics import recursive_metrics

    if not loaded.use_recursive:
        return None
    W, K = loaded.rcfg.chunk_width, loaded.rcfg.max_inner_steps
    every = [t for source in TRACE_SOURCES for t in traces_by_source.get(source, [])]
    return {"diagnostic": True, "diagnostic_matches_timed_run": diagnostic_matches_timed_run,
            "sources": sorted(traces_by_source),
            "metrics": recursive_metrics(every, W, K),
            "metrics_by_source": {s: recursive_metrics(t, W, K) for s, t in sorted(traces_by_source.items())},
            "chunk_accuracy_at_k": chunk_accuracy_at_k}


__all__ = ["TRACE_SOURCES", "chunk_accuracy", "recursive_section"]
