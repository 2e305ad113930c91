"""Inference metrics of the chunked recursive generator (RECURSIVE_DESIGN.md section 4), pure numpy.

The generator records one `ChunkTrace` per committed chunk per sample (section 3.10): the step k_c at which the chunk
stopped (or, in diagnostic mode, would have stopped), whether that stop was voluntary, the committed length B'_c,
whether the fixed point v = W was reached, and the step-k proposals yhat^1..yhat^n. `recursive_metrics` aggregates
a list of traces over all chunks c = 1..C into JSON-ready numbers:

* steps: `avg_refine_steps` = mean k_c, `executed_steps` = mean n_c (rows actually executed, n_c >= k_c when batching
  forces extra steps, n_c = K in diagnostic mode);
* halting: `commit_rate` = mean vol_c, `halt_hazard` = sum vol_c / sum k_c, `fixed_point_rate` = mean 1[v = W];
* lengths: `chunk_length_hist` (entry L-1 = fraction of chunks with B' = L, L = 1..W), `avg_chunk_length`,
  `token_weighted_chunk_length` = sum B'^2 / sum B', `full_chunk_fraction` = mean 1[B' = W], `length_head_mse` =
  mean (B' - L*)^2 over chunks that carry a reference length L*;
* stability (diagnostic mode only, i.e. every trace has n = K rows; None otherwise): `stability_at_k` = fraction of
  chunks whose committed tokens at the stop step equal those at step K, `token_stability` = the same per committed
  token;
* dynamics: `flip_rate` = [F_2..F_K], F_k = mean over (chunks that executed step k, all W positions) of
  1[yhat^k_i != yhat^{k-1}_i]; `mean_flip_rate` pools every (chunk, k >= 2, i); `oscillation_rate` pools every
  (chunk, k >= 3, i) of 1[yhat^k_i == yhat^{k-2}_i != yhat^{k-1}_i] (A -> B -> A);
* `mean_halt_prob_per_step` = [mean lambda_1 .. mean lambda_K] over chunks that executed step k and recorded halt
  probabilities.

The means over chunks (`PER_CHUNK_MEANS`: refine and executed steps, commit, fixed-point and full-chunk rates, chunk
length, stability@K) carry ``{name}_stderr``, the standard error over chunks (`kimi_jax.evaluation.uncertainty.
mean_stderr`; None for fewer than two chunks). A mean over an empty set is None (never NaN, never a division by
zero); list entries follow the same rule.
`traces_to_json` / `traces_from_json` convert traces to and from plain JSON values (proposals as nested lists).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = ["ChunkTrace", "PER_CHUNK_MEANS", "recursive_metrics", "traces_from_json", "traces_to_json",
           "validate_traces"]
PER_CHUNK_MEANS = ("avg_refine_steps", "executed_steps", "commit_rate", "fixed_point_rate", "avg_chunk_length",
                   "full_chunk_fraction", "stability_at_k")


@dataclasses.dataclass(frozen=True)
class ChunkTrace:
    """What the chunked generator records for one committed chunk of one sample.

    stop_step:     k_c, the 1-based inner step at which the chunk stopped (would have stopped, in diagnostic mode).
    voluntary:     stopped by the criterion (fixed point v = W, or halt prob >= commit_threshold) rather than forced
                   by the cap K.
    length:        B'_c, the committed length (1..W), after the EOS / max_new_tokens cut.
    fixed_point:   v_{k_c} == W (the verified length reached the full window at the stop step).
    proposals:     int [n, W], the step-k proposals yhat^1..yhat^n (n = K in diagnostic mode; else the executed
                   steps, n >= stop_step).
    halt_probs:    float [n], lambda_k per executed step, or None if not recorded.
    target_length: L*_c, a reference length (EOS or LCP) for the length-head error, or None.
    """

    stop_step: int
    voluntary: bool
    length: int
    fixed_point: bool
    proposals: np.ndarray
    halt_probs: np.ndarray | None = None
    target_length: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def _check_dims(chunk_width: Any, max_inner_steps: Any) -> None:
    if not _is_int(chunk_width) or chunk_width < 1:
        raise ValueError(f"chunk_width must be a positive integer, got {chunk_width!r}")
    if not _is_int(max_inner_steps) or max_inner_steps < 1:
        raise ValueError(f"max_inner_steps must be a positive integer, got {max_inner_steps!r}")


def _validated(idx: int, t: ChunkTrace, W: int, K: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Check one trace; return (proposals as int64 [n, W], halt_probs as float64 [n] or None)."""

    def bad(field: str, msg: str) -> ValueError:
        return ValueError(f"chunk {idx}: {field} {msg}")

    if not _is_int(t.stop_step) or not 1 <= t.stop_step <= K:
        raise bad("stop_step", f"must be an integer in 1..{K} (max_inner_steps), got {t.stop_step!r}")
    if not _is_int(t.length) or not 1 <= t.length <= W:
        raise bad("length", f"must be an integer in 1..{W} (chunk_width), got {t.length!r}")
    if not _is_bool(t.voluntary):
        raise bad("voluntary", f"must be a bool, got {t.voluntary!r}")
    if not _is_bool(t.fixed_point):
        raise bad("fixed_point", f"must be a bool, got {t.fixed_point!r}")
    props = np.asarray(t.proposals)
    if props.ndim != 2 or props.shape[1] != W:
        raise bad("proposals", f"must have shape [n, {W}], got {props.shape}")
    n = props.shape[0]
    if not t.stop_step <= n <= K:
        raise bad("proposals", f"must have stop_step ({t.stop_step}) <= n <= {K} rows, got n = {n}")
    if not (np.issubdtype(props.dtype, np.integer) and props.dtype != np.bool_):
        raise bad("proposals", f"must be integer token ids, got dtype {props.dtype}")
    halt = None
    if t.halt_probs is not None:
        halt = np.asarray(t.halt_probs, dtype=np.float64)
        if halt.shape != (n,):
            raise bad("halt_probs", f"must have shape [n] = ({n},) matching the proposals rows, got {halt.shape}")
        if not np.all(np.isfinite(halt)):
            raise bad("halt_probs", "must be finite")
    if t.target_length is not None and (not _is_int(t.target_length) or t.target_length < 0):
        raise bad("target_length", f"must be a non-negative integer or None, got {t.target_length!r}")
    return props.astype(np.int64, copy=False), halt


