"""Expert parallelism (layers/expert_parallel + the MoE layer) on 8 fake CPU devices: outputs and every gradient
equal the single-device layer, for balanced, skewed and empty-device routing, every local dispatch, tokens split
over the expert axis (all-to-all) or replicated over it (decode: partial outputs summed)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import sharding
from kimi_jax.config import tiny
from kimi_jax.layers.moe import MoE, expert_parallel_size
from kimi_jax.training.vanilla import batch_spec

TOKENS = 64


def make_layer(routing: str, **overrides):
    cfg = tiny(**{"num_experts": 16, "num_experts_per_token": 3, **overrides})
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    bias = np.zeros(cfg.num_experts, np.float32)
    if routing == "skewed":  # every token picks expert 0, most also expert 1: devices of experts 2+ get ~nothing
        bias[0], bias[1] = 10.0, 0.5
    elif routing == "two_experts":  # all tokens on experts 0 and 5 only: most devices receive no rows at all
        bias[0], bias[5] = 10.0, 10.0
    layer.correction_bias[...] = jnp.asarray(bias)
    return cfg, layer


def batch(seed=0, B=4):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, TOKENS // B, 64)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "dispatch", "sharding_"))
def value_and_grads(graphdef, params, x, ct, dispatch, sharding_):
    def loss(params, x):
        out = nnx.merge(graphdef, params)(x, dispatch, sharding_)
        return jnp.sum(out * ct), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return out, grads


def compare(layer, mesh_spec, dispatch, x, batch_axes="auto"):
    graphdef, params = nnx.split(layer)
    ct = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    ref_out, ref_grads = value_and_grads(graphdef, params, x, ct, "dense", None)
    mesh = sharding.make_mesh(mesh_spec)
    if batch_axes == "auto":
        batch_axes = batch_spec(mesh, x.shape[0]).spec[0]
    token_sharding = NamedSharding(mesh, P(batch_axes, None, None))
    # Under the model's name for the layer ("ffn"): the MoE rules then apply (experts over `expert`, as in the
    # model); a bare layer's paths match no rule, and state_shardings refuses to guess.
    placed = jax.device_put(params, sharding.state_shardings({"ffn": params}, mesh)["ffn"])
    chex.assert_equal(placed["w_gate"][...].sharding.spec[0], "expert" if "expert" in mesh_spec and
                      layer.w_gate[...].shape[0] % mesh.shape["expert"] == 0 else None)
    out, grads = value_and_grads(graphdef, placed, jax.device_put(x, token_sharding), ct, dispatch, token_sharding)
    scale = float(jnp.abs(ref_out).max())
    chex.assert_trees_all_close(out, ref_out, atol=1e-5 * scale, rtol=0)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    worst = 0.0
    for (path, want), got in zip(flat_ref, jax.tree.leaves(grads)):
        want_max = max(float(jnp.abs(want).max()), 1e-30)
        worst = max(worst, float(jnp.abs(got - want).max()) / want_max)
        chex.assert_trees_all_close(got, want, rtol=0, atol=1e-5 * want_max,
                                    custom_message=f"gradient {jax.tree_util.keystr(path)}")
    return float(jnp.abs(out - ref_out).max()) / scale, worst


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4", "fsdp=2,expert=4"])
@pytest.mark.parametrize("routing", ["balanced", "skewed", "two_experts"])
def test_all_to_all_equals_one_device(mesh_spec, routing):
    cfg, layer = make_layer(routing)
    assert expert_parallel_size(sharding.make_mesh(mesh_spec), cfg.num_experts) == int(mesh_spec[-1])
    out_err, grad_err = compare(layer, mesh_spec, "auto", batch(B=8))
    print(f"\n  {mesh_spec} {routing}: output {out_err:.1e}, worst gradient {grad_err:.1e} (relative to max)")


@pytest.mark.parametrize("dispatch", ["dense", "tiled", "ragged", "gmm"])
def test_every_local_dispatch(dispatch):
    _, layer = make_layer("skewed")
    compare(layer, "data=2,expert=4", dispatch, batch(B=8))


def test_grouped_routing_with_correction_bias():
    # The 48B's routing: expert groups, top groups first, weights from the biased scores (hub remote code).
    _, layer = make_layer("balanced", num_expert_group=4, topk_group=2, router_weights_use_correction_bias=True)
    layer.correction_bias[...] = jnp.asarray(np.random.default_rng(3).normal(size=16), jnp.float32)
    compare(layer, "fsdp=2,expert=4", "auto", batch(B=8))


@pytest.mark.parametrize("dispatch", ["auto", "gmm"])
def test_tokens_replicated_over_the_expert_axis(dispatch):
    # Decode with a batch smaller than the mesh: every device routes the same tokens, computes its own experts'
    # share, and the shares are summed over the axis.
    _, layer = make_layer("balanced")
    compare(layer, "data=2,expert=4", dispatch, batch(B=2), batch_axes="data")
    compare(layer, "expert=8", dispatch, batch(B=1), batch_axes=None)


def test_experts_that_do_not_divide_the_axis_stay_replicated():
    assert expert_parallel_size(sharding.make_mesh("expert=8"), 12) == 1
    _, layer = make_layer("balanced", num_experts=12)
    compare(layer, "expert=8", "auto", batch(B=8))


@pytest.mark.parametrize("k, n, E_loc", [(8, 8, 32), (8, 4, 2), (2, 4, 16)])
def test_balanced_routing_fills_the_share_of_the_receive_buffer_the_planner_assumes(k, n, E_loc):
    """Every device sends T k rows spread evenly over all n x E_loc experts: each receives T k of its worst-case
    buffer of n T min(k, E_loc) rows, the fraction `balanced_fill` gives the planner."""
    from kimi_jax.layers.expert_parallel import balanced_fill, receive_rows
    from kimi_jax.ops.expert_exchange import received_experts

    T = 4 * n * E_loc
    counts_nE = jnp.full((n, n * E_loc), T * k // (n * E_loc), jnp.int32)
    R = receive_rows(T, k, n, E_loc)
    for me in range(n):
        filled = int(jnp.sum(received_experts(counts_nE, me, E_loc, R) < E_loc))
        assert filled == T * k
        assert filled / R == pytest.approx(balanced_fill(k, n, E_loc))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec, B", [("data=2,expert=4", 8), ("data=2,expert=4", 2), ("expert=8", 1)])
def test_prefill_and_decode_on_an_expert_mesh_equal_one_device(mesh_spec, B):
    """The whole model with its caches, experts split over the mesh: prefill logits, four decode steps' logits and
    greedy generation equal one device. B = 8 splits tokens over the expert axis too (all-to-all in prefill and in
    every one-token decode step); B = 2 and 1 replicate them over it (partial outputs summed)."""
    from kimi_jax.decoding import generate_greedy
    from kimi_jax.model import KimiLinearForCausalLM, RunOptions

    cfg = tiny(num_experts=16, num_experts_per_token=3)
    model = KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(B, 24)), jnp.int32)
    mesh = sharding.make_mesh(mesh_spec)
    acts = NamedSharding(mesh, P(batch_spec(mesh, B).spec[0], None, None))
    graphdef, params = nnx.split(model)
    placed = jax.device_put(params, sharding.state_shardings(params, mesh))

    @functools.partial(jax.jit, static_argnames=("opts",))
    def prefill_then_decode(params, ids, opts):
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(ids.shape[0], ids.shape[1] + 4)
        logits, cache = model(ids, cache=cache, opts=opts)
        steps = []
        tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
        for _ in range(4):
            step_logits, cache = model(tok, cache=cache, opts=opts)
            steps.append(step_logits[:, 0])
            tok = jnp.argmax(step_logits[:, -1], -1)[:, None].astype(jnp.int32)
        return logits, jnp.stack(steps, 1)

    want = prefill_then_decode(params, ids, RunOptions())
    got = prefill_then_decode(placed, jax.device_put(ids, NamedSharding(mesh, P(*acts.spec[:2]))),
                              RunOptions(activation_sharding=acts))
    for g, w in zip(got, want):
        chex.assert_trees_all_close(g, w, atol=1e-5 * float(jnp.abs(w).max()), rtol=0)
    tokens = generate_greedy(nnx.merge(graphdef, placed), ids, 6, eos_token_id=[],
                             opts=RunOptions(activation_sharding=acts))
    chex.assert_trees_all_equal(tokens, generate_greedy(model, ids, 6, eos_token_id=[]))
