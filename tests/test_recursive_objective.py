"""The recursive losses on a hand-computed case, the corruption mix, and the one-pass objective end to end."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.objective import (CORRUPTIONS, corruption_ceiling, initial_drafts, num_windows,
                                          recursive_losses, recursive_objective, window_starts)
from kimi_jax.recursive.sidecar import MASK_ID, build_sidecar
from test_recursive_window import make_model, small_rcfg


def constructed_ys():
    """K = 2 steps, N = 2 windows, W = 3; window 1's last position is padding (invalid)."""
    targets = np.array([[1, 2, 3], [4, 5, 6]])
    valid = np.array([[True, True, True], [True, True, False]])
    ys = {
        "logp": np.array([[[-1., -2., -3.], [-1., -1., -1.]], [[-.5, -2.5, -1.], [-2., -1., -.5]]]),
        "draft": np.array([[[1, 0, 3], [0, 0, 6]], [[1, 2, 0], [4, 0, 9]]]),
        "proposal": np.array([[[1, 2, 0], [4, 0, 9]], [[1, 2, 3], [4, 5, 7]]]),
        "halt": np.array([[0., 0.], [2., -1.]]),
        "length": np.zeros((2, 2, 4)),
    }
    return {k: jnp.asarray(v) for k, v in ys.items()}, jnp.asarray(targets), jnp.asarray(valid)


def test_losses_on_a_hand_computed_case():
    rcfg = RecursiveConfig(chunk_width=64, max_inner_steps=2)
    ys, targets, valid = constructed_ys()
    losses, stats = recursive_losses(rcfg, ys, targets, valid)
    # final_ce: last-step CE over the 5 valid positions: (0.5 + 2.5 + 1 + 2 + 1) / 5.
    assert float(losses["final_ce"]) == pytest.approx(7 / 5)
    # masked_ce: step 1 wrong drafts (w0 p1; w1 p0, p1): (2 + 1 + 1) / 3; step 2 (w0 p2; w1 p1): (1 + 1) / 2.
    assert float(losses["masked_ce"]) == pytest.approx((4 / 3 + 1) / 2)
    # halt (final_agree): step 1 agrees with the final proposal nowhere (q = 0), step 2 always (q = 1).
    bce = lambda a, q: math.log1p(math.exp(-a)) if q else math.log1p(math.exp(a))
    assert float(losses["halt"]) == pytest.approx((bce(0, 0) * 2 + bce(2, 1) + bce(-1, 1)) / 4)
    # ponder: lambda_1 = 0.5, lambda_2 := 1 -> p = (0.5, 0.5), E[N] = 1.5, normalised by K = 2.
    assert float(losses["ponder"]) == pytest.approx(0.75)
    assert float(stats["expected_steps"]) == pytest.approx(1.5)
    # the halt head's mean lambda_k per step (the raw head: step K is not forced to 1 here)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    chex.assert_trees_all_close(np.asarray(stats["halt_prob"]), np.asarray([0.5, (sig(2) + sig(-1)) / 2]), rtol=1e-6)
    # length: uniform logits over 0..W -> CE = log(4) whatever the LCP targets.
    assert float(losses["length"]) == pytest.approx(math.log(4))
    # stability: right at step 1 (w0 p0, p1; w1 p0); hinges 0, 0.5, 1 -> 1.5 / 3.
    assert float(losses["stability"]) == pytest.approx(0.5)
    expect_total = (1.4 + 0.5 * 7 / 6 + 0.5 * float(losses["halt"]) + 0.05 * math.log(4) + 0.01 * 0.75
                    + 0.1 * 0.5)
    assert float(losses["total"]) == pytest.approx(expect_total)
    # Per-step accuracy against the targets over valid positions: step 1 3/5, step 2 5/5.
    chex.assert_trees_all_close(np.asarray(stats["step_accuracy"]), np.asarray([3 / 5, 5 / 5]), rtol=1e-7)


def test_length_targets_follow_the_lcp_and_eos():
    rcfg = RecursiveConfig(chunk_width=64, max_inner_steps=2)
    ys, targets, valid = constructed_ys()
    # Make the length head certain of the true LCP targets (final_agree): step 1 -> (2, 1), step 2 -> (3, 3).
    length = np.full((2, 2, 4), -30.0)
    for k, row in enumerate([(2, 1), (3, 3)]):
        for n, L in enumerate(row):
            length[k, n, L] = 30.0
    ys = dict(ys, length=jnp.asarray(length))
    losses, _ = recursive_losses(rcfg, ys, targets, valid)
    assert float(losses["length"]) < 1e-6
    # An EOS at target index 0 of window 0 caps its length targets at 1: the same head is now wrong there.
    capped, _ = recursive_losses(rcfg, ys, targets, valid, eos_ids=(1,))
    assert float(capped["length"]) > 10


