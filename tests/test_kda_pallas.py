"""The Pallas KDA kernels (`kimi_jax.ops.kda_pallas`, via `kda_chunked(impl=...)`) in Pallas interpret mode on CPU:
outputs, final and per-chunk states and every gradient against the spec's token recurrence in float64, per gate
regime; bf16 inputs; padded head dims; the model on them; and both kernels' real lowerings (Mosaic for TPU, Triton
for GPU), which run on a CPU host through `jax.export`.

Gate regimes (one per batch element, so one call covers all and errors are reported per regime):
  moderate  -|N(0, 1)| per token and channel
  spikes    moderate, with 5% of entries set to -1000 or -2000 (single tokens whose decay underflows to 0)
  held      moderate, with a quarter of each head's channels at -1000..-2000 on every token
  layer     the layer's own gate -exp(A_log) softplus(f + dt_bias), A_log up to 6.5 (exp 6.5 = 665 per unit)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kda_reference import kda_reference_np, make_inputs, rel_err, softplus_np
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM, RunOptions, forward
from kimi_jax.ops.kda import kda_chunked, resolve_kda_impl
from kimi_jax.ops.kda_pallas import padded_dim

IMPLS = ("pallas_tpu", "pallas_gpu")
REGIMES = ("moderate", "spikes", "held", "layer")
C = 64
TOL = 1e-5


def gates(rng, regime: str, T: int, H: int, K: int):
    g = -np.abs(rng.standard_normal((T, H, K)))
    if regime == "spikes":
        hit = rng.random((T, H, K)) < 0.05
        g = np.where(hit, rng.choice([-1000.0, -2000.0], size=(T, H, K)), g)
    elif regime == "held":
        held = np.zeros((H, K), bool)
        for h in range(H):
            held[h, rng.choice(K, K // 4, replace=False)] = True
        g = np.where(held[None], rng.uniform(-2000.0, -1000.0, (T, H, K)), g)
    elif regime == "layer":
        A_log = rng.uniform(0.0, 6.5, H)
        A_log[0] = 6.5
        f = rng.standard_normal((T, H, K)) * 3.0
        g = -np.exp(A_log)[None, :, None] * softplus_np(f + rng.standard_normal((H, K)))
    return g


def regime_inputs(seed: int, T: int, H: int, K: int, V: int, with_state: bool):
    """q, k, v, g, beta, state (fp32 numpy; state None without), batch element b in regime REGIMES[b]."""
    return make_inputs(seed, T, REGIMES, with_state, H=H, K=K, V=V, gates=gates)


def chunk_states_np(states_BTHKV, state0_BHKV, T: int):
    """The state before each chunk n (after n * C tokens; n = 0: the initial state) from the per-token states."""
    first = np.zeros_like(states_BTHKV[:, 0]) if state0_BHKV is None else np.asarray(state0_BHKV, np.float64)
    return np.stack([first] + [states_BTHKV[:, n * C - 1] for n in range(1, -(-T // C))], axis=1)


def loss_grads_float64(xs, state, w_o, w_s):
    """Gradients (q, k, v, g, beta, state) of sum(o w_o) + sum(sin(S_final)) + sum(states_before_chunks w_s) through
    the token recurrence, torch float64 autograd."""
    import torch

    T = xs[0].shape[1]
    leaves = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (*xs, state)]
    q, k, v, g, beta, S = leaves
    norm = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    q, k = norm(q) * xs[0].shape[-1] ** -0.5, norm(k)
    outs, before = [], [S]
    for t in range(T):
        if t and t % C == 0:
            before.append(S)
        S = S * torch.exp(g[:, t])[..., None]
        delta = (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    loss = ((torch.stack(outs, 1) * torch.from_numpy(w_o.astype(np.float64))).sum() + torch.sin(S).sum()
            + (torch.stack(before, 1) * torch.from_numpy(w_s.astype(np.float64))).sum())
    loss.backward()
    return [a.grad.numpy() for a in leaves]


def kernel(impl, **kw):
    return jax.jit(lambda *a: kda_chunked(*a, chunk_size=C, impl=impl, **kw))


# ------------------------------------------------------------------------------------------------- vs float64
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_and_states_match_float64_per_gate_regime(impl, with_state):
    """T = 150 (not a multiple of 64), K = 24, V = 40 (padded to 32 / 64 inside: zero channels are inert)."""
    T = 150
    (q, k, v, g, beta), state = regime_inputs(1, T, H=2, K=24, V=40, with_state=with_state)
    assert g[1].min() <= -2000 and g[2].min() < -1000 and g[3].min() < -1000
    o, S, states = kernel(impl, return_chunk_states=True)(q, k, v, g, beta, state)
    o_ref, S_ref, per_token = kda_reference_np(q, k, v, g, beta, state)
    states_ref = chunk_states_np(per_token, state, T)
    for ours, ref in ((o, o_ref), (S, S_ref), (states, states_ref)):
        chex.assert_equal_shape([ours, ref])
    chex.assert_tree_all_finite((o, S, states))
    errs = {name: rel_err(x, ref, axis=0) for name, x, ref in
            (("o", o, o_ref), ("final", S, S_ref), ("chunk states", states[:, 1:], states_ref[:, 1:]))}
    chex.assert_trees_all_equal(np.asarray(states[:, 0]),
                                np.zeros_like(S_ref, np.float32) if state is None else state)
    for name, e in errs.items():
        print(f"\n  {impl} {name}: " + ", ".join(f"{r} {x:.1e}" for r, x in zip(REGIMES, e)), end="")
        assert np.all(e <= TOL), (name, dict(zip(REGIMES, e)))


@pytest.mark.slow
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_gradient_matches_float64_per_gate_regime(impl, with_state):
    """d/d(q, k, v, g, beta, initial state) of a loss reading the outputs, the final state and the state before every
    chunk (the recursive stage's snapshots), against torch float64 autograd through the token recurrence."""
    T = 150
    (q, k, v, g, beta), state = regime_inputs(2, T, H=2, K=24, V=40, with_state=True)
    rng = np.random.default_rng(3)
    w_o = rng.standard_normal(v.shape).astype(np.float32)
    w_s = rng.standard_normal((len(REGIMES), -(-T // C), 2, 24, 40)).astype(np.float32)
    if not with_state:
        state = np.zeros_like(state)

    def loss(q, k, v, g, beta, S0):
        o, S, states = kda_chunked(q, k, v, g, beta, S0, chunk_size=C, impl=impl, return_chunk_states=True)
        return jnp.sum(o * w_o) + jnp.sum(jnp.sin(S)) + jnp.sum(states * w_s)

    ours = jax.jit(jax.grad(loss, argnums=range(6)))(q, k, v, g, beta, state)
    truth = loss_grads_float64((q, k, v, g, beta), state, w_o, w_s)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), ours, truth):
        chex.assert_equal_shape([a, b], custom_message=name)
        chex.assert_tree_all_finite(a)
        e = rel_err(a, b, axis=0)
        print(f"\n  {impl} d{name}: " + ", ".join(f"{r} {x:.1e}" for r, x in zip(REGIMES, e)), end="")
        assert np.all(e <= TOL), (name, dict(zip(REGIMES, e)))


@pytest.mark.parametrize("impl", IMPLS)
def test_real_head_dims_and_short_sequences(impl):
    """K = V = 128 (the 48B's) at T = 130, and T = 1 and 5 (one partial chunk), against float64."""
    for T, K in ((130, 128), (1, 16), (5, 16)):
        (q, k, v, g, beta), state = regime_inputs(4, T, H=1, K=K, V=K, with_state=True)
        o, S = kernel(impl)(q, k, v, g, beta, state)
        o_ref, S_ref, _ = kda_reference_np(q, k, v, g, beta, state)
        assert rel_err(o, o_ref) <= TOL and rel_err(S, S_ref) <= TOL, (T, K)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl):
    """bf16 q, k, v (g and beta are fp32 in the layer). The kernel upcasts before any arithmetic, so it must equal the
    fp32 kernel on the same (bf16-rounded) values up to fp32 summation order (1e-5, as the fp32 tests). Against the
    unrounded fp32 inputs the only error is the inputs' rounding (2^-9 relative per element), carried through the l2
    norms and the delta rule: the bound 2e-2 is ~4x the largest seen (5e-3 over these regimes)."""
    (q, k, v, g, beta), state = regime_inputs(5, 150, H=2, K=32, V=32, with_state=True)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    o16, S16 = kernel(impl)(bf(q), bf(k), bf(v), g, beta, state)
    o_r, S_r = kernel(impl)(*(np.asarray(bf(x), np.float32) for x in (q, k, v)), g, beta, state)
    o32, S32 = kernel(impl)(q, k, v, g, beta, state)
    chex.assert_type([o16, S16], jnp.float32)
    assert rel_err(o16, o_r) <= TOL and rel_err(S16, S_r) <= TOL
    e_o, e_S = rel_err(o16, o32, axis=0), rel_err(S16, S32, axis=0)
    print(f"\n  {impl} bf16 vs fp32 inputs: o " + ", ".join(f"{x:.1e}" for x in e_o) + " | S "
          + ", ".join(f"{x:.1e}" for x in e_S), end="")
    assert np.all(e_o <= 2e-2) and np.all(e_S <= 2e-2)
    grads = jax.grad(lambda q, k, v: jnp.sum(kda_chunked(q, k, v, g, beta, state, impl=impl)[0]), argnums=(0, 1, 2))
    dq, dk, dv = jax.jit(grads)(bf(q), bf(k), bf(v))
    chex.assert_type([dq, dk, dv], jnp.bfloat16)
    chex.assert_tree_all_finite((dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)))


