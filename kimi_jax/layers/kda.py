"""Kimi Delta Attention layer (spec §2): projections, causal short conv, per-channel decay, delta rule, gated norm.

Shapes: B batch, T tokens, D hidden, H heads, K head dim (d_k = d_v), W conv width, R gate rank (= K in the spec).
Parameters are head-structured so the `tensor` mesh axis can shard heads:
    qkv_proj [D, 3, H, K]   conv [W, 3, H, K]   (conv[W-1] multiplies the current token; no kernel flip)
    f_a_proj [D, R]  f_b_proj [R, H, K]  dt_bias [H, K] f32  A_log [H] f32
    b_proj [D, H]    g_a_proj [D, R]     g_b_proj [R, H, K]  o_norm [K]   o_proj [H, K, D]

Decode cache per layer: `KDACache` (conv tail [B, W-1, 3, H, K], recurrent state [B, H, K, K] f32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from kimi_jax.config import KimiLinearConfig
from kimi_jax.layers.init import kda_a_log, kda_dt_bias, normal_param
from kimi_jax.layers.lora import lora_apply
from kimi_jax.layers.norms import gated_rms_norm
from kimi_jax.ops.kda import kda_chunked, kda_recurrent, resolve_kda_impl
from kimi_jax.sharding import Resolver, batch_axes, spec_axes, target_platform

F32 = jnp.float32


@struct.dataclass
class KDACache:
    """One KDA layer's decode cache: what the next token needs from everything before it.

    Inside the model's scanned segments every field carries a leading [R] axis (the segment's repeats).
    """
    conv_BW3HK: jax.Array  # [B, W-1, 3, H, K] the pre-conv q/k/v inputs of the last W-1 tokens (model dtype)
    state_BHKK: jax.Array  # [B, H, K, K] the delta rule's recurrent state, fp32


@struct.dataclass
class KDAExport:
    """What windows starting at N positions need from one KDA layer's clean prefix (the recursive block's one-pass
    layout): the `KDACache` after x[:start] for each start, stacked on axis 1."""
    conv_BNW3HK: jax.Array  # [B, N, W-1, 3, H, K] the conv tail before each start
    state_BNHKK: jax.Array  # [B, N, H, K, K] the recurrent state at each start (a chunk boundary), fp32


def chunked_core(impl: str, sharding, chunk_size: int, return_chunk_states: bool):
    """`kda_chunked` with `impl` resolved for the target platform (the mesh's devices: a TPU topology compiled from a
    CPU host is "tpu"), as f(q, k, v, g, beta, state or None) -> (o, final state[, chunk states]).

    A Pallas kernel is opaque to GSPMD (it would gather its inputs whole onto every device), so on a mesh the kernels
    run inside `shard_map`, one call per shard: batch over the activations' batch axes, heads over the axes the
    `heads` rule gives (`tensor`, where it divides H). KDA mixes nothing across batch rows or heads, so each shard's
    kernel is the whole computation for its rows and heads. Interpret mode wherever the target is not a TPU / GPU.
    """
    mesh = sharding.mesh if sharding is not None else None
    platform = target_platform(mesh)
    impl = resolve_kda_impl(impl, platform)
    interpret = platform not in ("tpu", "gpu", "cuda", "rocm")
    kernel = functools.partial(kda_chunked, chunk_size=chunk_size, return_chunk_states=return_chunk_states,
                               impl=impl, interpret=interpret)
    if impl == "xla" or mesh is None or mesh.size == 1:
        return kernel
    batch = batch_axes(sharding) or None

    def sharded(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV):
        H = q_BTHK.shape[2]
        heads = Resolver(mesh).spec((None, None, "heads", None), q_BTHK.shape)[2]
        if set(spec_axes(heads)) & set(spec_axes(batch)):
            heads = None
        if state_BHKV is None:
            state_BHKV = jnp.zeros(q_BTHK.shape[:1] + (H, q_BTHK.shape[-1], v_BTHV.shape[-1]), F32)
        x = P(batch, None, heads, None)
        state = P(batch, heads, None, None)
        outs = (x, state) + ((P(batch, None, heads, None, None),) if return_chunk_states else ())
        return jax.shard_map(kernel, mesh=mesh, in_specs=(x, x, x, x, P(batch, None, heads), state),
                             out_specs=outs, check_vma=False)(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV)

    return sharded


def softplus_thresholded(z):
    """torch softplus(beta=1, threshold=20): z above 20, log(1 + e^z) below (the inner where keeps grads finite)."""
    return jnp.where(z > 20.0, z, jnp.log1p(jnp.exp(jnp.where(z > 20.0, 20.0, z))))


def causal_depthwise_conv(u_BTC, kernel_WC, tail_BWC):
    """y_t = sum_j kernel[j] * u_{t-W+1+j} over [tail; u] (cross-correlation, left context from `tail`).

    u_BTC: inputs (C = any trailing channel shape flattened by the caller), tail_BWC: the previous W-1 inputs.
    Returns (y_BTC in fp32, new tail = the last W-1 inputs of [tail; u]).
    """
    T = u_BTC.shape[1]
    full = jnp.concatenate([tail_BWC.astype(u_BTC.dtype), u_BTC], axis=1).astype(F32)
    return _shifted_taps(full, kernel_WC.astype(F32)), full[:, T:].astype(u_BTC.dtype)


@jax.custom_vjp
def _shifted_taps(full_BSC, kernel_WC):
    """sum_j kernel[j] * full[:, j : j + T] with T = S - W + 1 (the conv's forward)."""
    W = kernel_WC.shape[0]
    T = full_BSC.shape[1] - W + 1
    return sum(full_BSC[:, j:j + T] * kernel_WC[j] for j in range(W))


def _shifted_taps_fwd(full_BSC, kernel_WC):
    return _shifted_taps(full_BSC, kernel_WC), (full_BSC, kernel_WC)


def _shifted_taps_bwd(residuals, dy_BTC):
    # d full[s] = sum_j kernel[j] dy[s - j]: the same taps, reversed, over dy padded by W-1 on both sides. Autodiff
    # forms this as W separate zero-padded copies summed inside a transposing copy, several times slower on CPU.
    full_BSC, kernel_WC = residuals
    W = kernel_WC.shape[0]
    S, T = full_BSC.shape[1], dy_BTC.shape[1]
    dy_pad = jnp.pad(dy_BTC, [(0, 0), (W - 1, W - 1)] + [(0, 0)] * (dy_BTC.ndim - 2))
    d_full = sum(dy_pad[:, W - 1 - j:W - 1 - j + S] * kernel_WC[j] for j in range(W))
    d_kernel = jnp.stack([jnp.sum(full_BSC[:, j:j + T] * dy_BTC, axis=(0, 1)) for j in range(W)])
    return d_full, d_kernel


_shifted_taps.defvjp(_shifted_taps_fwd, _shifted_taps_bwd)


def last_valid_tail(full_BSC, mask_BT, width: int):
    """The last `width` valid rows of [tail; u] (tail rows always valid, u rows where mask_BT), per sample.

    Used for the new conv tail after a masked call: valid tokens form a suffix (left padding) or a prefix (a
    right-padded commit); either way the tail is the `width` rows ending at the last valid one.
    """
    T = mask_BT.shape[1]
    valid_BS = jnp.concatenate([jnp.ones((mask_BT.shape[0], width), bool), mask_BT.astype(bool)], axis=1)
    last_B = jnp.max(jnp.where(valid_BS, jnp.arange(width + T)[None, :], 0), axis=1)
    return jax.vmap(lambda f, e: jax.lax.dynamic_slice_in_dim(f, e - width + 1, width, axis=0))(full_BSC, last_B)


class KimiDeltaAttention(nnx.Module):
    def __init__(self, cfg: KimiLinearConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        D, H, K, W = cfg.hidden_size, cfg.kda_num_heads, cfg.kda_head_dim, cfg.conv_kernel_size
        R = cfg.kda_head_dim  # the gate projections' rank equals the head dim in Kimi-Linear (spec §2.2)
        self.num_heads, self.head_dim, self.conv_width = H, K, W
        self.eps = cfg.rms_norm_eps
        self.chunk_size = cfg.kda_chunk_size
        self.qkv_proj = normal_param(rngs, (D, 3, H, K), dtype)
        # torch Conv1d default init is U(-1/sqrt(W), 1/sqrt(W)) for a depthwise kernel.
        bound = W ** -0.5
        self.conv = nnx.Param(jax.random.uniform(rngs.params(), (W, 3, H, K), F32, -bound, bound).astype(dtype))
        self.f_a_proj = normal_param(rngs, (D, R), dtype)
        self.f_b_proj = normal_param(rngs, (R, H, K), dtype)
        self.dt_bias = kda_dt_bias(rngs, (H, K))
        self.A_log = kda_a_log(rngs, H)
        self.b_proj = normal_param(rngs, (D, H), dtype)
        self.g_a_proj = normal_param(rngs, (D, R), dtype)
        self.g_b_proj = normal_param(rngs, (R, H, K), dtype)
        self.o_norm = nnx.Param(jnp.ones((K,), dtype))
        self.o_proj = normal_param(rngs, (H, K, D), dtype)

    def init_cache(self, batch: int, dtype) -> KDACache:
        H, K, W = self.num_heads, self.head_dim, self.conv_width
        return KDACache(conv_BW3HK=jnp.zeros((batch, W - 1, 3, H, K), dtype),
                        state_BHKK=jnp.zeros((batch, H, K, K), F32))

    def decay(self, x_BTD):
        """Per-channel log decay g = -exp(A_log) * softplus(f_b(f_a x) + dt_bias), fp32, shape [B, T, H, K]."""
        f_BTR = jnp.einsum("btd,dr->btr", x_BTD, self.f_a_proj[...])
        f_BTHK = jnp.einsum("btr,rhk->bthk", f_BTR, self.f_b_proj[...], preferred_element_type=F32)
        z = f_BTHK.astype(F32) + self.dt_bias[...].astype(F32)
        return -jnp.exp(self.A_log[...].astype(F32))[:, None] * softplus_thresholded(z)

    def __call__(self, x_BTD, cache: KDACache | None = None, mask_BT=None, *, return_chunk_states: bool = False,
                 export_starts_BN=None, lora: dict | None = None, kda_impl: str = "auto", sharding=None):
        """Returns (out_BTD, new_cache or None[, chunk_states_BNHKK]).

        With `cache`, the layer continues from its conv tail and recurrent state (prefill continuation or decode).
        `mask_BT` marks real tokens. Masked positions are zeroed before the projections (as transformers does for left
        padding) and are made inert: decay 1 (g = 0) and beta 0, so the state passes through them unchanged, and the
        new conv tail holds the last W-1 *valid* inputs. This makes left padding and right-padded (variable-length)
        continuations exact, e.g. committing B' < T tokens of a padded chunk.
        `export_starts_BN` (no cache; window starts, multiples of the chunk size): return, in place of the cache, the
        decode cache each window would see after the prefix x[:start] (a `KDAExport`), read off the chunked scan's
        boundary states (the recursive block's one-pass layout).
        `lora`: low-rank adapters {"qkv_a" [D, r], "qkv_b" [r, 3, H, K], "o_a" [H, K, r], "o_b" [r, D]} added to
        qkv_proj and o_proj (the recursive block's phase B; zero b at init).
        `kda_impl`: the chunked core's implementation (`ops.kda.KDA_IMPLS`; "auto" resolved for the platform of
        `sharding`'s mesh, else the default backend); `sharding`: the activations' [B, T, D] sharding, which the
        Pallas kernels need to run per shard (`chunked_core`).
        """
        B, T, _ = x_BTD.shape
        if mask_BT is not None:
            x_BTD = x_BTD * mask_BT[:, :, None].astype(x_BTD.dtype)
        u_BT3HK = jnp.einsum("btd,dshk->btshk", x_BTD, self.qkv_proj[...])
        if lora is not None:
            u_BT3HK = u_BT3HK + lora_apply(x_BTD, lora["qkv_a"], lora["qkv_b"], "btd,dr->btr", "btr,rshk->btshk")
        tail = cache.conv_BW3HK if cache is not None else jnp.zeros((B, self.conv_width - 1) + u_BT3HK.shape[2:],
                                                                 u_BT3HK.dtype)
        y_BT3HK, new_tail = causal_depthwise_conv(u_BT3HK, self.conv[...], tail)
        if mask_BT is not None and cache is not None:
            new_tail = last_valid_tail(jnp.concatenate([tail.astype(u_BT3HK.dtype), u_BT3HK], axis=1), mask_BT,
                                       self.conv_width - 1)
        y_BT3HK = jax.nn.silu(y_BT3HK).astype(x_BTD.dtype)
        q_BTHK, k_BTHK, v_BTHK = y_BT3HK[:, :, 0], y_BT3HK[:, :, 1], y_BT3HK[:, :, 2]

        g_BTHK = self.decay(x_BTD)
        beta_BTH = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x_BTD, self.b_proj[...], preferred_element_type=F32))
        if mask_BT is not None:
            g_BTHK = jnp.where(mask_BT[:, :, None, None], g_BTHK, 0.0)
            beta_BTH = jnp.where(mask_BT[:, :, None], beta_BTH, 0.0)
        state = cache.state_BHKK if cache is not None else None
        chunk_states = None
        want_states = return_chunk_states or export_starts_BN is not None
        if T == 1 and not want_states:
            o_BTHK, new_state = kda_recurrent(q_BTHK, k_BTHK, v_BTHK, g_BTHK, beta_BTH, state)
        else:
            core = chunked_core(kda_impl, sharding, self.chunk_size, want_states)
            o_BTHK, new_state, *rest = core(q_BTHK, k_BTHK, v_BTHK, g_BTHK, beta_BTH, state)
            chunk_states = rest[0] if want_states else None
        o_BTHK = o_BTHK.astype(x_BTD.dtype)

        gate_BTR = jnp.einsum("btd,dr->btr", x_BTD, self.g_a_proj[...])
        gate_BTHK = jnp.einsum("btr,rhk->bthk", gate_BTR, self.g_b_proj[...])
        o_BTHK = gated_rms_norm(o_BTHK, gate_BTHK, self.o_norm[...], self.eps)
        out_BTD = jnp.einsum("bthk,hkd->btd", o_BTHK, self.o_proj[...])
        if lora is not None:
            out_BTD = out_BTD + lora_apply(o_BTHK, lora["o_a"], lora["o_b"], "bthk,hkr->btr", "btr,rd->btd")
        if export_starts_BN is not None:
            return out_BTD, self._export(u_BT3HK, tail, chunk_states, export_starts_BN)
        new_cache = KDACache(conv_BW3HK=new_tail, state_BHKK=new_state) if cache is not None else None
        if return_chunk_states:
            return out_BTD, new_cache, chunk_states
        return out_BTD, new_cache

    def _export(self, u_BT3HK, tail, chunk_states_BNHKK, starts_BN) -> KDAExport:
        """Per-window decode caches after the prefix x[:start] (start = a multiple of the chunk size)."""
        Wm1 = self.conv_width - 1
        full = jnp.concatenate([tail.astype(u_BT3HK.dtype), u_BT3HK], axis=1)  # position p sits at p + W-1
        starts_BN = jnp.asarray(starts_BN, jnp.int32)
        states = jnp.take_along_axis(chunk_states_BNHKK, (starts_BN // self.chunk_size)[:, :, None, None, None],
                                     axis=1)
        # The tail before `start` holds the inputs at start-W+1 .. start-1, i.e. full[start : start + W-1].
        take = lambda f, s: jax.lax.dynamic_slice_in_dim(f, s, Wm1, axis=0)
        conv = jax.vmap(lambda f, ss: jax.vmap(lambda s: take(f, s))(ss))(full, starts_BN)
        return KDAExport(conv_BNW3HK=conv, state_BNHKK=states)
