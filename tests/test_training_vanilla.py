"""The vanilla stage: gradient accumulation, restricted groups, the logged learning rate, held-out statistics."""

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
from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.scoring import cross_entropy
from kimi_jax.training.vanilla import (PARAM_GROUPS, build_trainer, build_vanilla_trainer, make_optimizer,
                                       param_group, vanilla_lr)

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
    chex.assert_trees_all_close(accum, full, atol=2e-6, rtol=1e-5)


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


def _adam_lrs(tx, params, steps):
    """The learning rate of each update: with a constant gradient, unclipped and without weight decay, Adam's
    bias-corrected step is exactly lr * g / (|g| + eps)."""
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    out = []
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        out.append(-float(jax.tree.leaves(updates)[0].reshape(-1)[0]) * (1 + 1e-8))
    return out


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_logged_learning_rates_are_the_optimizers(schedule):
    params = {"w": jnp.zeros((3,))}
    tx = make_optimizer(0.5, warmup_steps=3, total_steps=12, weight_decay=0.0, clip_norm=None, schedule=schedule)
    got = _adam_lrs(tx, params, 12)
    want = [vanilla_lr(0.5, 3, 12, schedule, count) for count in range(12)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert want[0] == 0.0 and max(want) == pytest.approx(0.5)


@pytest.mark.slow
def test_held_out_stats_equal_the_full_logits_cross_entropy_and_accuracy():
    """The trainer's held-out statistics (the blocked scorer, no [B, T, V] logits) against the full logits."""
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    trainer, state = build_vanilla_trainer(model, mesh, dtype_name="float32", batch_size=4, eval_batch_size=4,
                                           opts=RunOptions(remat=False), lr=1e-3, warmup_steps=0, num_steps=1)
    b = batch()
    got = trainer.eval_stats(state, b, key=None)
    logits_BTV = model(jnp.asarray(b["input_ids"]))
    nll, tokens = cross_entropy(logits_BTV, jnp.asarray(b["targets"]), jnp.asarray(b["weights"]))
    correct = jnp.sum((jnp.argmax(logits_BTV, axis=-1) == b["targets"]) * b["weights"])
    chex.assert_trees_all_close(got, {"nll": float(nll), "tokens": float(tokens), "correct": float(correct)},
                                rtol=1e-5)
    assert got["tokens"] == float(b["weights"].sum())