# ------------------------------------------------------------------------------------------------- contract
def test_impl_resolution_and_checks():
    assert resolve_kda_impl("auto", "cpu") == "xla"
    assert resolve_kda_impl("auto", "tpu") == "pallas_tpu"
    assert resolve_kda_impl("auto", "gpu") == "pallas_gpu"
    assert resolve_kda_impl("pallas_gpu", "tpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="kda impl"):
        resolve_kda_impl("triton")
    (q, k, v, g, beta), _ = regime_inputs(6, 20, H=1, K=16, V=16, with_state=False)
    with pytest.raises(ValueError, match="chunk_size"):
        kda_chunked(q, k, v, g, beta, chunk_size=8, impl="pallas_tpu")
    assert [padded_dim(d) for d in (8, 16, 24, 64, 72, 128)] == [16, 16, 32, 64, 128, 128]


@pytest.mark.slow
def test_model_logits_equal_the_xla_path():
    """The tiny model (KDA, MLA, MoE) with a left-padded row: logits with either kernel equal the XLA scan's."""
    model = KimiLinearForCausalLM(tiny(num_hidden_layers=3, mla_layers=(1,), first_k_dense=1), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, 512, (2, 90)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[1, :7] = False
    ref = np.asarray(forward(model, ids, attention_mask=mask, opts=RunOptions(kda_impl="xla")))
    for impl in IMPLS:
        logits = np.asarray(forward(model, ids, attention_mask=mask, opts=RunOptions(kda_impl=impl)))
        diff = float(np.abs(logits - ref).max())
        print(f"\n  model logits {impl} vs xla: {diff:.1e} (max |logit| {np.abs(ref).max():.1f})", end="")
        chex.assert_trees_all_close(logits, ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


# ------------------------------------------------------------------------------------------------- lowerings
@pytest.mark.parametrize("impl, platform, target", [("pallas_tpu", "tpu", "tpu_custom_call"),
                                                    ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_their_platform(impl, platform, target):
    """Forward and backward at the 48B's head dims (K = V = 128, bf16 q/k/v) lower through Pallas' real backend,
    Mosaic for TPU or Triton for GPU, not interpret mode: `jax.export` for that platform on this CPU host. (Compiling
    the Mosaic kernels for a v5p needs libtpu: `experiments.plan --kda_impl pallas_tpu --topology ...`.)"""
    shape = lambda *s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d)
    args = (shape(1, 200, 2, 128), shape(1, 200, 2, 128), shape(1, 200, 2, 128), shape(1, 200, 2, 128, d=jnp.float32),
            shape(1, 200, 2, d=jnp.float32), shape(1, 2, 128, 128, d=jnp.float32))

    def loss(*a):
        o, S = kda_chunked(*a, impl=impl, interpret=False)
        return jnp.sum(o) + jnp.sum(S)

    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=range(6))), platforms=[platform],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    text = exported.mlir_module()
    assert text.count(target) >= 2  # the forward kernel and the backward kernel
    assert "kda_chunk_fwd" in text and "kda_chunk_bwd" in text
