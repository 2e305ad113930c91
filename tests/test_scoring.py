"""kimi_jax.scoring: the chunked training loss and the blocked per-token scores of evaluation equal the full
[B, T, V] logits' values (and gradients), with and without a mesh, and move the LM head once."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import sharding
from kimi_jax.scoring import (chunked_cross_entropy, cross_entropy, make_scorer, model_token_scores, token_scores,
                              weighted_totals)


@pytest.mark.slow
@pytest.mark.parametrize("T, tokens_per_step", [(37, 16), (64, 512), (5, 2)])
def test_chunked_cross_entropy_equals_full_logits(T, tokens_per_step):
    """The scan over sequence chunks (with padding when C does not divide T) gives the full-logits NLL, token
    count and gradients, including masked tokens."""
    rng = np.random.default_rng(T)
    B, D, V = 3, 8, 50
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)

    def full(h, head):
        return cross_entropy(jnp.einsum("btd,dv->btv", h, head), targets, weights)

    def chunked(h, head):
        return chunked_cross_entropy(h, head, targets, weights, tokens_per_step=tokens_per_step)

    (nll_f, n_f), (nll_c, n_c) = full(h, head), chunked(h, head)
    assert float(n_c) == float(n_f) == float(weights.sum())
    np.testing.assert_allclose(float(nll_c), float(nll_f), rtol=1e-6)
    g_f = jax.grad(lambda *a: full(*a)[0], argnums=(0, 1))(h, head)
    g_c = jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1))(h, head)
    for a, b in zip(g_c, g_f):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens_per_step", [64, 16])
def test_chunked_loss_moves_the_head_once_per_step(tokens_per_step):
    """On an fsdp mesh the head is gathered once and its gradient leaves the scan once: the loss's collective bytes
    do not grow with the number of chunks (they did: a gather and a gradient all-reduce per chunk)."""
    from kimi_jax import hlo_costs

    mesh = sharding.make_mesh("fsdp=8")
    B, T, D, V = 8, 64, 64, 512
    act = NamedSharding(mesh, P("fsdp", None, None))
    head_sh = NamedSharding(mesh, P("fsdp", None))
    rows = NamedSharding(mesh, P("fsdp", None))

    def loss(h, head, targets, weights):
        nll, n = chunked_cross_entropy(h, head, targets, weights, tokens_per_step=tokens_per_step,
                                       activation_sharding=act)
        return nll / n

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(act, head_sh, rows, rows),
                   out_shardings=(NamedSharding(mesh, P()), (act, head_sh)))
    args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.float32))
    stats = hlo_costs.analyze(step.lower(*args).compile().as_text(), num_devices=8)
    # ... and the same values and gradients as without a mesh.
    rng = np.random.default_rng(0)
    real = (jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32), jnp.asarray(rng.standard_normal((D, V)) * 0.1,
            jnp.float32), jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
            jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32))
    plain = jax.value_and_grad(lambda h, head, t, w: (lambda r: r[0] / r[1])(
        chunked_cross_entropy(h, head, t, w, tokens_per_step=tokens_per_step)), argnums=(0, 1))(*real)
    chex.assert_trees_all_close(step(*real), plain, rtol=1e-5, atol=1e-6)
    moved = sum(stats.bytes.values())
    head_bytes = D * V * 4
    chunks = T // (tokens_per_step * 8 // B)
    print(f"\n  {chunks} chunks: {moved / head_bytes:.2f} head sizes moved per device")
    assert moved <= 3 * head_bytes  # a gather (7/8 head) and a gradient reduction (<= 2 x 7/8), not per chunk


def full_scores(h, head, targets):
    logits = jnp.einsum("btd,dv->btv", h, head, precision="highest")
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jnp.argmax(logits, -1) == targets


@pytest.mark.parametrize("B, T, tokens_per_block", [(3, 37, 16), (2, 64, 1024), (4, 5, 2), (1, 9, 9)])
def test_token_scores_equal_full_logits(B, T, tokens_per_block):
    """Blocks of positions (padded when they do not divide T) give every position's NLL and argmax hit."""
    rng = np.random.default_rng(T)
    D, V = 8, 50
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    nll, hit = jax.jit(lambda *a: token_scores(*a, tokens_per_block=tokens_per_block))(h, head, targets)
    chex.assert_shape((nll, hit), (B, T))
    want_nll, want_hit = full_scores(h, head, targets)
    chex.assert_trees_all_close(nll, want_nll, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(hit, want_hit)
    totals = weighted_totals(nll, hit, (targets % 3 > 0).astype(jnp.float32))
    w = np.asarray(targets % 3 > 0, np.float64)
    np.testing.assert_allclose(float(totals["nll"]), float(np.sum(np.asarray(want_nll) * w)), rtol=1e-5)
    assert float(totals["tokens"]) == w.sum() and float(totals["correct"]) == float(np.sum(np.asarray(want_hit) * w))


def test_token_scores_per_batch_shard_gather_the_head_once():
    """On an fsdp mesh each device scores its own rows with the head gathered once, however many blocks: the
    collective bytes stay about one head, and the values are those without a mesh."""
    from kimi_jax import hlo_costs

    mesh = sharding.make_mesh("fsdp=8")
    B, T, D, V = 8, 64, 64, 512
    act = NamedSharding(mesh, P("fsdp", None, None))
    rows = NamedSharding(mesh, P("fsdp", None))
    fn = jax.jit(lambda h, head, t: token_scores(h, head, t, tokens_per_block=16, activation_sharding=act),
                 in_shardings=(act, NamedSharding(mesh, P("fsdp", None)), rows), out_shardings=(rows, rows))
    args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32))
    stats = hlo_costs.analyze(fn.lower(*args).compile().as_text(), num_devices=8)
    assert sum(stats.bytes.values()) <= 1.5 * D * V * 4  # 16 blocks, one gather of 7/8 of the head
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((D, V)) * 0.1, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    chex.assert_trees_all_close(fn(h, head, t), token_scores(h, head, t), rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def tiny_model():
    from kimi_jax.config import tiny
    from kimi_jax.model import KimiLinearForCausalLM

    return KimiLinearForCausalLM(tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=61),
                                 rngs=nnx.Rngs(0))


class ModelTokenScoresTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_match_the_forward_with_left_padding(self):
        """The model's scores under a left-padding attention mask equal the full forward's log-softmax at every
        unmasked position, jitted or not, and so does the host-side scorer."""
        import kimi_jax

        model = tiny_model()
        rng = np.random.default_rng(1)
        ids = rng.integers(3, 61, (2, 12)).astype(np.int32)
        mask = np.ones((2, 12), bool)
        mask[1, :4] = False
        targets = rng.integers(0, 61, (2, 12)).astype(np.int32)
        graphdef, state = nnx.split(model)

        @self.variant
        def score(state, ids, targets, mask):
            return model_token_scores(nnx.merge(graphdef, state), ids, targets, attention_mask_BT=mask,
                                      tokens_per_block=8)

        nll, hit = score(state, jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(mask))
        chex.assert_shape((nll, hit), (2, 12))
        chex.assert_tree_all_finite(nll)
        want_nll, want_hit = full_scores_from_logits(kimi_jax.forward(model, ids, attention_mask=mask), targets)
        chex.assert_trees_all_close(np.asarray(nll)[mask], np.asarray(want_nll)[mask], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_equal(np.asarray(hit)[mask], np.asarray(want_hit)[mask])
        host_nll, host_hit = make_scorer(model)(ids, targets, mask)
        assert host_nll.dtype == np.float64 and host_hit.dtype == bool
        chex.assert_trees_all_close(host_nll[mask], np.asarray(want_nll, np.float64)[mask], rtol=1e-5, atol=1e-5)


def full_scores_from_logits(logits, targets):
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0], \
        jnp.argmax(logits, -1) == jnp.asarray(targets)
