"""Per-module parity with transformers' KimiLinear modules in fp32, so a failure points at its cause.

Each reference is a random `KimiLinearForCausalLM` (`kimi_jax.reference.build_reference`: random A_log, dt_bias,
router correction bias and norm weights), written as a hub checkpoint and read back with `kimi_jax.from_pretrained`;
single layers are sliced out of the scanned segments with `kimi_jax.layout.locate`. Two references run: the HF init
(outputs ~1e-2) and one with projection weights x5 (outputs ~1, saturating gates, peaky softmax). Errors are
max |jax - torch| / max |torch|.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import kimi_jax
from kimi_jax.config import tiny
from kimi_jax.layers.kda import KimiDeltaAttention, softplus_thresholded
from kimi_jax.layers.mla import MultiHeadLatentAttention
from kimi_jax.layers.moe import experts_dense, experts_tiled, resolve_dispatch, route, tile_rows
from kimi_jax.layers.norms import gated_rms_norm, rms_norm
from kimi_jax.layout import locate
from kimi_jax.model import DecoderLayer, LayerContext, RunOptions
from kimi_jax.reference import build_reference, save_reference

TOL = 1e-5
REDUCTION_TOL = 1e-3  # gradients of parameters shared by every token and channel (fp32 sums of ~1e4 signed terms)
B, T = 2, 70
KDA_LAYERS, MLA_LAYER, DENSE_LAYER, MOE_LAYERS = (1, 2), 3, 0, (1, 2, 3)  # tiny(): KDA 0-2, MLA 3, dense FFN at 0


# ---------------------------------------------------------------------------------------------------------- fixtures
@dataclasses.dataclass
class Pair:
    cfg: object
    ref: object  # torch KimiLinearForCausalLM
    model: object  # kimi_jax KimiLinearForCausalLM
    folder: str
    seed: int

    def layer(self, i) -> DecoderLayer:
        return jax_layer(self.model, i)

    def torch_layer(self, i):
        return self.ref.model.layers[i]


def jax_layer(model, i) -> DecoderLayer:
    s, p, r = locate(model.segments_plan, i)
    return jax.tree.map(lambda a: a[r], model.segments[s].blocks[p])


def make_pair(cfg, seed, weight_scale, folder, bias_std=0.5) -> Pair:
    """weight_scale != 1 multiplies every projection, conv and expert weight, and the router by 2x that (at the HF
    init the router logits are ~N(0, 0.16) and the correction bias alone picks nearly the same experts for all
    tokens)."""
    ref = build_reference(cfg, seed, bias_std=bias_std)
    if weight_scale != 1.0:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith(("proj.weight", "proj_with_mqa.weight", "conv1d.weight")) or ".experts." in name:
                    p.mul_(weight_scale)
                elif name.endswith("mlp.gate.weight"):
                    p.mul_(2 * weight_scale)
    save_reference(ref, folder, "hub")
    return Pair(cfg, ref, kimi_jax.from_pretrained(folder), folder, seed)


@pytest.fixture(scope="module", params=[(0, 1.0, 0.5), (1, 5.0, 0.2)], ids=["seed0-init", "seed1-scaled"])
def pair(request, tmp_path_factory):
    seed, scale, bias_std = request.param
    return make_pair(tiny(), seed, scale, str(tmp_path_factory.mktemp(f"ref{seed}")), bias_std=bias_std)


def randn(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def to_torch(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def check(name, x, ref, tol=TOL):
    """max |x - ref| <= tol * max |ref| (in float64), and x finite."""
    e = rel_err(x, ref)
    ref_max = float(np.max(np.abs(np.asarray(ref, np.float64))))
    print(f"\n  {name}: rel max diff {e:.2e} (ref max {ref_max:.3g})")
    chex.assert_tree_all_finite(np.asarray(x))
    chex.assert_trees_all_close(np.asarray(x, np.float64), np.asarray(ref, np.float64), rtol=0, atol=tol * ref_max,
                                custom_message=name)
    return e


def causal_additive_mask(key_mask_BS=None, T=T):
    """transformers-style 4-D float mask [B, 1, T, T]: 0 where visible, finfo.min elsewhere."""
    visible = np.tril(np.ones((T, T), bool))[None]
    if key_mask_BS is not None:
        visible = visible & key_mask_BS[:, None, :]
    visible = np.broadcast_to(visible, (B, T, T))
    return torch.from_numpy(np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None])


# jitted entry points (module as a pytree argument; compiled once per shape, shared by both references)
@jax.jit
def kda_apply(mixer, x_BTD, cache=None):
    return mixer(x_BTD, cache, None)


@jax.jit
def mla_apply(mixer, x_BTD, visible_BTS, cache=None, cache_index=None):
    return mixer(x_BTD, cache, visible_BTS=visible_BTS, cache_index=cache_index)


@functools.partial(jax.jit, static_argnames=("dispatch",))
def ffn_apply(ffn, x_BTD, dispatch=None):
    return ffn(x_BTD) if dispatch is None else ffn(x_BTD, dispatch)


# ---------------------------------------------------------------------------------------------------------- layout
def test_locate_unstacks_one_layer(pair):
    """The sliced layer is a plain DecoderLayer holding exactly that layer's weights (incl. a repeat > 0)."""
    D = pair.cfg.hidden_size
    for i in range(pair.cfg.num_hidden_layers):
        layer = pair.layer(i)
        assert isinstance(layer, DecoderLayer)
        assert layer.mixer_kind == pair.cfg.mixer_types[i] and layer.ffn_kind == pair.cfg.ffn_types[i]
        chex.assert_shape(layer.input_norm.weight[...], (D,))
        chex.assert_trees_all_equal(np.asarray(layer.input_norm.weight[...]),
                                      pair.torch_layer(i).input_layernorm.weight.detach().numpy())
        chex.assert_trees_all_equal(np.asarray(layer.post_attention_norm.weight[...]),
                                    pair.torch_layer(i).post_attention_layernorm.weight.detach().numpy())
    assert locate(pair.model.segments_plan, 2)[2] == 1, "layer 2 should be the second repeat of a stacked segment"
    q_proj = pair.layer(2).mixer.qkv_proj[...][:, 0].reshape(D, -1)
    chex.assert_trees_all_equal(np.asarray(q_proj), pair.torch_layer(2).self_attn.q_proj.weight.detach().numpy().T)


