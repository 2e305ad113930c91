"""Kimi-Linear decoder in Flax NNX: embeddings, scanned runs of pre-norm blocks, final norm, untied LM head.

    h = embed[ids]
    for each layer:  h += Mixer(RMSNorm(h))   (KDA or MLA, from the config's schedule)
                     h += FFN(RMSNorm(h))     (dense SwiGLU or MoE)
    logits = RMSNorm(h) @ lm_head             (fp32)

Layers are grouped into segments (kimi_jax.layout): each segment's parameters are stacked over its repeats and run
with `jax.lax.scan`. Caches follow the same structure, so decoding scans too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kimi_jax.config import KDA, MOE, KimiLinearConfig
from kimi_jax.layers.init import normal_param
from kimi_jax.layers.kda import KDACache, KDAExport, KimiDeltaAttention
from kimi_jax.layers.mla import MLACache, MultiHeadLatentAttention, write_rows
from kimi_jax.layers.mlp import SwiGLU
from kimi_jax.layers.moe import MoE
from kimi_jax.layers.norms import RMSNorm
from kimi_jax.layout import Segment, plan_segments
from kimi_jax.sharding import gathered_for_use

F32 = jnp.float32

# Parameters kept in float32 whatever the model dtype (as transformers' _keep_in_fp32_modules_strict): the router
# and its correction bias, and KDA's decay parameters. Keys are suffixes of the parameter path.
FP32_PARAMS = ("ffn.router", "ffn.correction_bias", "mixer.dt_bias", "mixer.A_log")


def keeps_fp32(param_key: str) -> bool:
    return param_key.endswith(FP32_PARAMS)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Static knobs of one forward pass (not part of the checkpoint)."""
    remat: bool = False  # rematerialise each scanned cycle in the backward pass
    # Unroll each segment's scan over its layers into straight-line code: no stacked residual buffers (XLA fills
    # each with zeros, then writes it slice by slice) and fusion across layers, so faster steps on small models
    # (bench train on CPU: 2,545 -> 2,285 ms); compile time grows with the depth, so deep models keep the scan.
    unroll_layers: bool = False
    moe_dispatch: str = "auto"  # "auto" | "gmm" | "ragged" | "tiled" | "dense" (identical maths; layers/moe.py)
    kda_impl: str = "auto"  # "auto" | "xla" | "pallas_tpu" | "pallas_gpu" (identical maths; ops/kda.py)
    # Sharding of the [B, T, D] hidden states between layers (batch over the data-parallel mesh axes). Without it
    # GSPMD may follow the fsdp-sharded embedding table and replicate the whole batch on every device.
    activation_sharding: Any = None


def constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# One layer's cache (stacked over a segment's repeats on a leading axis) and one layer's export of a clean prefix.
LayerCache = KDACache | MLACache
LayerExport = KDAExport | MLACache


@struct.dataclass
class DecodeCache:
    """The model's decode cache for S token slots: one write position and key mask shared by every layer, and each
    layer's own cache laid out like the model's scanned segments."""
    # Where the next tokens are written (= the tokens held so far): () for the whole batch, or [B] per sample
    # (samples then keep separate histories in one buffer, e.g. chunked generation's commits).
    length_B: jax.Array
    key_mask_BS: jax.Array  # [B, S] bool: which slots hold a real (non-padding) token
    segments: list[list[LayerCache]]  # per segment, per cycle position: that layer's cache, [R, ...] over repeats


@struct.dataclass
class PrefixExport:
    """`hidden_states(export_starts=...)`'s second output: per segment, per cycle position ([R, ...] over the
    repeats), what a window starting at each start needs from the clean prefix: a `KDAExport` (KDA states and conv
    tails at each start) or an `MLACache` over the whole sequence (its latents; windows hide the keys past their
    start)."""
    segments: list[list[LayerExport]]


