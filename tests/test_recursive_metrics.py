"""Recursive-refinement metrics (kimi_jax/recursive/metrics.py) on hand-computed cases. Pure numpy, no JAX."""

from __future__ import annotations

import dataclasses
import json

import chex
import numpy as np
import pytest

from kimi_jax.recursive.metrics import (PER_CHUNK_MEANS, ChunkTrace, recursive_metrics, traces_from_json,
                                        traces_to_json, validate_traces)

W, K = 4, 3
APPROX = dict(rel=1e-12, abs=1e-12)

ALL_KEYS = {
    "num_chunks", "avg_refine_steps", "executed_steps", "commit_rate", "halt_hazard", "fixed_point_rate",
    "chunk_length_hist", "avg_chunk_length", "token_weighted_chunk_length", "full_chunk_fraction", "length_head_mse",
    "stability_at_k", "token_stability", "flip_rate", "mean_flip_rate", "oscillation_rate", "mean_halt_prob_per_step",
} | {f"{name}_stderr" for name in PER_CHUNK_MEANS}


def T(stop, vol, length, fixed, props, halt=None, target=None):
    return ChunkTrace(stop_step=stop, voluntary=vol, length=length, fixed_point=fixed,
                      proposals=np.asarray(props, dtype=np.int32),
                      halt_probs=None if halt is None else np.asarray(halt, dtype=np.float32), target_length=target)


def diagnostic_traces():
    """Four chunks, W = 4, K = 3, every chunk ran all K steps (diagnostic mode)."""
    return [
        # c0: fixed point at step 1, full window, never changes afterwards.
        T(1, True, 4, True, [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]], halt=[0.9, 0.95, 0.99], target=4),
        # c1: halted at step 2, commits 2 tokens; step 3 changes committed position 1 (9 -> 3) -> unstable.
        T(2, True, 2, False, [[5, 6, 7, 8], [5, 9, 7, 8], [5, 3, 7, 1]], halt=[0.1, 0.8, 0.9], target=3),
        # c2: forced at K, commits 3 tokens; position 0 oscillates 1 -> 2 -> 1.
        T(3, False, 3, False, [[1, 1, 1, 1], [2, 2, 1, 1], [1, 2, 3, 1]], halt=[0.2, 0.3, 0.4]),
        # c3: forced at K, commits 2 tokens, no halt probs; position 1 oscillates 7 -> 8 -> 7.
        T(3, False, 2, False, [[7, 7, 7, 7], [7, 8, 7, 7], [7, 7, 7, 7]], target=1),
    ]


def non_diagnostic_traces():
    """Three chunks, W = 4, K = 3, with different numbers of executed rows (normal inference with batching)."""
    return [
        T(1, True, 4, True, [[1, 2, 3, 4]], halt=[0.7]),
        T(2, True, 3, False, [[1, 1, 1, 1], [1, 2, 1, 1]]),
        # Stopped at step 2 but batching forced a third executed step.
        T(2, True, 1, False, [[3, 3, 3, 3], [4, 3, 3, 3], [3, 3, 3, 4]], halt=[0.1, 0.6, 0.8]),
    ]


def _assert_plain_json(x):
    """Only Python bool/int/float/None/list/dict/str (no numpy scalars), and no NaN."""
    if isinstance(x, dict):
        for k, v in x.items():
            assert type(k) is str
            _assert_plain_json(v)
    elif isinstance(x, list):
        for v in x:
            _assert_plain_json(v)
    else:
        assert x is None or type(x) in (int, float, bool, str), (x, type(x))
        if type(x) is float:
            assert np.isfinite(x)