def test_masked_ce_is_finite_with_nothing_to_fix():
    """The prototype's masked CE was NaN whenever a position was unmasked; ours normalises with an explicit mask."""
    rcfg = RecursiveConfig(chunk_width=64, max_inner_steps=2)
    ys, targets, valid = constructed_ys()
    ys = dict(ys, draft=jnp.broadcast_to(targets[None], ys["draft"].shape))
    losses, _ = recursive_losses(rcfg, ys, targets, valid)
    assert float(losses["masked_ce"]) == 0.0
    chex.assert_tree_all_finite(losses)


def test_corruption_mix_and_schedule():
    rcfg = RecursiveConfig(chunk_width=64, seed="mask", corruption_rate=0.2, corruption_rate_final=0.6,
                           corruption_min_rate=0.1, corruption_schedule="linear",
                           corruption_mix={"tf_argmax": 0.25, "sampled": 0.25, "uniform": 0.25, "mask": 0.25})
    assert float(corruption_ceiling(rcfg, 0.0)) == pytest.approx(0.2)
    assert float(corruption_ceiling(rcfg, 0.5)) == pytest.approx(0.4)
    assert float(corruption_ceiling(rcfg, 2.0)) == pytest.approx(0.6)
    N, W, V = 400, 64, 50
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (N, W, V)) * 3
    targets = jax.random.randint(jax.random.PRNGKey(1), (N, W), 0, V)
    drafts, kind = initial_drafts(jax.random.PRNGKey(2), rcfg, logits, targets, V, 1.0)
    drafts, kind, targets = np.asarray(drafts), np.asarray(kind), np.asarray(targets)
    counts = np.bincount(kind, minlength=4) / N
    chex.assert_trees_all_close(counts, np.full_like(counts, 0.25), rtol=1e-7, atol=0.08)
    tf = kind == CORRUPTIONS.index("tf_argmax")
    chex.assert_trees_all_equal(drafts[tf], np.asarray(logits).argmax(-1)[tf])
    sampled = kind == CORRUPTIONS.index("sampled")
    changed = drafts[sampled] != targets[sampled]
    assert 0.1 <= changed.mean() <= 0.6  # rate t ~ U[0.1, 0.6] per window
    masked = kind == CORRUPTIONS.index("mask")
    assert set(np.unique(drafts[masked][drafts[masked] != targets[masked]])) == {MASK_ID}


def test_window_grid():
    assert num_windows(4096, 128) == 31
    starts = np.asarray(window_starts(jax.random.PRNGKey(0), 8, 300, 128))
    chex.assert_shape(starts, (8, num_windows(300, 128)))
    assert (starts % 64 == 0).all() and (starts[:, -1] + 128 + 1 <= 300).all()
    with pytest.raises(ValueError, match="seq_len 100"):
        num_windows(100, 128)


@pytest.mark.slow
def test_phase_a_objective_end_to_end():
    """On a tiny base: finite losses, and at the zero init the gradient reaches the output matrices and the heads
    (and nothing upstream of the edits)."""
    model = make_model(head_scale=1.0)
    rcfg = small_rcfg(max_inner_steps=2)
    sidecar = build_sidecar(model.config, rcfg)
    ids = np.random.default_rng(0).integers(3, 512, (2, 140)).astype(np.int32)
    batch = {"input_ids": ids, "weights": np.ones_like(ids, np.float32)}
    gd, st = nnx.split(model)
    sgd, sst = nnx.split(sidecar)

    @jax.jit
    def run(sst):
        f = lambda s: recursive_objective(nnx.merge(gd, st), nnx.merge(sgd, s), rcfg, batch, jax.random.PRNGKey(3))
        return jax.value_and_grad(f, has_aux=True)(sst)

    (total, aux), grads = run(sst)
    chex.assert_tree_all_finite((total, aux["loss"]))
    assert float(jnp.sum(jnp.abs(grads["cells"]["b"][...]))) > 0
    # With b = 0 nothing upstream of the edits can receive a gradient yet.
    assert float(jnp.sum(jnp.abs(grads["cells"]["a_h"][...]))) == 0
    assert float(jnp.sum(jnp.abs(grads["halt_head"]["w2"][...]))) > 0