@struct.dataclass
class LayerContext:
    """What every layer of one forward pass shares (built once by `hidden_states`)."""
    visible_BTS: jax.Array  # [B, T, S] bool: query t may attend key s (causality, padding, the cache's key mask)
    mask_BT: jax.Array | None = None  # [B, T] bool: real tokens of this call (None: all)
    # The decode cache's write position (() or [B], as DecodeCache.length_B); None without a cache.
    cache_index_B: jax.Array | None = None
    export_starts_BN: jax.Array | None = None  # window starts to export a PrefixExport for (no cache), or None
    # edit_fn(h_BTD, cell) -> h_BTD: the edit of the residual stream before a block that has an edit "cell" (the
    # recursive block's refine cells); static, not traced.
    edit_fn: Callable | None = struct.field(pytree_node=False, default=None)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: KimiLinearConfig, layer: int, *, rngs: nnx.Rngs, dtype=F32):
        self.mixer_kind, self.ffn_kind = cfg.mixer_types[layer], cfg.ffn_types[layer]
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if self.mixer_kind == KDA:
            self.mixer = KimiDeltaAttention(cfg, rngs=rngs, dtype=dtype)
        else:
            self.mixer = MultiHeadLatentAttention(cfg, rngs=rngs, dtype=dtype)
        if self.ffn_kind == MOE:
            self.ffn = MoE(cfg, rngs=rngs, dtype=dtype)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype)

    def __call__(self, h_BTD, cache: LayerCache | None, ctx: LayerContext, opts: RunOptions, edit=None):
        """`edit`: this layer's {"cell": params for `ctx.edit_fn` (an edit of the residual stream applied before
        the block: the recursive block's refine cells), "lora": low-rank adapters of the mixer's projections}, each
        optional; None leaves the layer untouched."""
        edit = edit or {}
        if edit.get("cell") is not None:
            h_BTD = ctx.edit_fn(h_BTD, edit["cell"])
        x_BTD = self.input_norm(h_BTD)
        export_starts = ctx.export_starts_BN
        if self.mixer_kind == KDA:
            mixed, cache = self.mixer(x_BTD, cache, ctx.mask_BT, export_starts_BN=export_starts,
                                      lora=edit.get("lora"), kda_impl=opts.kda_impl,
                                      sharding=opts.activation_sharding)
        else:
            mixed, cache = self.mixer(x_BTD, cache, visible_BTS=ctx.visible_BTS, cache_index=ctx.cache_index_B,
                                      export=export_starts is not None, lora=edit.get("lora"))
        h_BTD = h_BTD + mixed
        x_BTD = self.post_attention_norm(h_BTD)
        ffn_out = self.ffn(x_BTD, opts.moe_dispatch, opts.activation_sharding) if self.ffn_kind == MOE \
            else self.ffn(x_BTD)
        return h_BTD + ffn_out, cache

    def init_cache(self, batch: int, max_len: int, dtype) -> LayerCache:
        if self.mixer_kind == KDA:
            return self.mixer.init_cache(batch, dtype)
        return self.mixer.init_cache(batch, max_len, dtype)


class LayerStack(nnx.Module):
    """One segment: `period` layer positions, each with parameters stacked over `repeats` on axis 0."""

    def __init__(self, cfg: KimiLinearConfig, segment: Segment, *, rngs: nnx.Rngs, dtype=F32):
        self.segment = segment
        blocks = []
        for position in range(segment.period):
            copies = [DecoderLayer(cfg, segment.layer(position, r), rngs=rngs, dtype=dtype)
                      for r in range(segment.repeats)]
            blocks.append(jax.tree.map(lambda *xs: jnp.stack(xs), *copies))
        self.blocks = nnx.List(blocks)

    def __call__(self, h_BTD, caches: list[LayerCache] | None, ctx: LayerContext, opts: RunOptions, edits=None):
        """`edits`: None, or one entry per cycle position (None = no edit there) stacked over the repeats."""
        exporting = ctx.export_starts_BN is not None
        edits = [None] * len(self.blocks) if edits is None else list(edits)

        def cycle(h, xs):
            blocks, cycle_caches, cycle_edits = xs
            new_caches = []
            for position, block in enumerate(blocks):
                h, c = block(h, None if cycle_caches is None else cycle_caches[position], ctx, opts,
                             edit=cycle_edits[position])
                h = constrain(h, opts.activation_sharding)
                new_caches.append(c)
            return h, (new_caches if cycle_caches is not None or exporting else None)

        if opts.remat:
            cycle = jax.checkpoint(cycle)
        h_BTD, new_caches = jax.lax.scan(cycle, h_BTD, (list(self.blocks), caches, edits),
                                         unroll=True if opts.unroll_layers else 1)
        return h_BTD, new_caches

    def init_cache(self, batch: int, max_len: int, dtype) -> list[LayerCache]:
        caches = []
        for block in self.blocks:
            one = jax.tree.map(lambda a: a[0], block)  # a single (unstacked) layer, for the cache shapes
            c = one.init_cache(batch, max_len, dtype)
            caches.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (self.segment.repeats,) + a.shape), c))
        return caches