@functools.partial(jax.jit, static_argnames=("opts",))
def layer_apply(layer, h_BTD, ctx, opts=RunOptions(moe_dispatch="ragged")):
    return layer(h_BTD, None, ctx, opts)[0]


@pytest.mark.parametrize("layer_idx", [0, 1, 2, 3])
def test_decoder_layer_matches_torch(pair, layer_idx):
    """A whole pre-norm block (norms, mixer, residuals, FFN) of the unstacked layer vs KimiLinearDecoderLayer."""
    h = randn(5 + layer_idx, B, T, pair.cfg.hidden_size)
    ctx = LayerContext(visible_BTS=jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T)))
    out = layer_apply(pair.layer(layer_idx), jnp.asarray(h), ctx)
    with torch.no_grad():
        expected = pair.torch_layer(layer_idx)(to_torch(h), attention_mask=None).numpy()
    check(f"decoder layer {layer_idx} output ({pair.seed})", out, expected)
    # The residual dominates the output, so also compare the block's update h_out - h_in. Its floor is the fp32
    # rounding of the residual add: ~ulp(|h| ~ 4) / max|update| ~ 2.4e-7 / 0.016 = 1.5e-5 at the HF init.
    floor = 4 * np.spacing(np.float32(np.max(np.abs(h)))) / np.max(np.abs(expected - h))
    check(f"decoder layer {layer_idx} update ({pair.seed})", np.asarray(out) - h, expected - h, tol=TOL + floor)


# ---------------------------------------------------------------------------------------------------------- KDA
@pytest.mark.parametrize("layer_idx", KDA_LAYERS)
@pytest.mark.parametrize("T_", [T, 1])
def test_kda_mixer_matches_torch(pair, layer_idx, T_):
    x = randn(10 + layer_idx, B, T_, pair.cfg.hidden_size)
    out, cache = kda_apply(pair.layer(layer_idx).mixer, jnp.asarray(x))
    assert cache is None
    chex.assert_shape(out, (B, T_, pair.cfg.hidden_size))
    with torch.no_grad():
        expected = pair.torch_layer(layer_idx).self_attn(hidden_states=to_torch(x)).numpy()
    check(f"KDA layer {layer_idx} T={T_} ({pair.seed})", out, expected)


def test_kda_decay_matches_torch_forget_gate(pair):
    x = randn(3, B, T, pair.cfg.hidden_size)
    g = pair.layer(1).mixer.decay(jnp.asarray(x))
    with torch.no_grad():
        expected = pair.torch_layer(1).self_attn.forget_gate(to_torch(x)).numpy()
    chex.assert_shape(g, expected.shape)
    assert np.all(np.asarray(g) <= 0)
    check(f"KDA decay g ({pair.seed})", g, expected)