def validate_traces(traces: Sequence[ChunkTrace], chunk_width: int, max_inner_steps: int) -> None:
    """Raise ValueError (naming the chunk index and field) if any trace is inconsistent with W and K."""
    _check_dims(chunk_width, max_inner_steps)
    for idx, t in enumerate(traces):
        _validated(idx, t, chunk_width, max_inner_steps)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _ratio(num: float, den: float) -> float | None:
    """num / den as a Python float, or None for an empty denominator."""
    return None if den == 0 else float(num) / float(den)


def recursive_metrics(traces: Sequence[ChunkTrace], chunk_width: int, max_inner_steps: int) -> dict:
    """Section-4 metrics over all chunks; JSON-ready (Python ints / floats / None / lists only)."""
    _check_dims(chunk_width, max_inner_steps)
    W, K = int(chunk_width), int(max_inner_steps)
    checked = [_validated(idx, t, W, K) for idx, t in enumerate(traces)]
    C = len(traces)

    k = np.array([t.stop_step for t in traces], dtype=np.int64)
    n = np.array([p.shape[0] for p, _ in checked], dtype=np.int64)
    vol = np.array([bool(t.voluntary) for t in traces], dtype=np.int64)
    fixed = np.array([bool(t.fixed_point) for t in traces], dtype=np.int64)
    B = np.array([t.length for t in traces], dtype=np.int64)

    # Length-head error over chunks with a reference length.
    sq_err = [(t.length - t.target_length) ** 2 for t in traces if t.target_length is not None]

    # Stability: only in diagnostic mode (every trace ran all K steps).
    stability = token_stability = None
    stable_per_chunk = None
    if C > 0 and bool(np.all(n == K)):
        stable_chunks = 0
        stable_tokens = 0
        stable_per_chunk = []
        for t, (p, _) in zip(traces, checked):
            same = p[t.stop_step - 1, : t.length] == p[K - 1, : t.length]
            stable_chunks += int(np.all(same))
            stable_tokens += int(np.sum(same))
            stable_per_chunk.append(float(np.all(same)))
        stability = _ratio(stable_chunks, C)
        token_stability = _ratio(stable_tokens, int(B.sum()))

    # Flip / oscillation counts per step over all W positions of chunks that executed that step.
    flips = np.zeros(K + 1, dtype=np.int64)  # index k = step k (1-based); entries 2..K used
    flip_den = np.zeros(K + 1, dtype=np.int64)
    osc = 0
    osc_den = 0
    halt_sum = np.zeros(K, dtype=np.float64)
    halt_cnt = np.zeros(K, dtype=np.int64)
    for p, halt in checked:
        rows = p.shape[0]
        if rows >= 2:
            changed = p[1:] != p[:-1]  # [rows-1, W]; row j compares step j+2 with step j+1
            flips[2 : rows + 1] += changed.sum(axis=1)
            flip_den[2 : rows + 1] += W
        if rows >= 3:
            back = (p[2:] == p[:-2]) & (p[2:] != p[1:-1])
            osc += int(back.sum())
            osc_den += back.size
        if halt is not None:
            halt_sum[:rows] += halt
            halt_cnt[:rows] += 1

    hist = [_ratio(int(np.sum(B == L)), C) for L in range(1, W + 1)]
    from kimi_jax.evaluation.uncertainty import mean_stderr

    per_chunk = {"avg_refine_steps": k, "executed_steps": n, "commit_rate": vol, "fixed_point_rate": fixed,
                 "avg_chunk_length": B, "full_chunk_fraction": (B == W), "stability_at_k": stable_per_chunk}
    stderrs = {f"{name}_stderr": None if per_chunk[name] is None else mean_stderr(
        np.asarray(per_chunk[name], np.float64)) for name in PER_CHUNK_MEANS}

    return {**stderrs,
        "num_chunks": int(C),
        "avg_refine_steps": _ratio(int(k.sum()), C),
        "executed_steps": _ratio(int(n.sum()), C),
        "commit_rate": _ratio(int(vol.sum()), C),
        "halt_hazard": _ratio(int(vol.sum()), int(k.sum())),
        "fixed_point_rate": _ratio(int(fixed.sum()), C),
        "chunk_length_hist": hist,
        "avg_chunk_length": _ratio(int(B.sum()), C),
        "token_weighted_chunk_length": _ratio(int((B * B).sum()), int(B.sum())),
        "full_chunk_fraction": _ratio(int(np.sum(B == W)), C),
        "length_head_mse": _ratio(int(sum(sq_err)), len(sq_err)),
        "stability_at_k": stability,
        "token_stability": token_stability,
        "flip_rate": [_ratio(int(flips[s]), int(flip_den[s])) for s in range(2, K + 1)],
        "mean_flip_rate": _ratio(int(flips[2:].sum()), int(flip_den[2:].sum())),
        "oscillation_rate": _ratio(osc, osc_den),
        "mean_halt_prob_per_step": [_ratio(float(halt_sum[s]), int(halt_cnt[s])) for s in range(K)],
    }


