"""ops/grouped_matmul: every implementation equals jax.lax.ragged_dot, forward and gradients, empty groups included."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.ops import grouped_matmul as gm


def case(m=50, k=32, n=24, sizes=(10, 0, 20, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32)


def loss(impl, x, w, sizes, ct):
    return jnp.sum(gm.grouped_matmul(x, w, sizes, impl=impl) * ct)


@pytest.mark.parametrize("impl", ["gmm", "megablox"])
@pytest.mark.parametrize("m,k,n,sizes", [(50, 32, 24, (10, 0, 20, 6)),  # rows past the groups' end, an empty group
                                         (64, 40, 16, (0, 64, 0, 0)),  # one group takes every row
                                         (7, 16, 8, (0, 0, 0, 0))])  # no rows at all
def test_kernel_equals_ragged_dot_values_and_gradients(impl, m, k, n, sizes):
    # On CPU "gmm" is megablox's Pallas TPU kernel in interpret mode: the kernel's own code, run by the interpreter.
    assert gm.gmm_backend() == "megablox"
    print(f"\n  code path: {gm.gmm_backend()} (Pallas interpret mode on {jax.default_backend()})")
    x, w, g = case(m, k, n, sizes)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=(m, n)), jnp.float32)
    out = jax.jit(gm.grouped_matmul, static_argnames="impl")(x, w, g, impl=impl)
    ref = jax.lax.ragged_dot(x, w, g)
    chex.assert_trees_all_close(out, ref, atol=1e-5 * float(jnp.abs(ref).max() + 1), rtol=0)
    filled = int(sum(sizes))
    chex.assert_trees_all_equal(out[filled:], jnp.zeros_like(out[filled:]))  # past the groups: zero, as ragged_dot
    grads = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(impl, x, w, g, ct)
    ref_grads = jax.grad(loss, argnums=(1, 2))("ragged", x, w, g, ct)
    chex.assert_tree_all_finite(grads)
    for got, want in zip(grads, ref_grads):
        chex.assert_trees_all_close(got, want, atol=1e-5 * float(jnp.abs(want).max() + 1), rtol=0)


def test_tiling_respects_mosaic_rules():
    # TPU: square 128 tiles over k and n (the backward swaps them); rows in tiles of at most 128, multiples of 8.
    assert gm.megablox_tiling(4096, 2304, 1024, "tpu") == (128, 128, 128)
    assert gm.megablox_tiling(20, 96, 80, "tpu") == (24, 128, 128)
    # Interpret mode: one tile over k and n.
    assert gm.megablox_tiling(300, 40, 24, "cpu") == (128, 40, 24)


def test_backends_and_bad_impl():
    assert gm.gmm_backend("tpu") == "megablox"
    # On a CPU host JAX's first device is no Hopper GPU: mosaic_gpu is chosen only where one is.
    assert not gm.hopper_gpu()
    assert gm.gmm_backend("gpu") == ("tokamax" if gm.tokamax_available() else "ragged")
    x, w, g = case()
    with pytest.raises(ValueError, match="not one of"):
        gm.grouped_matmul(x, w, g, impl="cutlass")


def reference_kernels():
    """Stand-ins with the contracts of JAX's Hopper kernels (no Mosaic GPU on CPU): grouped x @ w (or x @ w^T per
    group), and the per-group x^T dy reduced over each group's rows."""
    def forward(x_MK, w_GKN, group_sizes_G, transpose_rhs=False):
        return jax.lax.ragged_dot(x_MK, jnp.swapaxes(w_GKN, 1, 2) if transpose_rhs else w_GKN, group_sizes_G)

    def weight_gradient(x_MK, dy_MN, group_sizes_G):
        ends = jnp.cumsum(group_sizes_G)
        row = jnp.arange(x_MK.shape[0])[:, None]
        member_MG = ((row >= ends - group_sizes_G) & (row < ends)).astype(x_MK.dtype)
        return jnp.einsum("mg,mk,mn->gkn", member_MG, x_MK, dy_MN)

    return forward, weight_gradient


@pytest.mark.parametrize("m,k,n,sizes", [(50, 32, 24, (10, 0, 20, 6)), (64, 40, 16, (0, 64, 0, 0))])
def test_mosaic_gpu_custom_vjp_wiring(monkeypatch, m, k, n, sizes):
    """The "mosaic_gpu" path's VJP (input gradient = the forward kernel with the weights transposed, weight gradient
    = the transposed kernel), run with reference kernels in place of JAX's Hopper ones: values and gradients equal
    ragged_dot's. The kernels themselves run only on an H100/H200 (README: bench moe)."""
    monkeypatch.setattr(gm, "mosaic_gpu_kernels", reference_kernels)
    x, w, g = case(m, k, n, sizes)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=(m, n)), jnp.float32)
    out = gm.grouped_matmul(x, w, g, impl="mosaic_gpu")
    chex.assert_trees_all_close(out, jax.lax.ragged_dot(x, w, g), atol=1e-5 * float(jnp.abs(out).max() + 1))
    grads = jax.grad(loss, argnums=(1, 2))("mosaic_gpu", x, w, g, ct)
    ref_grads = jax.grad(loss, argnums=(1, 2))("ragged", x, w, g, ct)
    for got, want in zip(grads, ref_grads):
        chex.assert_trees_all_close(got, want, atol=1e-5 * float(jnp.abs(want).max() + 1), rtol=0)
