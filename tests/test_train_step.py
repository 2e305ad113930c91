"""The vanilla train step: gradient accumulation and restricted fine-tuning."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kimi_jax import sharding
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.train_step import PARAM_GROUPS, build_trainer, chunked_cross_entropy, cross_entropy, param_group

CFG = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=1)


def batch():
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (4, 33)).astype(np.int32)
    weights = np.ones((4, 32), np.float32)
    weights[0, :20] = 0  # uneven token counts per micro-batch: the accumulation must weight by tokens
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": weights}


def one_step(tx, **kw):
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    trainer, params, opt = build_trainer(model, tx, mesh, 4, **kw)
    before = jax.tree.map(np.asarray, params)
    params, opt, metrics = trainer.step_fn(params, opt, batch())
    return before, jax.tree.map(np.asarray, params), metrics


@pytest.mark.slow
def test_grad_accumulation_equals_the_full_batch():
    """With SGD the update is linear in the gradient, so 2 micro-batches must reproduce the full-batch step."""
    _, full, m_full = one_step(optax.sgd(1.0))
    _, accum, m_accum = one_step(optax.sgd(1.0), grad_accum=2)
    assert float(m_accum["loss"]) == pytest.approx(float(m_full["loss"]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accum)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_restricted_groups_leave_the_rest_bit_identical():
    before, after, _ = one_step(optax.adamw(1e-2, weight_decay=0.1), trainable_groups=("mixers",))
    moved = set()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        if not np.array_equal(a, b):
            moved.add(param_group(path))
    assert moved == {"mixers"}


def test_every_parameter_has_a_group_and_bad_inputs_fail():
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))
    groups = {param_group(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
    assert groups == set(PARAM_GROUPS)
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_trainer(model, optax.sgd(1.0), mesh, 4, trainable_groups=("attention",))
    with pytest.raises(ValueError, match="grad_accum 3"):
        build_trainer(model, optax.sgd(1.0), mesh, 4, grad_accum=3)


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
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kimi_jax import hlo_costs, sharding

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
