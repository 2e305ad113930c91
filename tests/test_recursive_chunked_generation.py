"""Chunked recursive generation (RECURSIVE_DESIGN.md §3.10, §3.11 T3) and its metrics on constructed cases."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.decoding import generate_greedy
from kimi_jax.recursive import chunked_generation as rgen
from kimi_jax.recursive.chunked_generation import generate_recursive
from kimi_jax.recursive.sidecar import build_sidecar
from test_recursive_window import make_model, randomize_sidecar, small_rcfg

VOCAB = 512


@pytest.fixture(scope="module")
def model():
    return make_model(seed=1)


def prompts(n: int, seed: int, min_len: int = 3, max_len: int = 20):
    """n random prompts of different lengths, left-padded (pad id 0) with their attention mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    ids = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), bool)
    for i, L in enumerate(lengths):
        ids[i, max_len - L:] = rng.integers(3, VOCAB, L)
        mask[i, max_len - L:] = True
    return ids, mask


# (chunk_width, K, draft seed, prompt seed, new tokens): K in {1, 2, 4}, W in {64, 128}, every seed mode. AR seeds
# commit whole windows; leftover / mask seeds commit ~k tokens per chunk (Jacobi), so they get fewer new tokens.
# Three cases cover each K, each W and each seed mode (every case costs its own compiles, ~20-60 s on 2 cores).
T3_CASES = [(64, 2, "leftover", 1, 48), (64, 4, "mask", 2, 32), (128, 1, "ar", 3, 150)]


@pytest.mark.slow
@pytest.mark.parametrize("width,K,seed_mode,prompt_seed,n_new", T3_CASES)
def test_t3_verified_generation_equals_greedy(model, width, K, seed_mode, prompt_seed, n_new):
    """T3: with the zero-init sidecar and verified commits, chunked generation is baseline greedy, token for token,
    on 50 prompts (different lengths, left-padded), whatever the draft seed and K."""
    rcfg = small_rcfg(chunk_width=width, max_inner_steps=K, seed=seed_mode, rng_seed=prompt_seed)
    sidecar = build_sidecar(model.config, rcfg)
    ids, mask = prompts(50, prompt_seed)
    greedy = generate_greedy(model, ids, n_new, attention_mask=mask, eos_token_id=[])
    result = generate_recursive(model, sidecar, rcfg, ids, n_new, attention_mask=mask, eos_token_id=[])
    chex.assert_trees_all_equal(result.tokens, greedy)
    assert (result.num_tokens == n_new).all()
    m = result.metrics
    assert 1 <= m["avg_refine_steps"] <= K
    assert sum(t.length for t in result.traces[0]) == n_new
    if seed_mode == "ar":  # an AR-seeded draft is already the fixed point: one step, the whole window
        assert m["avg_refine_steps"] == 1 and m["fixed_point_rate"] == 1.0


@pytest.mark.slow
def test_baseline_verified_is_greedy_whatever_the_sidecar(model):
    """baseline_verified uses the (here: live, random) sidecar only as a drafter and commits baseline tokens."""
    rcfg = small_rcfg(max_inner_steps=3, commit_mode="baseline_verified", seed="leftover")
    sidecar = randomize_sidecar(build_sidecar(model.config, rcfg), 11)
    ids, mask = prompts(8, 20)
    greedy = generate_greedy(model, ids, 50, attention_mask=mask, eos_token_id=[])
    result = generate_recursive(model, sidecar, rcfg, ids, 50, attention_mask=mask, eos_token_id=[])
    chex.assert_trees_all_equal(result.tokens, greedy)


@pytest.mark.slow
def test_live_sidecar_with_verified_commits_changes_the_text(model):
    """Verified commits follow the *refined* window's argmax: a live sidecar produces different text (the edits
    reach generation), unlike baseline_verified above."""
    rcfg = small_rcfg(max_inner_steps=2, seed="leftover")
    sidecar = randomize_sidecar(build_sidecar(model.config, rcfg), 12, scale=1.0)
    ids, mask = prompts(4, 21)
    greedy = generate_greedy(model, ids, 40, attention_mask=mask, eos_token_id=[])
    result = generate_recursive(model, sidecar, rcfg, ids, 40, attention_mask=mask, eos_token_id=[])
    assert not np.array_equal(result.tokens, greedy)