def test_kda_mixer_gradients_match_torch(pair, layer_idx=KDA_LAYERS[0]):
    """d/d(input, conv, A_log, dt_bias, q/k/v projections) of <out, w> vs torch autograd: covers the hand-written
    backward passes of the short conv and of the chunked KDA core (T = 70: two chunks, one padded)."""
    cfg = pair.cfg
    x = randn(20 + layer_idx, B, T, cfg.hidden_size)
    w = randn(30 + layer_idx, B, T, cfg.hidden_size)
    mixer = pair.layer(layer_idx).mixer
    graph, params = nnx.split(mixer)

    @jax.jit
    def grads(params, x):
        return jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x)[0] * w), argnums=(0, 1))(params, x)

    d_params, d_x = grads(params, jnp.asarray(x))
    # torch in float64. The A_log and dt_bias gradients sum B * T * K terms of both signs: fp32 torch is itself up to
    # 6e-5 off float64 there (and our earlier autodiff backward up to 3e-4), so those two get a reduction tolerance.
    attn = copy.deepcopy(pair.torch_layer(layer_idx).self_attn).double()
    x_t = to_torch(x).double().requires_grad_(True)
    (attn(hidden_states=x_t) * to_torch(w).double()).sum().backward()
    H, K = cfg.kda_num_heads, cfg.kda_head_dim
    check(f"KDA layer {layer_idx} d/dx ({pair.seed})", d_x, x_t.grad.numpy())
    # torch conv1d.weight [3 H K, 1, W] (q, k, v channels) = ours [W, 3, H, K] transposed.
    conv_t = attn.conv1d.weight.grad.numpy()[:, 0].T.reshape(-1, 3, H, K)
    check(f"KDA layer {layer_idx} d/dconv ({pair.seed})", d_params["conv"][...], conv_t)
    check(f"KDA layer {layer_idx} d/dA_log ({pair.seed})", d_params["A_log"][...],
          attn.forget_gate.A_log.grad.numpy().reshape(H), tol=REDUCTION_TOL)
    check(f"KDA layer {layer_idx} d/ddt_bias ({pair.seed})", d_params["dt_bias"][...],
          attn.forget_gate.dt_bias.grad.numpy().reshape(H, K), tol=REDUCTION_TOL)
    qkv_t = np.stack([getattr(attn, f"{n}_proj").weight.grad.numpy().T.reshape(-1, H, K) for n in "qkv"], axis=1)
    check(f"KDA layer {layer_idx} d/dqkv_proj ({pair.seed})", d_params["qkv_proj"][...], qkv_t)


def test_causal_conv_custom_backward_equals_autodiff():
    """The short conv's hand-written backward (inputs, tail and kernel) equals autodiff of the plain formula."""
    from kimi_jax.layers.kda import causal_depthwise_conv

    def plain(u, kernel, tail):
        full = jnp.concatenate([tail, u], axis=1)
        steps = u.shape[1]
        return sum(full[:, j:j + steps] * kernel[j] for j in range(kernel.shape[0]))

    u, tail = jnp.asarray(randn(1, 2, 9, 3, 5)), jnp.asarray(randn(2, 2, 3, 3, 5))
    kernel, w = jnp.asarray(randn(3, 4, 3, 5)), jnp.asarray(randn(4, 2, 9, 3, 5))
    ours = jax.grad(lambda *a: jnp.sum(causal_depthwise_conv(*a)[0] * w), argnums=(0, 1, 2))(u, kernel, tail)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=(0, 1, 2))(u, kernel, tail)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-5)  # d/d (u, kernel, tail)
    for name, b in zip(("u", "kernel", "tail"), ref):
        assert np.max(np.abs(np.asarray(b))) > 0, name


def test_kda_mixer_cache_prefill_then_decode(pair):
    """Prefill 69 tokens into a fresh cache, then decode one: equals the 70-token forward (JAX and torch)."""
    mixer = pair.layer(1).mixer
    x = randn(20, B, T, pair.cfg.hidden_size)
    full, _ = kda_apply(mixer, jnp.asarray(x))
    cache = mixer.init_cache(B, jnp.float32)
    chex.assert_shape(cache.state_BHKK, (B, pair.cfg.kda_num_heads, pair.cfg.kda_head_dim, pair.cfg.kda_head_dim))
    out_pre, cache = kda_apply(mixer, jnp.asarray(x[:, :T - 1]), cache)
    out_dec, cache = kda_apply(mixer, jnp.asarray(x[:, T - 1:]), cache)
    stitched = jnp.concatenate([out_pre, out_dec], axis=1)
    with torch.no_grad():
        expected = pair.torch_layer(1).self_attn(hidden_states=to_torch(x)).numpy()
    check(f"KDA cache 69+1 vs JAX full ({pair.seed})", stitched, full)
    check(f"KDA cache 69+1 vs torch full ({pair.seed})", stitched, expected)
    check(f"KDA decode token vs torch ({pair.seed})", out_dec, expected[:, -1:])


class KDAMixerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cached_continuation_equals_the_cacheless_forward(self):
        """The KDA mixer from a fresh cache, prefill 69 tokens (chunked core) then decode 1 (recurrent core), jitted
        or op by op, equals its cacheless forward over all 70 tokens; the cache keeps its typed layout."""
        cfg = tiny()
        H, K, W = cfg.kda_num_heads, cfg.kda_head_dim, cfg.conv_kernel_size
        mixer = KimiDeltaAttention(cfg, rngs=nnx.Rngs(4))
        graph, state = nnx.split(mixer)
        x = jnp.asarray(randn(22, B, T, cfg.hidden_size))

        @self.variant
        def continued(state, x):
            m = nnx.merge(graph, state)
            pre, cache = m(x[:, :T - 1], m.init_cache(B, jnp.float32))
            dec, cache = m(x[:, T - 1:], cache)
            return jnp.concatenate([pre, dec], axis=1), cache

        out, cache = continued(state, x)
        chex.assert_shape(out, (B, T, cfg.hidden_size))
        chex.assert_shape(cache.conv_BW3HK, (B, W - 1, 3, H, K))
        chex.assert_shape(cache.state_BHKK, (B, H, K, K))
        check("KDA cache 69+1 vs full, variant", out, kda_apply(mixer, x)[0])