def test_diagnostic_hand_computed():
    m = recursive_metrics(diagnostic_traces(), W, K)
    assert set(m) == ALL_KEYS
    _assert_plain_json(m)
    json.dumps(m, allow_nan=False)

    assert m["num_chunks"] == 4
    # k_c = 1, 2, 3, 3 -> 9 / 4; every chunk has 3 rows.
    assert m["avg_refine_steps"] == pytest.approx(9 / 4, **APPROX)
    assert m["executed_steps"] == pytest.approx(3.0, **APPROX)
    # vol = 1, 1, 0, 0 -> 2/4; hazard = 2 / 9; fixed point only c0 -> 1/4.
    assert m["commit_rate"] == pytest.approx(0.5, **APPROX)
    assert m["halt_hazard"] == pytest.approx(2 / 9, **APPROX)
    assert m["fixed_point_rate"] == pytest.approx(0.25, **APPROX)
    # B' = 4, 2, 3, 2: hist over L = 1..4 = [0, 2/4, 1/4, 1/4]; mean 11/4; sum B'^2 = 16+4+9+4 = 33 -> 33/11 = 3.
    assert m["chunk_length_hist"] == pytest.approx([0.0, 0.5, 0.25, 0.25], **APPROX)
    assert len(m["chunk_length_hist"]) == W
    assert m["avg_chunk_length"] == pytest.approx(11 / 4, **APPROX)
    assert m["token_weighted_chunk_length"] == pytest.approx(3.0, **APPROX)
    assert m["full_chunk_fraction"] == pytest.approx(0.25, **APPROX)
    # targets on c0 (4 vs 4: 0), c1 (2 vs 3: 1), c3 (2 vs 1: 1); c2 has none -> 2 / 3.
    assert m["length_head_mse"] == pytest.approx(2 / 3, **APPROX)
    # Stability: c0 row0[:4] == row2[:4] yes; c1 row1[:2] = [5, 9] vs row2[:2] = [5, 3] no; c2, c3 stopped at K
    # -> trivially yes. 3/4 chunks. Tokens: 4 + 1 + 3 + 2 = 10 equal of 11 committed.
    assert m["stability_at_k"] == pytest.approx(3 / 4, **APPROX)
    assert m["token_stability"] == pytest.approx(10 / 11, **APPROX)
    # F_2 (step 2 vs step 1, 4 chunks x 4 positions = 16): c0 0, c1 1 (6->9), c2 2, c3 1 -> 4/16.
    # F_3 (step 3 vs step 2): c0 0, c1 2 (pos 1, 3), c2 2 (pos 0, 2), c3 1 (pos 1) -> 5/16.
    assert m["flip_rate"] == pytest.approx([4 / 16, 5 / 16], **APPROX)
    assert m["mean_flip_rate"] == pytest.approx(9 / 32, **APPROX)
    # A -> B -> A at k = 3: c2 pos 0 (1, 2, 1) and c3 pos 1 (7, 8, 7); c1 pos 1 is 6, 9, 3 (not back) -> 2/16.
    assert m["oscillation_rate"] == pytest.approx(2 / 16, **APPROX)
    # Halt probs recorded on c0, c1, c2 (float32 inputs, hence the looser tolerance).
    assert m["mean_halt_prob_per_step"] == pytest.approx(
        [(0.9 + 0.1 + 0.2) / 3, (0.95 + 0.8 + 0.3) / 3, (0.99 + 0.9 + 0.4) / 3], rel=1e-6)
    # Standard errors over the 4 chunks: sample std (ddof 1) / 2 of the per-chunk values above.
    se = lambda values: float(np.std(values, ddof=1) / 2)  # noqa: E731
    assert m["avg_refine_steps_stderr"] == pytest.approx(se([1, 2, 3, 3]), **APPROX)
    assert m["commit_rate_stderr"] == pytest.approx(se([1, 1, 0, 0]), **APPROX)
    assert m["avg_chunk_length_stderr"] == pytest.approx(se([4, 2, 3, 2]), **APPROX)
    assert m["stability_at_k_stderr"] == pytest.approx(se([1, 0, 1, 1]), **APPROX)
    assert m["executed_steps_stderr"] == 0.0


