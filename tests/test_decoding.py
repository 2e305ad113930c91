"""Greedy generation (kimi_jax.decoding) vs transformers' greedy `generate`, EOS handling, retracing, bad inputs.

All irregular-model calls use the same shapes (B=2, prompt 70 tokens, 10 new tokens, one EOS id) so they share a
single compile of the jitted prefill+scan.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

from conftest import forward
from kimi_jax import decoding as gen_mod
from kimi_jax.decoding import generate_greedy

torch = pytest.importorskip("torch")

B, T, N = 2, 70, 10  # the prompt (70 > one 64-token KDA chunk) and the number of new tokens
PAD = 0
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def irregular(reference_factory):
    return reference_factory("irregular")


@pytest.fixture(scope="module")
def prompt(irregular):
    return irregular.random_ids(B, T, seed=7)


@pytest.fixture(scope="module")
def padded_prompt(prompt):
    """Sample 1 is 7 tokens shorter, left-padded with PAD (mask 0)."""
    ids, mask = prompt.copy(), np.ones_like(prompt)
    ids[1, :7] = PAD
    mask[1, :7] = 0
    return ids, mask


def hf_generate(ref, ids, max_new, attention_mask=None, eos_token_id=None, pad_token_id=PAD) -> np.ndarray:
    kwargs = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
    with torch.no_grad():
        out = ref.generate(torch.as_tensor(ids), max_new_tokens=max_new, do_sample=False, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, **kwargs)
    out = out[:, ids.shape[1]:].numpy()
    if out.shape[1] < max_new:  # HF stops early when every sample hit EOS
        out = np.concatenate([out, np.full((out.shape[0], max_new - out.shape[1]), pad_token_id)], axis=1)
    return out


def assert_same_greedy_tokens(case, ids, mask, jax_tokens, hf_tokens, label):
    """Equal tokens, or a first divergence at a numerical near-tie of the reference's top-2 logits."""
    chex.assert_equal_shape([jax_tokens, hf_tokens])
    mask = np.ones_like(ids) if mask is None else mask
    identical = True
    for b in range(ids.shape[0]):
        diverged = np.nonzero(jax_tokens[b] != hf_tokens[b])[0]
        if diverged.size == 0:
            continue
        identical = False
        j = int(diverged[0])
        seq = np.concatenate([ids[b], hf_tokens[b, :j]])[None]
        seq_mask = np.concatenate([mask[b], np.ones(j, mask.dtype)])[None]
        last = case.ref_logits(seq, seq_mask)[0, -1]
        order = np.argsort(last)[::-1]
        gap = float(last[order[0]] - last[order[1]])
        print(f"\n[generate] {label}: sample {b} diverges at new token {j}: jax {jax_tokens[b, j]} vs hf "
              f"{hf_tokens[b, j]}; reference top-2 gap {gap:.3e}")
        assert gap < NEAR_TIE, f"{label}: sample {b} diverges at token {j} without a near-tie (gap {gap:.3e})"
        assert jax_tokens[b, j] in order[:2]
    if identical:
        print(f"\n[generate] {label}: jax tokens == transformers tokens ({jax_tokens.size} tokens)")


def test_greedy_matches_transformers(irregular, prompt):
    m = irregular.model()
    ours = generate_greedy(m, prompt, N, eos_token_id=[], pad_token_id=PAD)
    chex.assert_shape(ours, (B, N))
    assert ours.dtype.kind == "i"
    theirs = hf_generate(irregular.ref, prompt, N)
    assert_same_greedy_tokens(irregular, prompt, None, ours, theirs, "unpadded")
    # The first new token is the argmax of the full forward's last position.
    chex.assert_trees_all_equal(ours[:, 0], irregular.ref_logits(prompt)[:, -1].argmax(-1))


def test_greedy_left_padded_batch_matches_transformers(irregular, prompt, padded_prompt):
    ids, mask = padded_prompt
    m = irregular.model()
    ours = generate_greedy(m, ids, N, attention_mask=mask, eos_token_id=[], pad_token_id=PAD)
    theirs = hf_generate(irregular.ref, ids, N, attention_mask=mask)
    assert_same_greedy_tokens(irregular, ids, mask, ours, theirs, "left-padded")
    # Sample 0 is untouched by sample 1's padding; sample 1 (a shorter prompt) continues differently.
    unpadded = generate_greedy(m, prompt, N, eos_token_id=[], pad_token_id=PAD)
    chex.assert_trees_all_equal(ours[0], unpadded[0])
    assert not np.array_equal(ours[1], unpadded[1])


def test_eos_stops_one_sample_and_pads_while_the_other_continues(irregular, prompt):
    m = irregular.model()
    free = generate_greedy(m, prompt, N, eos_token_id=[], pad_token_id=PAD)
    eos = int(free[0, 3])
    pad = 511 if eos != 511 else 510
    stopped = generate_greedy(m, prompt, N, eos_token_id=eos, pad_token_id=pad)
    expected = free.copy()
    for b in range(B):
        hits = np.nonzero(free[b] == eos)[0]
        if hits.size:
            expected[b, hits[0] + 1:] = pad
    chex.assert_trees_all_equal(stopped, expected)
    # Sample 0 stopped at (or before) step 3 and is padded after; sample 1 kept generating past step 3.
    k0 = int(np.nonzero(free[0] == eos)[0][0])
    assert k0 <= 3 and (stopped[0, k0 + 1:] == pad).all()
    assert eos not in free[1, :4]
    chex.assert_trees_all_equal(stopped[1, :4], free[1, :4])
    # transformers agrees (it pads finished samples with pad_token_id too).
    theirs = hf_generate(irregular.ref, prompt, N, eos_token_id=eos, pad_token_id=pad)
    assert_same_greedy_tokens(irregular, prompt, None, stopped, theirs, "eos")


def test_repeated_calls_do_not_retrace(irregular, prompt):
    if not hasattr(gen_mod._greedy, "_cache_size"):
        pytest.skip("jitted function exposes no _cache_size()")
    m = irregular.model()
    generate_greedy(m, prompt, N, eos_token_id=[], pad_token_id=PAD)
    before = gen_mod._greedy._cache_size()
    other = (prompt + 5) % irregular.cfg.vocab_size
    generate_greedy(m, other, N, eos_token_id=17, pad_token_id=3)
    generate_greedy(m, prompt, N, attention_mask=np.ones_like(prompt), eos_token_id=[2], pad_token_id=PAD)
    assert gen_mod._greedy._cache_size() == before


def test_max_new_tokens_one(reference_factory):
    small = reference_factory("small")
    ids = small.random_ids(2, 20, seed=2)  # the shape test_model compiles the forward for
    m = small.model()
    out = generate_greedy(m, ids, 1, eos_token_id=[])
    chex.assert_shape(out, (2, 1))
    chex.assert_trees_all_equal(out[:, 0], forward(m, ids)[:, -1].argmax(-1))
    chex.assert_trees_all_equal(out, hf_generate(small.ref, ids, 1))


def test_bad_inputs_raise(reference_factory):
    small = reference_factory("small")
    m = small.model()
    ids = small.random_ids(2, 20, seed=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate_greedy(m, ids[0], 4)
    with pytest.raises(ValueError, match="input_ids"):
        generate_greedy(m, ids[None], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(m, ids, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(m, ids, -3)