# ---------------------------------------------------------------------------------------------------------- MLA
@pytest.mark.parametrize("mask_kind", ["additive", "none"])
def test_mla_mixer_matches_torch(pair, mask_kind):
    x = randn(30, B, T, pair.cfg.hidden_size)
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    out, cache = mla_apply(pair.layer(MLA_LAYER).mixer, jnp.asarray(x), visible)
    assert cache is None
    # sdpa (the reference's attention) uses is_causal when the mask is None, else adds the float mask to the scores.
    mask = causal_additive_mask() if mask_kind == "additive" else None
    with torch.no_grad():
        expected, _ = pair.torch_layer(MLA_LAYER).self_attn(hidden_states=to_torch(x), attention_mask=mask)
    check(f"MLA {mask_kind} mask ({pair.seed})", out, expected.numpy())


def test_mla_mixer_single_token_and_padding(pair):
    mixer, tmla = pair.layer(MLA_LAYER).mixer, pair.torch_layer(MLA_LAYER).self_attn
    x1 = randn(31, B, 1, pair.cfg.hidden_size)
    out1, _ = mla_apply(mixer, jnp.asarray(x1), jnp.ones((B, 1, 1), bool))
    with torch.no_grad():
        expected1, _ = tmla(hidden_states=to_torch(x1), attention_mask=None)
    check(f"MLA T=1 ({pair.seed})", out1, expected1.numpy())

    # Left padding in batch row 1: keys 0..4 invisible. Compare only the real query rows.
    x = randn(32, B, T, pair.cfg.hidden_size)
    key_mask = np.ones((B, T), bool)
    key_mask[1, :5] = False
    visible = np.tril(np.ones((T, T), bool))[None] & key_mask[:, None, :]
    out, _ = mla_apply(mixer, jnp.asarray(x), jnp.asarray(visible))
    with torch.no_grad():
        expected, _ = tmla(hidden_states=to_torch(x), attention_mask=causal_additive_mask(key_mask))
    out, expected = np.asarray(out), expected.numpy()
    check(f"MLA padded row 0 ({pair.seed})", out[0], expected[0])
    check(f"MLA padded row 1, real queries ({pair.seed})", out[1, 5:], expected[1, 5:])


def test_mla_absorbed_cache_equals_expanded(pair):
    """The latent cache path (W_k absorbed into q, W_v after attention) equals the expanded path."""
    mixer = pair.layer(MLA_LAYER).mixer
    S = 80
    x = randn(33, B, T, pair.cfg.hidden_size)
    expanded, _ = mla_apply(mixer, jnp.asarray(x), jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T)))

    def visible(start, n):
        return jnp.broadcast_to(jnp.arange(S)[None, :] <= (start + jnp.arange(n))[:, None], (B, n, S))

    cache = mixer.init_cache(B, S, jnp.float32)
    absorbed, new_cache = mla_apply(mixer, jnp.asarray(x), visible(0, T), cache, 0)
    chex.assert_shape(new_cache.latent_BSR, (B, S, pair.cfg.kv_lora_rank))
    chex.assert_shape(new_cache.k_shared_BSE, (B, S, pair.cfg.qk_rope_head_dim))
    check(f"MLA absorbed (prefill 70) vs expanded ({pair.seed})", absorbed, expanded)

    cache = mixer.init_cache(B, S, jnp.float32)
    pre, cache = mla_apply(mixer, jnp.asarray(x[:, :T - 1]), visible(0, T - 1), cache, 0)
    dec, cache = mla_apply(mixer, jnp.asarray(x[:, T - 1:]), visible(T - 1, 1), cache, T - 1)
    check(f"MLA absorbed 69+1 vs expanded ({pair.seed})", jnp.concatenate([pre, dec], axis=1), expanded)
    with torch.no_grad():
        expected, _ = pair.torch_layer(MLA_LAYER).self_attn(hidden_states=to_torch(x), attention_mask=None)
    check(f"MLA absorbed decode token vs torch ({pair.seed})", dec, expected.numpy()[:, -1:])


class MLAMixerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_absorbed_cache_with_per_sample_positions_equals_expanded(self):
        """The MLA latent cache, jitted or op by op, with one write position per sample (row 1 holds 5 fewer tokens):
        prefill then one decode token equals the expanded (cacheless) attention over each row's own tokens."""
        cfg = tiny()
        mixer = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(5))
        graph, state = nnx.split(mixer)
        S, n = 40, jnp.asarray([30, 25], jnp.int32)
        x = jnp.asarray(randn(34, B, 31, cfg.hidden_size))

        @self.variant
        def decode(state, x, n):
            m = nnx.merge(graph, state)
            keys_BS = jnp.arange(S)[None, :] < n[:, None]
            prefix = (jnp.arange(S)[None, None, :] <= jnp.arange(30)[None, :, None]) & keys_BS[:, None, :]
            _, cache = m(x[:, :30], m.init_cache(B, S, jnp.float32), visible_BTS=prefix, cache_index=0)
            one = (jnp.arange(S)[None, :] <= n[:, None])[:, None, :]  # the row's prefix and the new token at n
            out, cache = m(jnp.take_along_axis(x, n[:, None, None], axis=1), cache, visible_BTS=one, cache_index=n)
            return out, cache

        out, cache = decode(state, x, n)
        chex.assert_shape(out, (B, 1, cfg.hidden_size))
        chex.assert_shape(cache.latent_BSR, (B, S, cfg.kv_lora_rank))
        chex.assert_shape(cache.k_shared_BSE, (B, S, cfg.qk_rope_head_dim))
        for b in range(B):
            L = int(n[b]) + 1
            expanded, _ = mla_apply(mixer, x[b:b + 1, :L], jnp.tril(jnp.ones((L, L), bool))[None])
            check(f"MLA absorbed per-sample decode row {b}, variant", out[b], expanded[0, -1:])


# ---------------------------------------------------------------------------------------------------------- FFN
@pytest.mark.parametrize("T_", [T, 1])
def test_moe_matches_torch_every_dispatch(pair, T_):
    for i in MOE_LAYERS:
        ffn = pair.layer(i).ffn
        x = randn(40 + i, B, T_, pair.cfg.hidden_size)
        with torch.no_grad():
            expected = pair.torch_layer(i).mlp(to_torch(x)).numpy()
        if T_ > 1 and pair.seed == 1:
            _, experts = route(jnp.asarray(x.reshape(-1, x.shape[-1])), ffn.router[...], ffn.correction_bias[...],
                               top_k=ffn.top_k, num_groups=1, topk_groups=1, renormalize=True, scaling=1.0,
                               weights_use_bias=False)
            used = np.bincount(np.asarray(experts).ravel(), minlength=pair.cfg.num_experts)
            print(f"\n  layer {i} tokens per expert: {used}")
            assert np.count_nonzero(used) >= 6, f"routing should spread over the experts: {used}"
        outs = {kind: ffn_apply(ffn, jnp.asarray(x), kind) for kind in ("dense", "ragged", "tiled")}
        for kind, out in outs.items():
            check(f"MoE layer {i} T={T_} {kind} vs torch ({pair.seed})", out, expected)
        check(f"MoE layer {i} T={T_} dense vs ragged ({pair.seed})", outs["dense"], outs["ragged"])
        check(f"MoE layer {i} T={T_} tiled vs ragged ({pair.seed})", outs["tiled"], outs["ragged"])


def silu_np(x):
    return x / (1.0 + np.exp(-x))


