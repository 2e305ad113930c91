"""Leak-free chunk accuracy@k of the recursive model on held-out text (RECURSIVE_DESIGN.md §4 (b)).

The refined model is not a left-to-right factorised LM (its window predictions depend on drafts of *future*
positions), so next-token perplexity does not measure it. Instead, for aligned chunks of held-out text:

1. condition on the **true prefix**: one clean causal pass over a row of held-out tokens exports, for every window
   start s (a multiple of the chunk width W), the snapshot of ``ids[:s]`` and ``x_last = ids[s]``
   (`kimi_jax.recursive.window.window_snapshots`); the true chunk is ``ids[s + 1 : s + 1 + W]``;
2. seed the draft **from the model itself**, as the generator does (the config's ``seed``): ``"ar"`` = W greedy
   baseline decode steps from the snapshot (the baseline's greedy continuation), ``"leftover"`` = what the generator
   uses when there is no previous proposal (``x_last`` repeated), ``"mask"`` = all [M];
3. run the K inner steps (`kimi_jax.recursive.window.refine_scan`: from the same snapshot every step, draft <-
   previous proposal) and score each step's proposal yhat^k against the true chunk.

Nothing the drafts or proposals see depends on the true chunk (they see only the prefix, the model's own tokens and
the sidecar), so the scores are leak-free; `tests/test_eval_chunk_accuracy.py` checks this by changing the chunk.
Reported per k: token accuracy (position-wise matches / (chunks x W)), exact-chunk rate, mean correct-prefix length
(LCP with the truth, in tokens) and agreement with the baseline's greedy continuation; the same for the baseline's
greedy continuation itself (the comparison) and the seed draft. Every score is a mean over chunks and carries its
standard error over chunks (``*_stderr``, lm-eval's ``mean_stderr``; None for one chunk); the correct positions of
each chunk (``per_chunk_correct_at_k`` [K][C], the baseline greedy's ``per_chunk_correct`` [C]) are kept for paired
comparisons between stages (the chunks are the same for the same data, seq_len and chunk width).

Rows: the held-out documents' token streams (each with its prefix token) concatenated and cut into consecutive rows of
``L = (n + 1) * W + 1`` tokens holding ``n = max(1, seq_len // W - 1)`` windows at starts W, 2W, .., nW (the first W
tokens are context only). One row per call (one compile).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from kimi_jax.evaluation.uncertainty import mean_stderr

AT_K_SCORES = ("token_accuracy", "exact_chunk_rate", "mean_correct_prefix", "agreement_with_baseline_greedy")

__all__ = ["chunk_rows", "evaluate_chunk_accuracy", "score_chunks"]


def chunk_rows(streams: Sequence[np.ndarray], chunk_width: int, seq_len: int, max_chunks: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(rows int [R, L], starts int [n]) covering at least ``min(max_chunks, available)`` chunks."""
    W = int(chunk_width)
    n = max(1, int(seq_len) // W - 1)
    L = (n + 1) * W + 1
    stream = np.concatenate([np.asarray(s, np.int64) for s in streams]) if streams else np.zeros(0, np.int64)
    available_rows = stream.size // L
    rows_needed = min(available_rows, -(-max_chunks // n)) if max_chunks > 0 else 0
    rows = stream[:rows_needed * L].reshape(rows_needed, L)
    return rows, np.arange(1, n + 1, dtype=np.int64) * W


def _lcp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the common prefix of each row pair ([C, W] each)."""
    return np.cumprod(a == b, axis=1).sum(axis=1)


def _scores(pred: np.ndarray, truth: np.ndarray, greedy: np.ndarray) -> dict:
    """Each score, a mean over chunks, with its standard error over chunks (``*_stderr``), and the correct
    positions of every chunk (``per_chunk_correct``, for paired comparisons)."""
    eq = pred == truth
    per_chunk = {"token_accuracy": eq.mean(axis=1), "exact_chunk_rate": eq.all(axis=1).astype(np.float64),
                 "mean_correct_prefix": _lcp(pred, truth).astype(np.float64),
                 "agreement_with_baseline_greedy": (pred == greedy).mean(axis=1)}
    out = {name: float(values.mean()) for name, values in per_chunk.items()}
    out.update({f"{name}_stderr": mean_stderr(values) for name, values in per_chunk.items()})
    out["per_chunk_correct"] = [int(v) for v in eq.sum(axis=1)]
    return out


def _without(scores: dict, *names: str) -> dict:
    return {k: v for k, v in scores.items() if k not in names and k.removesuffix("_stderr") not in names}


def score_chunks(truth: np.ndarray, greedy: np.ndarray, draft: np.ndarray, proposals: np.ndarray) -> dict:
    """truth, greedy, draft [C, W]; proposals [K, C, W] -> the JSON-ready scores of the module doc."""
    truth, greedy, draft, proposals = (np.asarray(a) for a in (truth, greedy, draft, proposals))
    C, W = truth.shape
    per_k = [_scores(proposals[k], truth, greedy) for k in range(proposals.shape[0])]
    return {
        "num_chunks": int(C),
        "chunk_width": int(W),
        "max_inner_steps": int(proposals.shape[0]),
        "token_accuracy_at_k": [s["token_accuracy"] for s in per_k],
        "exact_chunk_rate_at_k": [s["exact_chunk_rate"] for s in per_k],
        "mean_correct_prefix_at_k": [s["mean_correct_prefix"] for s in per_k],
        "agreement_with_baseline_greedy_at_k": [s["agreement_with_baseline_greedy"] for s in per_k],
        **{f"{name}_at_k_stderr": [s[f"{name}_stderr"] for s in per_k] for name in AT_K_SCORES},
        "per_chunk_correct_at_k": [s["per_chunk_correct"] for s in per_k],
        "baseline_greedy": _without(_scores(greedy, truth, greedy), "agreement_with_baseline_greedy"),
        "draft": _without(_scores(draft, truth, greedy), "per_chunk_correct"),
    }


@functools.lru_cache(maxsize=None)
def _eval_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.recursive.sidecar import MASK_ID
    from kimi_jax.recursive.window import refine_scan, window_snapshots

    @functools.partial(jax.jit, static_argnames=("graphdef", "side_graphdef", "rcfg", "opts"))
    def run(graphdef, state, side_graphdef, side_state, ids_BT, starts_BN, *, rcfg, opts):
        model = nnx.merge(graphdef, state)
        sidecar = nnx.merge(side_graphdef, side_state)
        W = rcfg.chunk_width
        _, cache, x_last = window_snapshots(model, ids_BT, starts_BN, W, opts=opts)

        def step(carry, _):  # the baseline's greedy continuation of the true prefix, W decode steps
            c, tok = carry
            logits, c = model(tok[:, None], cache=c, opts=opts)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (c, nxt), nxt

        _, greedy_WB = jax.lax.scan(step, (cache, x_last.astype(jnp.int32)), None, length=W)
        greedy = greedy_WB.T
        if rcfg.seed == "ar":
            draft = greedy
        elif rcfg.seed == "leftover":
            draft = jnp.broadcast_to(x_last[:, None], greedy.shape).astype(jnp.int32)
        else:
            draft = jnp.full(greedy.shape, MASK_ID, jnp.int32)
        ys = refine_scan(model, sidecar, rcfg, cache, x_last, draft, opts=opts)
        return greedy, draft, ys["proposal"]

    return run


def evaluate_chunk_accuracy(model, sidecar, rcfg, rows: np.ndarray, starts: np.ndarray, max_chunks: int, *,
                            progress: bool = False, opts=None) -> dict:
    """Run every row (one jitted call each) and score the first ``max_chunks`` chunks (row-major)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    from kimi_jax.model import RunOptions

    opts = RunOptions() if opts is None else opts
    if rows.shape[0] == 0:
        raise ValueError("no rows to evaluate")
    W = rcfg.chunk_width
    fn = _eval_fn()
    graphdef, state = nnx.split(model)
    side_graphdef, side_state = nnx.split(sidecar)
    starts_BN = jnp.asarray(starts[None, :], jnp.int32)
    truth, greedy, draft, proposals = [], [], [], []
    for row in tqdm(rows, desc="chunk accuracy", unit="row", disable=not progress):
        g, d, p = jax.device_get(fn(graphdef, state, side_graphdef, side_state, jnp.asarray(row[None], jnp.int32),
                                    starts_BN, rcfg=rcfg, opts=opts))
        greedy.append(np.asarray(g))
        draft.append(np.asarray(d))
        proposals.append(np.asarray(p))
        truth.append(np.stack([row[s + 1:s + 1 + W] for s in starts]))
    C = min(max_chunks, sum(t.shape[0] for t in truth))
    result = score_chunks(np.concatenate(truth)[:C], np.concatenate(greedy)[:C], np.concatenate(draft)[:C],
                          np.concatenate(proposals, axis=1)[:, :C])
    result.update(seed=rcfg.seed, row_length=int(rows.shape[1]), windows_per_row=int(starts.size))
    return result