@pytest.mark.slow
def test_eos_and_max_new_tokens_per_sample(model):
    """EOS ends each sample separately (EOS kept, pad after), the rest run to exactly max_new_tokens, and the output
    equals greedy decoding with the same EOS."""
    rcfg = small_rcfg(max_inner_steps=2, seed="leftover")
    sidecar = build_sidecar(model.config, rcfg)
    ids, mask = prompts(6, 22)
    free = generate_greedy(model, ids, 45, attention_mask=mask, eos_token_id=[])
    eos = int(free[0, 9])  # a token sample 0 emits at step 10: it must stop there
    greedy = generate_greedy(model, ids, 45, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    result = generate_recursive(model, sidecar, rcfg, ids, 45, attention_mask=mask, eos_token_id=eos,
                                pad_token_id=0)
    chex.assert_trees_all_equal(result.tokens, greedy)
    first = np.flatnonzero(free[0] == eos)[0]
    assert result.num_tokens[0] == first + 1
    assert (result.tokens[0, first + 1:] == 0).all()
    for b in range(6):
        assert sum(t.length for t in result.traces[b]) == result.num_tokens[b]


def test_recursion_disabled_is_plain_greedy(model):
    rcfg = small_rcfg(recursive_enabled=False)
    ids, mask = prompts(3, 23)
    result = generate_recursive(model, None, rcfg, ids, 20, attention_mask=mask, eos_token_id=[])
    chex.assert_trees_all_equal(result.tokens, generate_greedy(model, ids, 20, attention_mask=mask,
                                                                 eos_token_id=[]))
    assert result.metrics == {} and result.traces == [[], [], []]


@pytest.mark.slow
def test_diagnostic_mode_runs_k_steps_with_the_same_output(model):
    rcfg = small_rcfg(max_inner_steps=3, seed="ar")  # stops at step 1 (fixed point) unless diagnostic
    sidecar = build_sidecar(model.config, rcfg)
    ids, mask = prompts(4, 24)
    plain = generate_recursive(model, sidecar, rcfg, ids, 30, attention_mask=mask, eos_token_id=[])
    diag = generate_recursive(model, sidecar, rcfg, ids, 30, attention_mask=mask, eos_token_id=[], diagnostic=True)
    chex.assert_trees_all_equal(plain.tokens, diag.tokens)
    assert diag.metrics["executed_steps"] == 3
    assert plain.metrics["executed_steps"] == 1
    assert plain.metrics["stability_at_k"] is None  # needs all K proposals
    # Zero sidecar: after the stop step the Jacobi iterate only extends the greedy prefix, so what was committed
    # never changes with more steps.
    assert diag.metrics["stability_at_k"] == 1.0
    assert diag.metrics["avg_refine_steps"] == plain.metrics["avg_refine_steps"]


def test_no_recompilation_across_chunks_and_calls(model):
    rcfg = small_rcfg(max_inner_steps=2, seed="leftover")
    sidecar = build_sidecar(model.config, rcfg)
    ids, mask = prompts(2, 25)
    first = generate_recursive(model, sidecar, rcfg, ids, 30, attention_mask=mask, eos_token_id=[])
    assert first.num_chunks > 2
    before = rgen._chunk._cache_size()
    again = generate_recursive(model, sidecar, rcfg, prompts(2, 26)[0], 30, attention_mask=mask, eos_token_id=[])
    assert rgen._chunk._cache_size() == before
    assert again.num_chunks > 2


# ---------------------------------------------------------------------------------------------- constructed cases
def set_head_bias(sidecar, halt_bias: float, length: int | None = None):
    """Force the heads: the halt logit becomes ~halt_bias, the length head's argmax `length`."""
    sidecar.halt_head.w2[...] = jnp.zeros_like(sidecar.halt_head.w2[...])
    sidecar.halt_head.b2[...] = jnp.full_like(sidecar.halt_head.b2[...], halt_bias)
    if length is not None:
        head = sidecar.length_head
        head.w2[...] = jnp.zeros_like(head.w2[...])
        head.b2[...] = jnp.zeros_like(head.b2[...]).at[length].set(10.0)
    return sidecar


def test_learned_commit_with_known_halting_and_lengths(model):
    """Halt head forced to 'halt now' (p ~ 1) and length head to 5: every chunk stops at step 1 voluntarily and
    commits 5 tokens (the last one cut by max_new_tokens): the metrics must say exactly that."""
    rcfg = small_rcfg(max_inner_steps=4, commit_mode="learned", seed="leftover")
    sidecar = set_head_bias(build_sidecar(model.config, rcfg), 20.0, length=5)
    ids, mask = prompts(3, 27)
    result = generate_recursive(model, sidecar, rcfg, ids, 23, attention_mask=mask, eos_token_id=[])
    m = result.metrics
    assert m["num_chunks"] == 3 * 5  # 5 + 5 + 5 + 5 + 3 per sample
    assert m["avg_refine_steps"] == 1.0 and m["commit_rate"] == 1.0 and m["executed_steps"] == 1.0
    assert m["avg_chunk_length"] == pytest.approx(23 / 5)
    hist = m["chunk_length_hist"]
    assert hist[4] == pytest.approx(4 / 5) and hist[2] == pytest.approx(1 / 5)
    assert (result.num_tokens == 23).all()


@pytest.mark.slow
def test_never_halting_runs_to_the_cap_or_the_fixed_point(model):
    """Halt head forced to 'never' (p ~ 0), learned mode: below min_commit_threshold it falls back to the verified
    length; each chunk stops at the fixed point or at K = 2, and is voluntary exactly when it reached v = W."""
    rcfg = small_rcfg(max_inner_steps=2, commit_mode="learned", seed="mask")
    sidecar = set_head_bias(build_sidecar(model.config, rcfg), -20.0)
    ids, mask = prompts(3, 28)
    result = generate_recursive(model, sidecar, rcfg, ids, 12, attention_mask=mask, eos_token_id=[])
    greedy = generate_greedy(model, ids, 12, attention_mask=mask, eos_token_id=[])
    chex.assert_trees_all_equal(result.tokens, greedy)  # the fallback is the verified (exact) length
    for per in result.traces:
        for t in per:
            assert t.voluntary == t.fixed_point
            if not t.fixed_point:
                assert t.stop_step == 2  # forced at the cap K
            assert t.halt_probs.max() < 1e-6
    m = result.metrics
    assert m["commit_rate"] == m["fixed_point_rate"]
    assert m["mean_halt_prob_per_step"][0] < 1e-6