class KimiLinearForCausalLM(nnx.Module):
    def __init__(self, cfg: KimiLinearConfig, *, rngs: nnx.Rngs, dtype=F32):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.segments_plan = plan_segments(cfg.layer_kinds)
        self.embed_tokens = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.segments = nnx.List([LayerStack(cfg, seg, rngs=rngs, dtype=dtype) for seg in self.segments_plan])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else normal_param(rngs, (cfg.hidden_size, cfg.vocab_size),
                                                                         dtype)

    # ------------------------------------------------------------------ cache
    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        """Decode cache for `max_len` total tokens: KDA conv tails + fp32 states, MLA latents, one key mask; one
        write position for the batch (`.replace(length_B=jnp.zeros((batch,), jnp.int32))` for one per sample)."""
        return DecodeCache(length_B=jnp.zeros((), jnp.int32), key_mask_BS=jnp.zeros((batch, max_len), bool),
                           segments=[seg.init_cache(batch, max_len, self.dtype) for seg in self.segments])

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids_BT, activation_sharding=None):
        """Token embeddings. With the activations' sharding (a mesh), the table's embed dim is gathered first (as
        FSDP gathers every weight before use): looked up in an embed-sharded table, the rows come out
        embed-sharded, and GSPMD cannot bring their cotangents from the batch sharding back to that without
        replicating them whole (its "Involuntary full rematerialization", on meshes that split the batch over
        more axes than the weights, e.g. fsdp=2,expert=4 or data=2,fsdp=4)."""
        table_VD = gathered_for_use(self.embed_tokens[...], ("vocab", None), activation_sharding)
        return jnp.take(table_VD, input_ids_BT, axis=0)

    def hidden_states(self, input_ids_BT=None, *, embeds_BTD=None, cache: DecodeCache | None = None,
                      attention_mask=None, opts: RunOptions = RunOptions(), edit_fn=None, edits=None,
                      export_starts=None):
        """Final-normed hidden states [B, T, D] and the new cache (None without one).

        `embeds_BTD` replaces the token embeddings (inputs that are not tokens, e.g. the recursive block's [Z]
        slot). `cache.length_B` is the write position: a scalar, or one per sample ([B]; samples then keep
        separate histories in one buffer, with `key_mask_BS` marking each sample's valid keys).
        `edits` (per segment, per cycle position: {"cell", "lora"} stacked over the repeats, or None) edit those
        layers: `edit_fn(h_BTD, cell)` changes the residual stream before the block (the recursive block's refine
        cells), "lora" adds low-rank adapters to the mixer's projections (its phase B).
        `export_starts` [B, N] (no cache): instead of a cache, return a `PrefixExport` holding per layer what a
        window starting at each start needs from this prefix (KDA states and conv tails, MLA latents).
        """
        if embeds_BTD is None:
            embeds_BTD = self.embed(input_ids_BT, opts.activation_sharding)
        B, T = embeds_BTD.shape[:2]
        h_BTD = constrain(embeds_BTD, opts.activation_sharding)
        mask_BT = None if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            causal_TS = jnp.tril(jnp.ones((T, T), bool))
            visible_BTS = causal_TS[None] if mask_BT is None else causal_TS[None] & mask_BT[:, None, :]
            visible_BTS = jnp.broadcast_to(visible_BTS, (B, T, T))
            start = None
        else:
            start = cache.length_B
            S = cache.key_mask_BS.shape[1]
            new_mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT
            key_mask_BS = write_rows(cache.key_mask_BS, new_mask_BT, start)
            query_pos_BT = jnp.broadcast_to(start, (B,))[:, None] + jnp.arange(T)[None, :]
            causal_BTS = jnp.arange(S)[None, None, :] <= query_pos_BT[:, :, None]
            visible_BTS = causal_BTS & key_mask_BS[:, None, :]
        ctx = LayerContext(visible_BTS=visible_BTS, mask_BT=mask_BT, cache_index_B=start,
                           export_starts_BN=export_starts, edit_fn=edit_fn)
        new_segment_caches = []
        for s, seg in enumerate(self.segments):
            h_BTD, c = seg(h_BTD, None if cache is None else cache.segments[s], ctx, opts,
                           edits=None if edits is None else edits[s])
            new_segment_caches.append(c)
        h_BTD = self.norm(h_BTD)
        if export_starts is not None:
            return h_BTD, PrefixExport(segments=new_segment_caches)
        new_cache = None if cache is None else DecodeCache(length_B=cache.length_B + T, key_mask_BS=key_mask_BS,
                                                           segments=new_segment_caches)
        return h_BTD, new_cache

    def head(self):
        """The LM head [D, V] (the embedding table, transposed, when tied)."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, h_BTD):
        return jnp.einsum("btd,dv->btv", h_BTD, self.head(), preferred_element_type=F32)

    def __call__(self, input_ids_BT, *, cache=None, attention_mask=None, opts: RunOptions = RunOptions()):
        """logits_BTV (fp32) without a cache; (logits_BTV, new_cache) with one."""
        h_BTD, new_cache = self.hidden_states(input_ids_BT, cache=cache, attention_mask=attention_mask, opts=opts)
        logits_BTV = self.logits(h_BTD)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _apply(graphdef, state, input_ids_BT, cache, attention_mask_BT, opts: RunOptions):
    model = nnx.merge(graphdef, state)
    return model(input_ids_BT, cache=cache, attention_mask=attention_mask_BT, opts=opts)


def forward(model: KimiLinearForCausalLM, input_ids_BT, *, cache=None, attention_mask=None,
            opts: RunOptions = RunOptions()):
    """Jitted `model(...)`: split once per call, compiled once per (shapes, opts). Same returns as `model(...)`.

    Eager NNX calls dispatch op by op (seconds per call even for tiny models); use this outside of jit.
    """
    graphdef, state = nnx.split(model)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    return _apply(graphdef, state, jnp.asarray(input_ids_BT, jnp.int32), cache, mask, opts)
