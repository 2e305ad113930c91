"""kimi_jax.flops: the analytic model FLOPs of vanilla and recursive training steps."""

from __future__ import annotations

import pytest

from kimi_jax.config import kimi_linear_48b_a3b, tiny
from kimi_jax.flops import analytic_flops_per_token, recursive_flops_per_token
from kimi_jax.recursive.config import load_preset


def test_analytic_flops_of_the_48b():
    cfg = kimi_linear_48b_a3b()
    flops = analytic_flops_per_token(cfg, 4096)
    # Active matmul weights: every non-routed weight except the embedding, plus 8 routed experts per MoE layer
    # (spec §1: 3.11e9 active excluding the input embedding; norms, biases, dt_bias, A_log and convs are not
    # matmul weights, so ours is slightly lower).
    assert 3.0e9 < flops["matmul_weights"] < 3.11e9
    assert flops["train"] == pytest.approx(3 * flops["forward"])
    assert flops["forward"] > 2 * flops["matmul_weights"]


def test_recursive_step_counts_the_clean_pass_and_k_window_passes():
    """Phase a: one clean forward plus K passes over the windows' tokens, each forward + activation backward (+1
    forward with remat); phase c's clean pass gets a full backward."""
    cfg = tiny()
    flops = analytic_flops_per_token(cfg, 256)
    rcfg = load_preset("phase_a").replace(chunk_width=64, max_inner_steps=3, use_latent_token=False)
    windows = 2
    rec = recursive_flops_per_token(flops, rcfg, windows, 256, remat=False)
    share = windows * 64 / 256
    assert rec["window_tokens_per_token"] == pytest.approx(share)
    assert rec["recursive_factor"] == pytest.approx(1 + 3 * share * 2)
    assert rec["train"] == pytest.approx(rec["recursive_factor"] * flops["forward"])
    remat = recursive_flops_per_token(flops, rcfg, windows, 256, remat=True)
    assert remat["recursive_factor"] == pytest.approx(1 + 3 * share * 3)
    phase_c = recursive_flops_per_token(flops, rcfg.replace(phase="c"), windows, 256, remat=False)
    assert phase_c["recursive_factor"] == pytest.approx(3 + 3 * share * 2)
