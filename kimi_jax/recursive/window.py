"""The window function and the inner refinement loop (RECURSIVE_DESIGN.md §3.1-3.5, §3.7).

A *window* is W input positions [x_last, y_0 .. y_{W-2}] (+ the [Z] slot) run from a *snapshot* of the committed
prefix: the base model's decode cache (KDA recurrent states and conv tails, MLA latents and key mask). Output i
predicts target a + i, so all W targets y_0 .. y_{W-1} are refinable (the Dream shift). Every inner step restarts
from the same snapshot (rewind semantics): the cache a window pass returns is always discarded.

Two ways to obtain snapshots, equal within float tolerance:
  * inference: the decode cache after prefilling / committing the prefix (`kimi_jax.recursive.chunked_generation`);
  * training, one pass: a clean causal forward over whole sequences exports, per layer, the state every window
    needs (`window_snapshots`): KDA boundary states of the chunked scan plus conv tails, MLA latents of the prefix.
    All windows of all sequences are then refined at once, folded into the batch ([B * N, W (+1)]).

Shapes: B batch (or batch x windows), W chunk width, S window slots (W, +1 with [Z]), D hidden, Z d_state, V vocab.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kimi_jax.layers.kda import KDACache, KDAExport
from kimi_jax.layers.mla import MLACache
from kimi_jax.model import DecodeCache, KimiLinearForCausalLM, RunOptions
from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.sidecar import MASK_ID, Sidecar, confidence_features, refine_delta

F32 = jnp.float32
sg = jax.lax.stop_gradient


class WindowOut(NamedTuple):
    logits_BWV: jax.Array  # fp32, output i predicts target a + i
    h_top_BSD: jax.Array  # final-normed top hidden states of every slot ([Z] last)
    halt_B: jax.Array  # halt logit
    length_BL: jax.Array | None  # commit-length logits over 0..W


def embed_draft(model: KimiLinearForCausalLM, sidecar: Sidecar, ids_BW, activation_sharding=None):
    """Token embeddings, with the [M] embedding wherever a draft holds MASK_ID."""
    embeds = model.embed(jnp.maximum(ids_BW, 0), activation_sharding)
    if sidecar.mask_embed is None:
        return embeds
    return jnp.where((ids_BW == MASK_ID)[..., None], sidecar.mask_embed[...].astype(embeds.dtype), embeds)


def window_inputs(x_last_B, draft_BW):
    """[x_last, y_0 .. y_{W-2}]: the window's W input ids."""
    return jnp.concatenate([x_last_B[:, None], draft_BW[:, :-1]], axis=1)


def window_pass(model: KimiLinearForCausalLM, sidecar: Sidecar, cache: DecodeCache, x_last_B, draft_BW, z_BSZ, *,
                gate=1.0, opts: RunOptions = RunOptions()) -> WindowOut:
    """Run one window from the snapshot `cache` with the refine edits (scaled by the runtime scalar `gate`)."""
    W = draft_BW.shape[1]
    embeds_BSD = embed_draft(model, sidecar, window_inputs(x_last_B, draft_BW), opts.activation_sharding)
    if sidecar.num_slots > W:  # [Z] after every window position: nothing attends to it
        z_tok_BD = sidecar.latent_token_embed(z_BSZ).astype(embeds_BSD.dtype)
        embeds_BSD = jnp.concatenate([embeds_BSD, z_tok_BD[:, None]], axis=1)
    eps = sidecar.eps

    def edit(h_BSD, cell):
        return h_BSD + (gate * refine_delta(cell, h_BSD, z_BSZ, eps)).astype(h_BSD.dtype)

    h_BSD, _ = model.hidden_states(embeds_BTD=embeds_BSD, cache=cache, opts=opts, edit_fn=edit,
                                   edits=sidecar.segment_edits(model.config))
    logits_BWV = model.logits(h_BSD[:, :W])
    halt_B, length_BL = sidecar.heads(h_BSD)
    return WindowOut(logits_BWV, h_BSD, halt_B, length_BL)


def baseline_window_argmax(model: KimiLinearForCausalLM, cache: DecodeCache, x_last_B, draft_BW,
                           opts: RunOptions = RunOptions()):
    """Greedy tokens of the *baseline* (no edits, no [Z]) over a window: the check of `baseline_verified`."""
    h_BWD, _ = model.hidden_states(window_inputs(x_last_B, draft_BW), cache=cache, opts=opts)
    return jnp.argmax(model.logits(h_BWD), axis=-1).astype(jnp.int32)


def verified_length(proposal_BW, draft_BW):
    """Jacobi acceptance min(W, 1 + LCP(proposal, draft)): that many leading proposal tokens are greedy tokens."""
    agree_BW = (proposal_BW == draft_BW).astype(jnp.int32)
    lcp_B = jnp.sum(jnp.cumprod(agree_BW, axis=1), axis=1)
    return jnp.minimum(draft_BW.shape[1], 1 + lcp_B)


# ---------------------------------------------------------------------------------------------- inner steps
class StepCarry(NamedTuple):
    draft_BW: jax.Array  # the draft fed into this step (y^{k-1})
    z_BSZ: jax.Array  # the latent used by the previous step
    h_top_BSD: jax.Array  # the previous step's top states (mixer input)
    conf_BW3: jax.Array  # the previous step's confidence features (mixer input)


def initial_carry(model: KimiLinearForCausalLM, sidecar: Sidecar, draft_BW) -> StepCarry:
    B, W = draft_BW.shape
    S, Z, D = sidecar.num_slots, sidecar.mixer_out.shape[0], model.config.hidden_size
    return StepCarry(draft_BW, jnp.zeros((B, S, Z), F32), jnp.zeros((B, S, D), F32), jnp.zeros((B, W, 3), F32))


