"""Multi-head latent attention without RoPE (spec §3), with a compressed latent cache for decoding.

Shapes: B batch, T query tokens, S key tokens, D hidden, H heads, R kv_lora_rank, N qk_nope dim, E shared key dim
(qk_rope_head_dim; never rotated), V v_head_dim, Q q_lora_rank.
    q_proj [D, H, N+E]  (or q_a_proj [D, Q], q_a_norm [Q], q_b_proj [Q, H, N+E])
    kv_a_proj [D, R+E]  kv_a_norm [R]  kv_b_proj [R, H, N+V]  o_proj [H, V, D]

Cache per layer: `MLACache` (latents [B, S, R] after kv_a_norm, shared keys [B, S, E]); the model keeps one key
mask and one write position for all MLA layers. Prefill without a cache expands K/V per head (the training path);
with a cache, the key projection is absorbed into the query and the value projection applied after attention, so
the per-token cost stays R+E numbers per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kimi_jax.config import KimiLinearConfig
from kimi_jax.layers.init import normal_param
from kimi_jax.layers.lora import lora_apply
from kimi_jax.layers.norms import rms_norm

F32 = jnp.float32


@struct.dataclass
class MLACache:
    """One MLA layer's keys, compressed: S key slots (a decode cache's buffer, or an exported prefix's tokens).

    Inside the model's scanned segments every field carries a leading [R] axis (the segment's repeats).
    """
    latent_BSR: jax.Array  # [B, S, R] the kv latents after kv_a_norm (keys and values are projected from them)
    k_shared_BSE: jax.Array  # [B, S, E] the key part shared by every head (never rotated)


def write_rows(buffer_BS, new_BT, index):
    """Write `new_BT` into `buffer_BS` along axis 1 at `index`: one offset for the batch (shape ()) or one per
    sample (shape [B], e.g. chunked generation where samples have committed different lengths)."""
    new_BT = new_BT.astype(buffer_BS.dtype)
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(buffer_BS, new_BT, index, axis=1)
    return jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis=0))(
        buffer_BS, new_BT, index)


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, cfg: KimiLinearConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        R, N, E, V = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.num_heads, self.nope_dim, self.shared_dim, self.v_dim, self.rank = H, N, E, V, R
        self.latent_eps = cfg.mla_latent_norm_eps
        self.scale = (N + E) ** -0.5
        self.q_lora = cfg.q_lora_rank is not None
        if self.q_lora:
            Q = cfg.q_lora_rank
            self.q_a_proj = normal_param(rngs, (D, Q), dtype)
            self.q_a_norm = nnx.Param(jnp.ones((Q,), dtype))
            self.q_b_proj = normal_param(rngs, (Q, H, N + E), dtype)
        else:
            self.q_proj = normal_param(rngs, (D, H, N + E), dtype)
        self.kv_a_proj = normal_param(rngs, (D, R + E), dtype)
        self.kv_a_norm = nnx.Param(jnp.ones((R,), dtype))
        self.kv_b_proj = normal_param(rngs, (R, H, N + V), dtype)
        self.o_proj = normal_param(rngs, (H, V, D), dtype)

    def init_cache(self, batch: int, max_len: int, dtype) -> MLACache:
        return MLACache(latent_BSR=jnp.zeros((batch, max_len, self.rank), dtype),
                        k_shared_BSE=jnp.zeros((batch, max_len, self.shared_dim), dtype))

    def queries(self, x_BTD, lora=None):
        """Per-head queries; `lora` adds a low-rank update to q_proj (or q_b_proj with q_lora_rank)."""
        if self.q_lora:
            qa = rms_norm(jnp.einsum("btd,dq->btq", x_BTD, self.q_a_proj[...]), self.q_a_norm[...], self.latent_eps)
            q = jnp.einsum("btq,qhc->bthc", qa, self.q_b_proj[...])
            src = qa
        else:
            q = jnp.einsum("btd,dhc->bthc", x_BTD, self.q_proj[...])
            src = x_BTD
        if lora is not None:
            q = q + lora_apply(src, lora["q_a"], lora["q_b"], "btd,dr->btr", "btr,rhc->bthc")
        return q

    def latents(self, x_BTD):
        c_BTX = jnp.einsum("btd,dx->btx", x_BTD, self.kv_a_proj[...])
        latent_BTR = rms_norm(c_BTX[..., :self.rank], self.kv_a_norm[...], self.latent_eps)
        return latent_BTR, c_BTX[..., self.rank:]

    def __call__(self, x_BTD, cache: MLACache | None = None, *, visible_BTS, cache_index=None, export: bool = False,
                 lora: dict | None = None):
        """visible_BTS[b, t, s]: query t may attend key s (causality and padding, built by the model).

        Without a cache the keys are this call's own tokens (S = T). With a cache, this call's latents are written
        at `cache_index` (a scalar, or one offset per sample) and the keys are the whole cache (S = its length).
        `export` (no cache): return this call's latents (an `MLACache` over S = T) in place of the cache, so that
        windows can later attend to this prefix (the recursive block's one-pass layout).
        `lora`: low-rank adapters {"q_a", "q_b", "o_a" [H, V, r], "o_b" [r, D]} on the query and output projections
        (the recursive block's phase B; zero b at init).
        """
        dtype = x_BTD.dtype
        q_BTHC = self.queries(x_BTD, lora)
        q_nope_BTHN, q_shared_BTHE = q_BTHC[..., :self.nope_dim], q_BTHC[..., self.nope_dim:]
        latent_BTR, k_shared_BTE = self.latents(x_BTD)
        w_k_RHN = self.kv_b_proj[..., :self.nope_dim]
        w_v_RHV = self.kv_b_proj[..., self.nope_dim:]
        def attention_probs(nope_scores_BHTS, k_shared_BSE):
            # Softmax in fp32 over the NoPE scores plus the shared (never rotated) key part; the mask uses a finite
            # minimum so a fully masked (padding) row stays NaN-free.
            scores_BHTS = nope_scores_BHTS + jnp.einsum("bthe,bse->bhts", q_shared_BTHE, k_shared_BSE,
                                                        preferred_element_type=F32)
            scores_BHTS = jnp.where(visible_BTS[:, None], scores_BHTS * self.scale, jnp.finfo(F32).min)
            return jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)

        if cache is None:
            k_nope_BSHN = jnp.einsum("bsr,rhn->bshn", latent_BTR, w_k_RHN)
            v_BSHV = jnp.einsum("bsr,rhv->bshv", latent_BTR, w_v_RHV)
            probs_BHTS = attention_probs(
                jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=F32), k_shared_BTE)
            o_BTHV = jnp.einsum("bhts,bshv->bthv", probs_BHTS, v_BSHV)
            new_cache = MLACache(latent_BSR=latent_BTR, k_shared_BSE=k_shared_BTE) if export else None
        else:
            latent_BSR = write_rows(cache.latent_BSR, latent_BTR, cache_index)
            k_shared_BSE = write_rows(cache.k_shared_BSE, k_shared_BTE, cache_index)
            new_cache = MLACache(latent_BSR=latent_BSR, k_shared_BSE=k_shared_BSE)
            latent_BSR, k_shared_BSE = latent_BSR.astype(dtype), k_shared_BSE.astype(dtype)
            # Absorb W_k into the query: q_nope . (W_k c) = (W_k^T q_nope) . c; apply W_v after attention.
            q_lat_BTHR = jnp.einsum("bthn,rhn->bthr", q_nope_BTHN, w_k_RHN)
            probs_BHTS = attention_probs(
                jnp.einsum("bthr,bsr->bhts", q_lat_BTHR, latent_BSR, preferred_element_type=F32), k_shared_BSE)
            ctx_BTHR = jnp.einsum("bhts,bsr->bthr", probs_BHTS, latent_BSR)
            o_BTHV = jnp.einsum("bthr,rhv->bthv", ctx_BTHR, w_v_RHV)
        out_BTD = jnp.einsum("bthv,hvd->btd", o_BTHV, self.o_proj[...])
        if lora is not None:
            out_BTD = out_BTD + lora_apply(o_BTHV, lora["o_a"], lora["o_b"], "bthv,hvr->btr", "btr,rd->btd")
        return out_BTD, new_cache