def moe_numpy(ffn, cfg, x_TD, weights_use_bias):
    """Spec §4.2 in float64 from the JAX layer's parameters (plain top-k: one expert group)."""
    p = lambda a: np.asarray(a[...], np.float64)
    x = np.asarray(x_TD, np.float64)
    s_TE = 1.0 / (1.0 + np.exp(-(x @ p(ffn.router))))
    biased_TE = s_TE + p(ffn.correction_bias)
    experts_Tk = np.argsort(-biased_TE, axis=-1, kind="stable")[:, :cfg.num_experts_per_token]
    w_Tk = np.take_along_axis(biased_TE if weights_use_bias else s_TE, experts_Tk, axis=-1)
    w_Tk = w_Tk / (w_Tk.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    h_TEF = silu_np(np.einsum("td,edf->tef", x, p(ffn.w_gate))) * np.einsum("td,edf->tef", x, p(ffn.w_up))
    out_TED = np.einsum("tef,efd->ted", h_TEF, p(ffn.w_down))
    routed_TD = np.einsum("tkd,tk->td", np.take_along_axis(out_TED, experts_Tk[:, :, None], axis=1), w_Tk)
    sh = ffn.shared_experts
    shared_TD = (silu_np(x @ p(sh.gate_proj)) * (x @ p(sh.up_proj))) @ p(sh.down_proj)
    return routed_TD + shared_TD, experts_Tk, w_Tk


def test_moe_correction_bias_weights_switch(pair):
    """router_weights_use_correction_bias=True (hub remote-code aliasing): same experts, weights from s + b."""
    cfg_b = pair.cfg.replace(router_weights_use_correction_bias=True)
    biased_model = kimi_jax.from_pretrained(pair.folder, config=cfg_b)
    i = 1
    ffn, ffn_b = pair.layer(i).ffn, jax_layer(biased_model, i).ffn
    assert ffn_b.weights_use_bias and not ffn.weights_use_bias
    x = randn(50, B, T, pair.cfg.hidden_size)
    x_TD = x.reshape(-1, x.shape[-1])
    out = np.asarray(ffn_apply(ffn, jnp.asarray(x), "dense")).reshape(x_TD.shape)
    out_b = np.asarray(ffn_apply(ffn_b, jnp.asarray(x), "dense")).reshape(x_TD.shape)
    ref_np, experts_np, _ = moe_numpy(ffn, pair.cfg, x_TD, weights_use_bias=False)
    ref_np_b, experts_np_b, w_np_b = moe_numpy(ffn, pair.cfg, x_TD, weights_use_bias=True)
    switch_effect = rel_err(out_b, out)
    print(f"\n  correction-bias switch changes the MoE output by {switch_effect:.2e} (relative)")
    assert switch_effect > 1e-3
    check(f"MoE unbiased vs numpy ({pair.seed})", out, ref_np)
    check(f"MoE biased weights vs numpy ({pair.seed})", out_b, ref_np_b)
    chex.assert_trees_all_equal(experts_np, experts_np_b)
    kw = dict(top_k=pair.cfg.num_experts_per_token, num_groups=1, topk_groups=1, renormalize=True,
              scaling=pair.cfg.routed_scaling_factor)
    w_b, e_b = route(jnp.asarray(x_TD), ffn.router[...], ffn.correction_bias[...], weights_use_bias=True, **kw)
    w_u, e_u = route(jnp.asarray(x_TD), ffn.router[...], ffn.correction_bias[...], weights_use_bias=False, **kw)
    chex.assert_trees_all_equal(e_b, e_u)
    chex.assert_trees_all_equal(np.sort(np.asarray(e_b), -1), np.sort(experts_np_b, -1))
    order = lambda e, w: np.take_along_axis(np.asarray(w), np.argsort(np.asarray(e), -1), -1)
    chex.assert_trees_all_close(order(e_b, w_b), order(experts_np_b, w_np_b), rtol=1e-5, atol=1e-6)


def test_grouped_routing_matches_torch_router(tmp_path):
    cfg = tiny(num_expert_group=2, topk_group=1)
    assert cfg.num_experts == 8
    p = make_pair(cfg, seed=3, weight_scale=5.0, folder=str(tmp_path), bias_std=0.1)
    router = p.torch_layer(1).mlp.gate
    assert router.num_group == 2 and router.topk_group == 1
    x = randn(60, B, T, cfg.hidden_size)
    x_TD = x.reshape(-1, cfg.hidden_size)
    with torch.no_grad():
        _, w_t, e_t = router(to_torch(x))
    ffn = p.layer(1).ffn
    kw = dict(top_k=cfg.num_experts_per_token, topk_groups=1, renormalize=True, scaling=cfg.routed_scaling_factor,
              weights_use_bias=False)
    w_j, e_j = route(jnp.asarray(x_TD), ffn.router[...], ffn.correction_bias[...], num_groups=2, **kw)
    _, e_flat = route(jnp.asarray(x_TD), ffn.router[...], ffn.correction_bias[...], num_groups=1, **kw)
    e_j, w_j, e_t, w_t = np.asarray(e_j), np.asarray(w_j), e_t.numpy(), w_t.numpy()
    sort_j, sort_t = np.argsort(e_j, -1), np.argsort(e_t, -1)
    chex.assert_trees_all_equal(np.take_along_axis(e_j, sort_j, -1), np.take_along_axis(e_t, sort_t, -1))
    check("grouped routing weights vs torch", np.take_along_axis(w_j, sort_j, -1), np.take_along_axis(w_t, sort_t, -1))
    # Every token's experts lie in a single group of 4, and grouping changed the choice for some tokens.
    assert np.all(e_j.min(-1) // 4 == e_j.max(-1) // 4)
    changed = np.mean(np.any(np.sort(e_j, -1) != np.sort(np.asarray(e_flat), -1), axis=-1))
    print(f"\n  grouped routing changed the experts of {changed:.0%} of tokens")
    assert changed > 0.1
    with torch.no_grad():
        expected = p.torch_layer(1).mlp(to_torch(x)).numpy()
    check("grouped MoE vs torch", ffn_apply(ffn, jnp.asarray(x), "ragged"), expected)
    check("grouped MoE dense vs torch", ffn_apply(ffn, jnp.asarray(x), "dense"), expected)


@pytest.mark.parametrize("T_", [T, 1])
def test_dense_swiglu_matches_torch(pair, T_):
    x = randn(70, B, T_, pair.cfg.hidden_size)
    ffn = pair.layer(DENSE_LAYER).ffn
    with torch.no_grad():
        expected = pair.torch_layer(DENSE_LAYER).mlp(to_torch(x)).numpy()
    check(f"dense SwiGLU T={T_} ({pair.seed})", ffn_apply(ffn, jnp.asarray(x)), expected)


# ---------------------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("x_scale", [1.0, 3e-3])  # 3e-3: mean(x^2) ~ 1e-5, so eps matters
def test_rms_norms_match_torch(pair, x_scale):
    x = randn(80, B, T, pair.cfg.hidden_size, scale=x_scale)
    for i in (0, 3):
        layer, tl = pair.layer(i), pair.torch_layer(i)
        with torch.no_grad():
            check(f"input_layernorm {i} x~{x_scale} ({pair.seed})", layer.input_norm(jnp.asarray(x)),
                  tl.input_layernorm(to_torch(x)).numpy())
            check(f"post_attention_layernorm {i} x~{x_scale} ({pair.seed})", layer.post_attention_norm(jnp.asarray(x)),
                  tl.post_attention_layernorm(to_torch(x)).numpy())
    with torch.no_grad():
        check(f"final norm x~{x_scale} ({pair.seed})", pair.model.norm(jnp.asarray(x)),
              pair.ref.model.norm(to_torch(x)).numpy())
    # MLA latent norm: eps 1e-6 (the reference's default), not rms_norm_eps.
    mla, tmla = pair.layer(MLA_LAYER).mixer, pair.torch_layer(MLA_LAYER).self_attn
    c = randn(81, B, T, pair.cfg.kv_lora_rank, scale=x_scale)
    with torch.no_grad():
        expected = tmla.kv_a_layernorm(to_torch(c)).numpy()
    check(f"kv_a_layernorm x~{x_scale} ({pair.seed})", rms_norm(jnp.asarray(c), mla.kv_a_norm[...], mla.latent_eps),
          expected)


@pytest.mark.parametrize("x_scale", [1.0, 3e-3])
def test_gated_rms_norm_matches_torch(pair, x_scale):
    mixer, tkda = pair.layer(1).mixer, pair.torch_layer(1).self_attn
    H, K = pair.cfg.kda_num_heads, pair.cfg.kda_head_dim
    o = randn(90, B, T, H, K, scale=x_scale)
    gate = randn(91, B, T, H, K, scale=3.0)
    assert tkda.o_norm.variance_epsilon == mixer.eps
    with torch.no_grad():
        expected = tkda.o_norm(to_torch(o), to_torch(gate)).numpy()
    check(f"gated rms norm x~{x_scale} ({pair.seed})", gated_rms_norm(jnp.asarray(o), jnp.asarray(gate),
                                                                      mixer.o_norm[...], mixer.eps), expected)


def test_rms_norm_bf16_rounds_before_weight():
    """Spec §5: y = w * bf16(x_fp32 * rsqrt(mean x^2 + eps)), i.e. two roundings, as torch in bf16."""
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearRMSNorm

    bf16 = ml_dtypes.bfloat16
    D, eps = 64, 1e-5
    x = randn(100, 64, D, scale=3.0).astype(bf16)
    w = (1.0 + 0.3 * randn(101, D)).astype(bf16)
    out = rms_norm(jnp.asarray(x), jnp.asarray(w), eps)
    assert out.dtype == jnp.bfloat16
    norm = KimiLinearRMSNorm(D, eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16))
        expected = norm(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)).float().numpy()

    x64 = x.astype(np.float64)
    normed = (x64 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + eps)).astype(np.float32)
    two_roundings = (w.astype(np.float32) * normed.astype(bf16).astype(np.float32)).astype(bf16).astype(np.float32)
    one_rounding = (w.astype(np.float32) * normed).astype(bf16).astype(np.float32)
    out = np.asarray(out.astype(jnp.float32))

    def ulps(a, b):  # distance in bf16 steps at b's magnitude
        step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b), 1e-30))) - 7)
        return np.abs(a - b) / step

    mismatch = lambda a, b: float(np.mean(a != b))
    print(f"\n  bf16 rms_norm mismatch fraction: vs torch {mismatch(out, expected):.3f}, vs two roundings "
          f"{mismatch(out, two_roundings):.3f}, vs one rounding {mismatch(out, one_rounding):.3f}; "
          f"torch vs one rounding {mismatch(expected, one_rounding):.3f}")
    assert mismatch(one_rounding, two_roundings) > 0.05, "the check cannot tell the two orders apart"
    for name, target in (("torch", expected), ("two roundings", two_roundings)):
        assert np.max(ulps(out, target)) <= 1.0, name
        assert mismatch(out, target) < 0.01, name
    assert mismatch(out, one_rounding) > 0.05