def refine_step(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig, cache: DecodeCache,
                x_last_B, carry: StepCarry, k, z_init_BSZ, *, gate=1.0, opts: RunOptions = RunOptions()):
    """Inner step k (0-based): update z from the previous step (TRM's z update), then run the window (the full-depth
    "answer" update). The mixer runs *inside* step k, so its parameters are trained by step k's losses even though
    the carry between steps is stop-gradiented. Returns (WindowOut, proposal_BW, z used, confidence_BW3)."""
    draft_embeds = embed_draft(model, sidecar, carry.draft_BW, opts.activation_sharding)
    z_BSZ = sg(carry.z_BSZ)
    for _ in range(rcfg.latent_cycles):
        z_BSZ = sidecar.mix(z_BSZ, sg(carry.h_top_BSD), draft_embeds, sg(carry.conf_BW3), k)
    z_BSZ = jnp.where(k == 0, z_init_BSZ, z_BSZ)
    out = window_pass(model, sidecar, cache, x_last_B, carry.draft_BW, z_BSZ, gate=gate, opts=opts)
    proposal_BW = jnp.argmax(out.logits_BWV, axis=-1).astype(jnp.int32)
    return out, proposal_BW, z_BSZ, confidence_features(out.logits_BWV)


def initial_z(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig, draft_BW,
              activation_sharding=None):
    draft_embeds = (embed_draft(model, sidecar, draft_BW, activation_sharding) if rcfg.z_init == "draft"
                    else None)
    return sidecar.initial_z(draft_BW.shape[0], draft_embeds)


def refine_scan(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig, cache: DecodeCache,
                x_last_B,
                draft_BW, *, gate=1.0, opts: RunOptions = RunOptions(),
                per_step: Callable[[WindowOut, jax.Array, jax.Array], Any] | None = None):
    """All K inner steps as one `jax.lax.scan` (training and diagnostics; generation stops early instead).

    Between steps the draft becomes the stop-gradiented proposal (on-policy drafts) and z is stop-gradiented
    (TRM/HRM deep supervision), except for the last `grad_steps` steps. `per_step(out, draft_in_BW, k)` reduces
    each step's logits to something small (losses, target log-probs); never stack [K, B, W, V].
    Returns ys: {"proposal": [K, B, W], "halt": [K, B], "length": [K, B, W+1] (if the head exists),
    "per_step": stacked per_step outputs}.
    """
    K = rcfg.max_inner_steps
    z_init = initial_z(model, sidecar, rcfg, draft_BW, opts.activation_sharding)

    def body(carry: StepCarry, k):
        out, proposal, z, conf = refine_step(model, sidecar, rcfg, cache, x_last_B, carry, k, z_init, gate=gate,
                                             opts=opts)
        ys = {"proposal": proposal, "halt": out.halt_B}
        if out.length_BL is not None:
            ys["length"] = out.length_BL
        if per_step is not None:
            ys["per_step"] = per_step(out, carry.draft_BW, k)
        keep_grad = k >= K - rcfg.grad_steps
        z_next = jnp.where(keep_grad, z, sg(z))
        return StepCarry(sg(proposal), z_next, out.h_top_BSD.astype(F32), conf), ys

    _, ys = jax.lax.scan(body, initial_carry(model, sidecar, draft_BW), jnp.arange(K))
    return ys


# ---------------------------------------------------------------------------------------------- one-pass snapshots
def window_snapshots(model: KimiLinearForCausalLM, ids_BT, starts_BN, window_width: int, *,
                     opts: RunOptions = RunOptions()):
    """The clean causal stream of the one-pass layout: one forward over whole sequences that also yields, for every
    window (b, n) whose first input sits at position starts[b, n] (a multiple of the KDA chunk, with
    starts + W <= T - 1), the decode cache of the prefix ids[b, :start], folded into a batch of B * N windows.

    Returns (clean final-normed hidden states [B, T, D], window caches, x_last [B * N] = ids at the starts).
    The caches are one `DecodeCache` (the layout of `model.init_cache`) with one write position per window (its
    prefix length), room for the window's W + 1 slots, and a key mask hiding every position at or after the start.
    """
    B, T = ids_BT.shape
    N = starts_BN.shape[1]
    starts_BN = jnp.asarray(starts_BN, jnp.int32)
    h_BTD, export = model.hidden_states(ids_BT, opts=opts, export_starts=starts_BN)
    S = T + window_width + 1

    def fold(v):  # KDA: [R, B, N, ...] -> [R, B * N, ...]
        return v.reshape(v.shape[0], B * N, *v.shape[3:])

    def spread(v):  # MLA: [R, B, T, X] -> [R, B * N, S, X] (the prefix, shared by its windows)
        v = jnp.pad(v, [(0, 0), (0, 0), (0, S - T), (0, 0)])
        return jnp.broadcast_to(v[:, :, None], (v.shape[0], B, N) + v.shape[2:]).reshape(
            v.shape[0], B * N, *v.shape[2:])

    def per_window(entry):
        if isinstance(entry, KDAExport):
            return KDACache(conv_BW3HK=fold(entry.conv_BNW3HK), state_BHKK=fold(entry.state_BNHKK))
        return MLACache(latent_BSR=spread(entry.latent_BSR), k_shared_BSE=spread(entry.k_shared_BSE))

    segments = [[per_window(entry) for entry in seg] for seg in export.segments]
    flat_starts = starts_BN.reshape(B * N)
    cache = DecodeCache(length_B=flat_starts, key_mask_BS=jnp.arange(S)[None, :] < flat_starts[:, None],
                        segments=segments)
    x_last = jnp.take_along_axis(jnp.asarray(ids_BT, jnp.int32), starts_BN, axis=1).reshape(B * N)
    return h_BTD, cache, x_last