# ----------------------------------------------------------------------------------------------------------------
# JSON (de)serialisation


def traces_to_json(traces: Sequence[ChunkTrace]) -> list[dict]:
    """Plain-JSON form of the traces: one dict per trace, proposals / halt_probs as (nested) lists."""
    out = []
    for t in traces:
        out.append({
            "stop_step": int(t.stop_step),
            "voluntary": bool(t.voluntary),
            "length": int(t.length),
            "fixed_point": bool(t.fixed_point),
            "proposals": [[int(v) for v in row] for row in np.asarray(t.proposals)],
            "halt_probs": None if t.halt_probs is None else [float(v) for v in np.asarray(t.halt_probs)],
            "target_length": None if t.target_length is None else int(t.target_length),
        })
    return out


def traces_from_json(data: Sequence[dict]) -> list[ChunkTrace]:
    """Inverse of `traces_to_json` (proposals become int64 [n, W], halt_probs float64 [n])."""
    traces = []
    for idx, d in enumerate(data):
        try:
            props = np.asarray(d["proposals"], dtype=np.int64)
            if props.ndim != 2:
                raise ValueError(f"chunk {idx}: proposals must be a nested list [n][W], got shape {props.shape}")
            halt = d.get("halt_probs")
            target = d.get("target_length")
            traces.append(ChunkTrace(
                stop_step=int(d["stop_step"]),
                voluntary=bool(d["voluntary"]),
                length=int(d["length"]),
                fixed_point=bool(d["fixed_point"]),
                proposals=props,
                halt_probs=None if halt is None else np.asarray(halt, dtype=np.float64),
                target_length=None if target is None else int(target),
            ))
        except KeyError as e:
            raise ValueError(f"chunk {idx}: missing field {e.args[0]!r}") from None
    return traces