def test_non_diagnostic_hand_computed():
    m = recursive_metrics(non_diagnostic_traces(), W, K)
    _assert_plain_json(m)
    assert m["num_chunks"] == 3
    assert m["avg_refine_steps"] == pytest.approx(5 / 3, **APPROX)   # 1 + 2 + 2
    assert m["executed_steps"] == pytest.approx(2.0, **APPROX)       # 1 + 2 + 3
    assert m["commit_rate"] == pytest.approx(1.0, **APPROX)
    assert m["halt_hazard"] == pytest.approx(3 / 5, **APPROX)
    assert m["fixed_point_rate"] == pytest.approx(1 / 3, **APPROX)
    # B' = 4, 3, 1.
    assert m["chunk_length_hist"] == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3], **APPROX)
    assert m["avg_chunk_length"] == pytest.approx(8 / 3, **APPROX)
    assert m["token_weighted_chunk_length"] == pytest.approx(26 / 8, **APPROX)  # (16 + 9 + 1) / 8
    assert m["full_chunk_fraction"] == pytest.approx(1 / 3, **APPROX)
    assert m["length_head_mse"] is None  # no target lengths
    # Not every chunk has K rows -> stability is undefined.
    assert m["stability_at_k"] is None
    assert m["token_stability"] is None
    # F_2 over chunks 1, 2 (8 positions): 1 + 1 flips -> 2/8; F_3 only chunk 2: pos 0 and 3 -> 2/4.
    assert m["flip_rate"] == pytest.approx([0.25, 0.5], **APPROX)
    assert m["mean_flip_rate"] == pytest.approx(4 / 12, **APPROX)
    # Only chunk 2 ran 3 steps: pos 0 goes 3 -> 4 -> 3 -> 1/4.
    assert m["oscillation_rate"] == pytest.approx(1 / 4, **APPROX)
    # Step 1: chunks 0, 2 (chunk 1 has no halt probs); steps 2, 3: only chunk 2.
    assert m["mean_halt_prob_per_step"] == pytest.approx([(0.7 + 0.1) / 2, 0.6, 0.8], rel=1e-6)


def test_stability_requires_all_rows():
    full = diagnostic_traces()
    assert recursive_metrics(full, W, K)["stability_at_k"] is not None
    # Drop the last row of one chunk (stop_step 1 still <= n = 2): stability becomes undefined for the whole set.
    c0 = full[0]
    short = [dataclasses.replace(c0, proposals=c0.proposals[:2], halt_probs=c0.halt_probs[:2])] + full[1:]
    m = recursive_metrics(short, W, K)
    assert m["stability_at_k"] is None and m["token_stability"] is None
    assert m["executed_steps"] == pytest.approx(11 / 4, **APPROX)
    # F_3 now over 3 chunks (12 positions): c1 2, c2 2, c3 1 -> 5/12; F_2 unchanged.
    assert m["flip_rate"] == pytest.approx([4 / 16, 5 / 12], **APPROX)
    assert m["mean_flip_rate"] == pytest.approx(9 / 28, **APPROX)
    assert m["oscillation_rate"] == pytest.approx(2 / 12, **APPROX)
    assert m["mean_halt_prob_per_step"][2] == pytest.approx((0.9 + 0.4) / 2, rel=1e-6)


def test_steps_never_executed_give_none_entries():
    # K = 3 but no chunk ran more than 2 steps, and no halt probs anywhere.
    traces = [T(1, True, 4, True, [[1, 2, 3, 4], [1, 2, 3, 4]]), T(2, False, 2, False, [[1, 2, 3, 4], [1, 2, 0, 0]])]
    m = recursive_metrics(traces, W, K)
    # Stop step 2 < K yet not voluntary is accepted as recorded (the flag is taken at face value).
    assert m["flip_rate"][0] == pytest.approx(2 / 8, **APPROX)
    assert m["flip_rate"][1] is None
    assert m["mean_flip_rate"] == pytest.approx(2 / 8, **APPROX)
    assert m["oscillation_rate"] is None
    assert m["mean_halt_prob_per_step"] == [None, None, None]
    assert m["stability_at_k"] is None
    _assert_plain_json(m)


def test_single_step_cap():
    # K = 1: every chunk stops at step 1 with one row; diagnostic mode trivially, no flips possible.
    traces = [T(1, False, 2, False, [[1, 2, 3, 4]], halt=[0.25]), T(1, True, 4, True, [[5, 6, 7, 8]], halt=[0.75])]
    m = recursive_metrics(traces, W, 1)
    assert m["stability_at_k"] == 1.0 and m["token_stability"] == 1.0
    assert m["flip_rate"] == [] and m["mean_flip_rate"] is None and m["oscillation_rate"] is None
    assert m["mean_halt_prob_per_step"] == pytest.approx([0.5], **APPROX)
    assert m["halt_hazard"] == pytest.approx(1 / 2, **APPROX)


