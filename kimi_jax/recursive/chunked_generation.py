"""Chunked recursive generation (RECURSIVE_DESIGN.md §3.10) with static shapes: one jitted prefill, then one jitted
chunk step called until every sample is done. Nothing recompiles from chunk to chunk.

Per chunk and sample:
  1. seed a W-token draft (`seed`): "ar" = W greedy baseline decode steps from the snapshot, "leftover" = the
     uncommitted tail of the previous chunk's final proposal, "mask" = all [M];
  2. inner steps k = 1..K from the same snapshot (rewind), each proposing yhat^k; the verified length is
     v_k = min(W, 1 + LCP(yhat^k, draft fed in)); a sample stops at the fixed point (v_k = W), when the halt
     probability reaches `commit_threshold`, or at K. A `lax.while_loop` ends when every sample has stopped (in
     diagnostic mode it always runs K steps and only records where each sample would have stopped);
  3. the commit length B' (`commit_mode`): "verified" v_k; "learned" the length head's argmax when the halt
     probability is at least `min_commit_threshold` (else v_k); "baseline_verified" 1 + LCP against one extra
     baseline window pass, committing the baseline's tokens; then cut at the first EOS and at max_new_tokens;
  4. the commit pass: the *baseline* model (no edits, no [Z]) over [x_last, c_0 .. c_{B'-2}], padded to W with a
     write mask (KDA inert on padding, MLA keys hidden), advances the snapshot by B' tokens per sample.
Samples keep per-sample write positions in one cache buffer, so the batch never waits for its slowest member.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kimi_jax.decoding import generate_greedy, prepare_inputs
from kimi_jax.model import DecodeCache, KimiLinearForCausalLM, RunOptions
from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.metrics import ChunkTrace, recursive_metrics
from kimi_jax.recursive.sidecar import MASK_ID, Sidecar
from kimi_jax.recursive.window import (StepCarry, baseline_window_argmax, initial_carry, initial_z, refine_step,
                                       verified_length, window_inputs)
from kimi_jax.layers.mla import write_rows

I32 = jnp.int32


@dataclasses.dataclass
class RecursiveResult:
    tokens: np.ndarray  # [B, max_new_tokens] new tokens; after a sample's end, pad_token_id
    num_tokens: np.ndarray  # [B] tokens generated per sample (EOS included)
    traces: list  # per sample: list[ChunkTrace], one per committed chunk
    metrics: dict  # recursive_metrics over every chunk of every sample (empty without recursion)
    num_chunks: int  # chunk steps executed (batch-wide)
    seconds: float  # wall time of the whole call (compiles included on the first call)


@struct.dataclass
class ChunkState:
    """What one chunk step hands the next (per sample; N = max_new_tokens + W output slots)."""
    cache: DecodeCache  # the snapshot of the committed prefix, one write position per sample
    x_last_B: jax.Array  # the last committed token (the next window's first input)
    out_BN: jax.Array  # committed new tokens so far, then pad
    n_out_B: jax.Array  # how many new tokens are committed
    done_B: jax.Array  # bool: EOS committed or max_new_tokens reached
    prev_draft_BW: jax.Array  # the previous chunk's final proposal (the "leftover" seed)
    prev_len_B: jax.Array  # how many of its tokens were committed


def _ar_draft(model, cache: DecodeCache, x_last_B, width: int, opts):
    """W greedy baseline decode steps from the snapshot (a functional copy of the cache; discarded)."""
    def step(carry, _):
        c, tok_B = carry
        logits, c = model(tok_B[:, None], cache=c, opts=opts)
        nxt_B = jnp.argmax(logits[:, 0], axis=-1).astype(I32)
        return (c, nxt_B), nxt_B

    _, toks_WB = jax.lax.scan(step, (cache, x_last_B), None, length=width)
    return toks_WB.T


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "opts"))
def _prefill(graphdef, state, ids_BT, mask_BT, *, cache_len: int, opts: RunOptions):
    """Snapshot after ids[:, :-1] (per-sample write positions), and x_last = ids[:, -1]."""
    model = nnx.merge(graphdef, state)
    B, T = ids_BT.shape
    cache = model.init_cache(B, cache_len).replace(length_B=jnp.zeros((B,), I32))
    if T > 1:
        _, cache = model.hidden_states(ids_BT[:, :-1], cache=cache, attention_mask=mask_BT[:, :-1], opts=opts)
    return cache, ids_BT[:, -1]


@functools.partial(jax.jit, static_argnames=("graphdef", "side_graphdef", "rcfg", "max_new_tokens", "diagnostic",
                                             "opts"))
def _chunk(graphdef, state, side_graphdef, side_state, gen: ChunkState, eos_E, *, rcfg: RecursiveConfig,
           max_new_tokens: int, diagnostic: bool, opts: RunOptions):
    model = nnx.merge(graphdef, state)
    sidecar = nnx.merge(side_graphdef, side_state)
    W, K = rcfg.chunk_width, rcfg.max_inner_steps
    cache, x_last = gen.cache, gen.x_last_B
    B = x_last.shape[0]
    active = ~gen.done_B

    # 1. Seed the draft.
    if rcfg.seed == "ar":
        draft = _ar_draft(model, cache, x_last, W, opts)
    elif rcfg.seed == "leftover":
        idx = jnp.minimum(gen.prev_len_B[:, None] + jnp.arange(W)[None, :], W - 1)
        draft = jnp.take_along_axis(gen.prev_draft_BW, idx, axis=1)
    else:
        draft = jnp.full((B, W), MASK_ID, I32)
    z_init = initial_z(model, sidecar, rcfg, draft)

    # 2. Inner steps from the snapshot.
    rec0 = {
        "stopped": ~active, "stop_step": jnp.zeros((B,), I32), "voluntary": jnp.zeros((B,), bool),
        "fixed_point": jnp.zeros((B,), bool), "verified": jnp.ones((B,), I32),
        "proposal": draft, "halt_prob": jnp.zeros((B,), jnp.float32),
        "length_pred": jnp.ones((B,), I32),
        "proposals": jnp.zeros((K, B, W), I32), "halt_probs": jnp.zeros((K, B), jnp.float32),
    }

    def cond(loop):
        k, _, rec = loop
        return (k < K) & (diagnostic | ~jnp.all(rec["stopped"]))

    def body(loop):
        k, carry, rec = loop
        out, proposal, z, conf = refine_step(model, sidecar, rcfg, cache, x_last, carry, k, z_init, opts=opts)
        v = verified_length(proposal, carry.draft_BW)
        lam = jax.nn.sigmoid(out.halt_B)
        criterion = (v == W) | (lam >= rcfg.commit_threshold)
        now = ~rec["stopped"] & (criterion | (k == K - 1))
        pick = lambda new, old: jnp.where(now.reshape((B,) + (1,) * (new.ndim - 1)), new, old)
        length_pred = (jnp.clip(jnp.argmax(out.length_BL, axis=-1), 1, W).astype(I32)
                       if out.length_BL is not None else v)
        rec = dict(rec, stopped=rec["stopped"] | now, stop_step=pick(k + 1, rec["stop_step"]),
                   voluntary=pick(criterion, rec["voluntary"]), fixed_point=pick(v == W, rec["fixed_point"]),
                   verified=pick(v, rec["verified"]), proposal=pick(proposal, rec["proposal"]),
                   halt_prob=pick(lam, rec["halt_prob"]), length_pred=pick(length_pred, rec["length_pred"]),
                   proposals=rec["proposals"].at[k].set(proposal), halt_probs=rec["halt_probs"].at[k].set(lam))
        return k + 1, StepCarry(proposal, z, out.h_top_BSD.astype(jnp.float32), conf), rec

    executed, _, rec = jax.lax.while_loop(cond, body, (jnp.int32(0), initial_carry(model, sidecar, draft), rec0))

    # 3. Commit length and tokens.
    committed = rec["proposal"]
    if rcfg.commit_mode == "verified":
        length = rec["verified"]
    elif rcfg.commit_mode == "learned":
        length = jnp.where(rec["halt_prob"] >= rcfg.min_commit_threshold, rec["length_pred"], rec["verified"])
    else:  # baseline_verified: the refined proposal is only a draft for the baseline
        committed = baseline_window_argmax(model, cache, x_last, rec["proposal"], opts)
        length = verified_length(committed, rec["proposal"])
    is_eos_BW = jnp.any(committed[:, :, None] == eos_E[None, None, :], axis=-1)
    within_BW = jnp.arange(W)[None, :] < length[:, None]
    first_eos = jnp.argmax(is_eos_BW & within_BW, axis=1)
    length = jnp.where(jnp.any(is_eos_BW & within_BW, axis=1), first_eos + 1, length)
    length = jnp.minimum(length, max_new_tokens - gen.n_out_B)
    length = jnp.where(active, length, 0).astype(I32)

    # 4. Commit pass: the baseline over [x_last, c_0 .. c_{B'-2}], write-masked to B' tokens.
    commit_mask = jnp.arange(W)[None, :] < length[:, None]
    _, new_cache = model.hidden_states(window_inputs(x_last, committed), cache=cache, attention_mask=commit_mask,
                                       opts=opts)
    new_cache = new_cache.replace(length_B=cache.length_B + length)
    last = jnp.take_along_axis(committed, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    eos_committed = jnp.any(is_eos_BW & commit_mask, axis=1)
    n_out = gen.n_out_B + length
    new_gen = ChunkState(
        cache=new_cache, x_last_B=jnp.where(length > 0, last, x_last),
        out_BN=write_rows(gen.out_BN, committed, gen.n_out_B), n_out_B=n_out,
        done_B=gen.done_B | eos_committed | (n_out >= max_new_tokens),
        prev_draft_BW=rec["proposal"], prev_len_B=length)
    record = {k: rec[k] for k in ("stop_step", "voluntary", "fixed_point", "proposals", "halt_probs")}
    record.update(active=active, length=length, executed=executed)
    return new_gen, record


def generate_recursive(model: KimiLinearForCausalLM, sidecar: Sidecar | None, rcfg: RecursiveConfig, input_ids,
                       max_new_tokens: int, *, attention_mask=None, eos_token_id=None, pad_token_id=None,
                       diagnostic: bool = False, progress: bool = False,
                       opts: RunOptions = RunOptions()) -> RecursiveResult:
    """Chunked recursive generation for a (left-padded) batch; plain greedy decoding when recursion is disabled.

    `diagnostic` always runs K inner steps (same output; records the proposals needed for stability@K).
    """
    t0 = time.perf_counter()
    input_ids, mask, eos, pad = prepare_inputs(model, input_ids, max_new_tokens, attention_mask, eos_token_id,
                                               pad_token_id)
    B, T = input_ids.shape

    if not rcfg.recursive_enabled:
        tokens = generate_greedy(model, input_ids, max_new_tokens, attention_mask=mask, eos_token_id=list(eos),
                                 pad_token_id=pad, opts=opts)
        num = _lengths_until_eos(tokens, eos)
        return RecursiveResult(_pad_after(tokens, num, pad), num, [[] for _ in range(B)], {}, 0,
                               time.perf_counter() - t0)
    if sidecar is None:
        raise ValueError("recursive generation needs a sidecar (kimi_jax.recursive.sidecar.build_sidecar)")
    if sidecar.chunk_width != rcfg.chunk_width:
        raise ValueError(f"the sidecar was built for chunk_width {sidecar.chunk_width}, the config says "
                         f"{rcfg.chunk_width}")

    W, K = rcfg.chunk_width, rcfg.max_inner_steps
    graphdef, state = nnx.split(model)
    side_graphdef, side_state = nnx.split(sidecar)
    # Room for the prompt, every new token, and one padded window (W + 1 slots) past the last commit.
    cache, x_last = _prefill(graphdef, state, input_ids, mask, cache_len=T + max_new_tokens + W + 1, opts=opts)
    gen = ChunkState(cache=cache, x_last_B=x_last, out_BN=jnp.full((B, max_new_tokens + W), pad, I32),
                     n_out_B=jnp.zeros((B,), I32), done_B=jnp.zeros((B,), bool),
                     prev_draft_BW=jnp.broadcast_to(x_last[:, None], (B, W)).astype(I32),
                     prev_len_B=jnp.zeros((B,), I32))
    eos_arr = jnp.asarray(eos if eos else (-1,), I32)
    traces: list[list[ChunkTrace]] = [[] for _ in range(B)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=B * max_new_tokens, desc="recursive generate", unit="tok")
    chunks = 0
    while True:
        gen, rec = _chunk(graphdef, state, side_graphdef, side_state, gen, eos_arr, rcfg=rcfg,
                          max_new_tokens=max_new_tokens, diagnostic=diagnostic, opts=opts)
        chunks += 1
        rec = jax.device_get(rec)
        n = int(rec["executed"])
        for b in np.flatnonzero(rec["active"]):
            traces[b].append(ChunkTrace(
                stop_step=int(rec["stop_step"][b]), voluntary=bool(rec["voluntary"][b]), length=int(rec["length"][b]),
                fixed_point=bool(rec["fixed_point"][b]), proposals=np.asarray(rec["proposals"][:n, b]),
                halt_probs=np.asarray(rec["halt_probs"][:n, b], np.float64)))
        if bar is not None:
            bar.update(int(np.sum(rec["length"])))
        if bool(np.all(jax.device_get(gen.done_B))):
            break
    if bar is not None:
        bar.close()
    num = np.asarray(gen.n_out_B)
    tokens = _pad_after(np.asarray(gen.out_BN)[:, :max_new_tokens], num, pad)
    metrics = recursive_metrics([t for per in traces for t in per], W, K)
    return RecursiveResult(tokens, num, traces, metrics, chunks, time.perf_counter() - t0)


def _lengths_until_eos(tokens: np.ndarray, eos) -> np.ndarray:
    num = np.full(tokens.shape[0], tokens.shape[1], np.int64)
    for b in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[b], list(eos))) if eos else []
        if len(hits):
            num[b] = hits[0] + 1
    return num


def _pad_after(tokens: np.ndarray, num: np.ndarray, pad: int) -> np.ndarray:
    tokens = np.array(tokens)
    tokens[np.arange(tokens.shape[1])[None, :] >= num[:, None]] = pad
    return tokens