# ---------------------------------------------------------------------------------------------------------- softplus
def test_softplus_thresholded_matches_torch_formula():
    f32 = np.float32
    edge = [np.nextafter(f32(20), f32(0)), f32(20), np.nextafter(f32(20), f32(30)), f32(-1e4), f32(1e4)]
    z = np.concatenate([np.linspace(-40, 120, 4001, dtype=np.float32), np.array(edge, np.float32)])
    ours = np.asarray(softplus_thresholded(jnp.asarray(z)))
    zt = torch.from_numpy(z)
    torch_formula = torch.where(zt > 20.0, zt, torch.log(1.0 + torch.exp(zt))).numpy()  # KimiLinearForgetGate
    exact = np.where(z > 20.0, z.astype(np.float64), np.logaddexp(0.0, z.astype(np.float64)))
    chex.assert_trees_all_close(ours, torch_formula, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(ours, exact, rtol=2e-6, atol=0)  # log1p form: accurate even where e^z << 1
    print(f"\n  softplus: max abs vs torch formula {np.max(np.abs(ours - torch_formula)):.2e}")

    # Gradients everywhere, the exact threshold z == 20.0 included (torch takes the log branch there: sigmoid(20)).
    grad = jax.vmap(jax.grad(softplus_thresholded))
    gz = np.asarray(grad(jnp.asarray(z)))
    chex.assert_tree_all_finite(gz)
    expected_grad = np.where(z > 20.0, 1.0, 0.5 * (1.0 + np.tanh(0.5 * z.astype(np.float64))))  # sigmoid(z)
    chex.assert_trees_all_close(gz, expected_grad, rtol=1e-5, atol=1e-7)
    assert float(jax.grad(softplus_thresholded)(jnp.float32(100.0))) == 1.0
    # The decay's gradient stays finite through a saturated softplus too.
    g_of_z = lambda z: jnp.sum(-jnp.exp(jnp.float32(2.0)) * softplus_thresholded(z))
    chex.assert_tree_all_finite(jax.grad(g_of_z)(jnp.array([100.0, 1e4, -1e4], jnp.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["skewed", "one_expert", "exact_tiles", "single_token", "few_tokens"])
def test_moe_tiled_dispatch_equals_dense_values_and_grads(routing):
    """The tiled dispatch on routings that stress its bookkeeping: empty experts, one expert holding everything,
    groups that fill whole tiles exactly, a single token. Values and all gradients equal the dense dispatch."""
    rng = np.random.default_rng(7)
    E, D, F, k = 8, 16, 8, 2
    T = {"skewed": 90, "one_expert": 40, "exact_tiles": 64, "single_token": 1, "few_tokens": 3}[routing]
    if routing == "skewed":
        experts_Tk = np.stack([rng.choice([0, 0, 0, 3, 5], T), rng.choice([6, 7], T)], axis=1)
    elif routing == "one_expert":
        experts_Tk = np.stack([np.full(T, 2), np.full(T, 4)], axis=1)
    elif routing == "exact_tiles":  # 128 assignments over 8 experts: 16 per expert = one whole tile each
        experts_Tk = np.stack([np.arange(T) % E, (np.arange(T) + 1) % E], axis=1)
        assert tile_rows(T * k, E) == 16
    elif routing == "single_token":
        experts_Tk = np.array([[1, 6]])
    else:  # 3 tokens, 6 assignments: one-row tiles, two tokens sharing expert 5
        experts_Tk = np.array([[5, 0], [2, 5], [7, 3]])
        assert tile_rows(T * k, E) == 1
    experts_Tk = jnp.asarray(experts_Tk, jnp.int32)
    weights_Tk = jnp.asarray(rng.random((T, k)), jnp.float32)
    x_TD = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w = [jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]

    def loss(fn, x, wg, wu, wd):
        return jnp.sum(jnp.sin(fn(x, weights_Tk, experts_Tk, wg, wu, wd)))

    for fn in (experts_dense, experts_tiled):
        chex.assert_shape(fn(x_TD, weights_Tk, experts_Tk, *w), (T, D))
    chex.assert_trees_all_close(experts_tiled(x_TD, weights_Tk, experts_Tk, *w),
                                experts_dense(x_TD, weights_Tk, experts_Tk, *w), rtol=1e-5, atol=1e-6)
    g_dense = jax.grad(functools.partial(loss, experts_dense), argnums=(0, 1, 2, 3))(x_TD, *w)
    g_tiled = jax.grad(functools.partial(loss, experts_tiled), argnums=(0, 1, 2, 3))(x_TD, *w)
    chex.assert_trees_all_close(g_tiled, g_dense, rtol=1e-4, atol=1e-5)


def test_moe_auto_dispatch_choice(monkeypatch):
    """auto on CPU: tiled for decode (2 of 8 expert matrices) and training batches, dense when E / k is small (it
    then computes fewer rows than padded tiles); explicit names pass through."""
    assert resolve_dispatch("auto", 8, num_tokens=1, top_k=2) == "tiled"
    assert resolve_dispatch("auto", 2, num_tokens=512, top_k=2) == "dense"
    assert resolve_dispatch("auto", 8, num_tokens=2048, top_k=2) == "tiled"
    assert resolve_dispatch("ragged", 8, num_tokens=1, top_k=2) == "ragged"
    # The compile target decides, not JAX's backend (a TPU topology compiled from a CPU host is "tpu").
    assert resolve_dispatch("auto", 256, num_tokens=4096, top_k=8, platform="tpu") == "gmm"
    # GPU: the grouped kernels on Hopper (JAX's Mosaic GPU ops; this CPU host has none), tiled elsewhere.
    assert resolve_dispatch("auto", 256, num_tokens=4096, top_k=8, platform="gpu") == "tiled"
    import kimi_jax.layers.moe as moe_module

    monkeypatch.setattr(moe_module, "hopper_gpu", lambda: True)
    assert resolve_dispatch("auto", 256, num_tokens=4096, top_k=8, platform="gpu") == "gmm"
    with pytest.raises(ValueError, match="not one of"):
        resolve_dispatch("sparse", 8)