def test_empty():
    m = recursive_metrics([], W, K)
    assert set(m) == ALL_KEYS
    _assert_plain_json(m)
    json.dumps(m, allow_nan=False)
    assert m["num_chunks"] == 0
    for key in ALL_KEYS - {"num_chunks", "chunk_length_hist", "flip_rate", "mean_halt_prob_per_step"}:
        assert m[key] is None, key
    assert m["chunk_length_hist"] == [None] * W
    assert m["flip_rate"] == [None] * (K - 1)
    assert m["mean_halt_prob_per_step"] == [None] * K


@pytest.mark.parametrize("kw, field", [
    (dict(stop=0), "stop_step"),
    (dict(stop=4), "stop_step"),
    (dict(length=0), "length"),
    (dict(length=5), "length"),
    (dict(props=[[1, 2, 3]] * 3), "proposals"),             # wrong W
    (dict(props=[1, 2, 3, 4]), "proposals"),                # not 2-D
    (dict(stop=3, props=[[1, 2, 3, 4]] * 2), "proposals"),  # n < stop_step
    (dict(props=[[1, 2, 3, 4]] * 4), "proposals"),          # n > K
    (dict(halt=[0.1, 0.2]), "halt_probs"),                  # wrong length
    (dict(target=-1), "target_length"),
])
def test_validation_errors(kw, field):
    args = dict(stop=2, vol=True, length=3, fixed=False, props=[[1, 2, 3, 4]] * 3, halt=None, target=None)
    args.update(kw)
    bad = T(**args)
    traces = diagnostic_traces()[:2] + [bad]
    with pytest.raises(ValueError, match=rf"chunk 2\b.*{field}"):
        recursive_metrics(traces, W, K)
    with pytest.raises(ValueError, match=rf"chunk 2\b.*{field}"):
        validate_traces(traces, W, K)


def test_validation_float_proposals_and_bad_dims():
    bad = ChunkTrace(1, True, 4, True, np.zeros((3, W), np.float32))
    with pytest.raises(ValueError, match=r"chunk 0\b.*proposals"):
        recursive_metrics([bad], W, K)
    with pytest.raises(ValueError, match="chunk_width"):
        recursive_metrics([], 0, K)
    with pytest.raises(ValueError, match="max_inner_steps"):
        recursive_metrics([], W, 0)
    validate_traces(diagnostic_traces(), W, K)  # valid traces pass


def test_json_round_trip():
    traces = diagnostic_traces() + non_diagnostic_traces()
    data = traces_to_json(traces)
    _assert_plain_json(data)
    text = json.dumps(data, allow_nan=False)
    back = traces_from_json(json.loads(text))
    assert len(back) == len(traces)
    for a, b in zip(traces, back):
        assert (a.stop_step, a.voluntary, a.length, a.fixed_point, a.target_length) == \
               (b.stop_step, b.voluntary, b.length, b.fixed_point, b.target_length)
        chex.assert_trees_all_equal(b.proposals, a.proposals)
        assert b.proposals.shape == a.proposals.shape and np.issubdtype(b.proposals.dtype, np.integer)
        if a.halt_probs is None:
            assert b.halt_probs is None
        else:
            chex.assert_trees_all_equal(b.halt_probs, np.asarray(a.halt_probs, np.float64))
    assert recursive_metrics(back[:4], W, K) == recursive_metrics(traces[:4], W, K)
    assert recursive_metrics(back[4:], W, K) == recursive_metrics(traces[4:], W, K)
    assert traces_from_json([]) == [] and traces_to_json([]) == []


def test_from_json_missing_field():
    d = traces_to_json(diagnostic_traces()[:1])
    del d[0]["length"]
    with pytest.raises(ValueError, match=r"chunk 0\b.*length"):
        traces_from_json(d)
    # Optional fields may be omitted.
    d = traces_to_json(diagnostic_traces()[:1])
    del d[0]["halt_probs"], d[0]["target_length"]
    t = traces_from_json(d)[0]
    assert t.halt_probs is None and t.target_length is None
