"""The one-pass two-stream recursive objective (RECURSIVE_DESIGN.md §3.6-3.8).

For a batch of sequences [B, T]:
  1. the clean stream: one causal forward of the base (stop-gradiented in phases A/B) that yields the clean logits
     and every window's prefix snapshot (`window_snapshots`);
  2. the initial drafts y^0 of all B * N windows, by the corruption mix: tf-argmax drafts (the base's own greedy
     guesses given the true prefix), model-sampled replacements, uniform replacements, [M] masks, each at a rate
     t ~ U[beta, omega] per window;
  3. the noisy stream: K inner steps over all windows at once (`refine_scan`), reduced per step to the target
     log-probabilities and the proposals, never [K, B, W, V];
  4. the six losses, each weighted once: final_ce, masked_ce, halt (BCE against final_agree / target_exact),
     length (CE against the LCP length), ponder (expected steps under the PonderNet halting distribution,
     differentiable), stability (hinge "do not un-fix a right token").

Window grid: window n of sequence b has its first input at s = r0_b + n W (r0_b a random multiple of the KDA chunk
below W), inputs s .. s+W-1, targets ids[s+1 .. s+W]; `weights[b, p]` scores the prediction of ids[b, p+1].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.sidecar import MASK_ID, Sidecar
from kimi_jax.recursive.window import refine_scan, window_snapshots

F32 = jnp.float32
I32 = jnp.int32
sg = jax.lax.stop_gradient
CORRUPTIONS = ("tf_argmax", "sampled", "uniform", "mask")


def num_windows(seq_len: int, width: int, chunk: int = 64) -> int:
    """Windows per sequence such that every offset r0 < W fits: r0 + N W + 1 <= T for r0 up to W - chunk."""
    n = (seq_len - 1 - (width - chunk)) // width
    if n < 1:
        raise ValueError(f"seq_len {seq_len} holds no window of width {width} (need at least {2 * width - chunk + 1})")
    return n


def window_starts(key, batch: int, seq_len: int, width: int, chunk: int = 64):
    """[B, N] window starts with a random 64-aligned offset per sequence (commit boundaries not always at k W)."""
    N = num_windows(seq_len, width, chunk)
    r0_B = jax.random.randint(key, (batch,), 0, width // chunk) * chunk
    return r0_B[:, None] + jnp.arange(N)[None, :] * width


def corruption_ceiling(rcfg: RecursiveConfig, progress) -> jax.Array:
    """omega annealed from corruption_rate to corruption_rate_final over training progress in [0, 1]."""
    p = jnp.clip(jnp.asarray(progress, F32), 0.0, 1.0)
    shape = {"constant": jnp.zeros_like(p), "linear": p, "cosine": 0.5 * (1 - jnp.cos(math.pi * p))}
    return rcfg.corruption_rate + (rcfg.corruption_rate_final - rcfg.corruption_rate) * shape[rcfg.corruption_schedule]


def initial_drafts(key, rcfg: RecursiveConfig, clean_logits_NWV, targets_NW, vocab: int, progress):
    """y^0 for every window by the corruption mix. Returns (drafts_NW, kind_N index into CORRUPTIONS)."""
    N, W = targets_NW.shape
    k_kind, k_rate, k_pick, k_gumbel, k_uniform = jax.random.split(key, 5)
    mix = rcfg.corruption_mix_dict
    probs = jnp.asarray([mix.get(name, 0.0) for name in CORRUPTIONS], F32)
    kind_N = jax.random.categorical(k_kind, jnp.log(probs), shape=(N,))
    omega = corruption_ceiling(rcfg, progress)
    beta = rcfg.corruption_min_rate
    rate_N = beta + jax.random.uniform(k_rate, (N,), F32) * (omega - beta)  # t ~ U[beta, omega] per window
    picked_NW = jax.random.uniform(k_pick, (N, W)) < rate_N[:, None]
    logits = sg(clean_logits_NWV.astype(F32))
    tf_argmax_NW = jnp.argmax(logits, axis=-1).astype(I32)
    # A sample from the clean distribution (temperature 1) that is never the true token: Gumbel-max without it.
    gumbel = jax.random.gumbel(k_gumbel, logits.shape, F32)
    not_true = jnp.where(jax.nn.one_hot(targets_NW, vocab, dtype=bool), -jnp.inf, logits)
    sampled_NW = jnp.argmax(not_true + gumbel, axis=-1).astype(I32)
    uniform_NW = jax.random.randint(k_uniform, (N, W), 0, vocab, I32)
    replaced = jnp.stack([tf_argmax_NW, jnp.where(picked_NW, sampled_NW, targets_NW),
                          jnp.where(picked_NW, uniform_NW, targets_NW),
                          jnp.where(picked_NW, MASK_ID, targets_NW)])
    return jnp.take_along_axis(replaced, kind_N[None, :, None], axis=0)[0], kind_N


def _lcp(a_NW, b_NW, valid_NW):
    """Leading positions where a == b, counting invalid (padding) positions as agreeing."""
    agree = ((a_NW == b_NW) | ~valid_NW).astype(I32)
    return jnp.sum(jnp.cumprod(agree, axis=1), axis=1)


def recursive_losses(rcfg: RecursiveConfig, ys: dict, targets_NW, valid_NW, eos_ids=()):
    """The six losses and their weighted total from the scan's per-step reductions (§3.8).

    ys: "logp" [K, N, W] target log-probs, "proposal" [K, N, W], "draft" [K, N, W] (the draft fed into step k),
    "halt" [K, N] logits, "length" [K, N, W+1] logits (if the head exists).
    """
    K = rcfg.max_inner_steps
    m = valid_NW.astype(F32)
    ce_KNW = -ys["logp"]
    safe = lambda num, den: num / jnp.maximum(den, 1.0)
    final_ce = safe(jnp.sum(ce_KNW[-1] * m), jnp.sum(m))
    wrong_KNW = (ys["draft"] != targets_NW[None]).astype(F32) * m[None]
    masked_ce = jnp.mean(jax.vmap(lambda ce, e: safe(jnp.sum(ce * e), jnp.sum(e)))(ce_KNW, wrong_KNW))

    final_KNW = jnp.broadcast_to(ys["proposal"][-1][None], ys["proposal"].shape)
    reference = final_KNW if rcfg.halt_target == "final_agree" else jnp.broadcast_to(targets_NW[None],
                                                                                   ys["proposal"].shape)
    agree_KN = jnp.all((ys["proposal"] == reference) | ~valid_NW[None], axis=-1).astype(F32)
    halt_logits = ys["halt"].astype(F32)
    bce = jnp.mean(jnp.maximum(halt_logits, 0) - halt_logits * agree_KN + jnp.log1p(jnp.exp(-jnp.abs(halt_logits))))

    # PonderNet halting distribution with lambda_K := 1; ponder = normalised expected steps (differentiable).
    lam_KN = jax.nn.sigmoid(halt_logits).at[-1].set(1.0)
    survive_KN = jnp.cumprod(jnp.concatenate([jnp.ones_like(lam_KN[:1]), 1 - lam_KN[:-1]]), axis=0)
    p_KN = lam_KN * survive_KN
    steps_K = jnp.arange(1, K + 1, dtype=F32)
    expected_steps_N = jnp.sum(p_KN * steps_K[:, None], axis=0)
    ponder = jnp.mean(expected_steps_N) / K
    if rcfg.ponder_kl_beta > 0:
        prior = rcfg.ponder_prior * (1 - rcfg.ponder_prior) ** (steps_K - 1)
        prior = prior / jnp.sum(prior)
        kl = jnp.mean(jnp.sum(p_KN * (jnp.log(p_KN + 1e-12) - jnp.log(prior)[:, None]), axis=0))
        ponder = ponder + rcfg.ponder_kl_beta * kl

    length = jnp.zeros((), F32)
    if "length" in ys:
        ref_len = ys["proposal"][-1] if rcfg.length_target == "final_agree" else targets_NW
        target_KN = jax.vmap(lambda prop: _lcp(prop, ref_len, valid_NW))(ys["proposal"])
        if eos_ids:
            is_eos = jnp.any(targets_NW[..., None] == jnp.asarray(eos_ids)[None, None, :], axis=-1) & valid_NW
            eos_cap_N = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, targets_NW.shape[1])
            target_KN = jnp.minimum(target_KN, eos_cap_N[None])
        logp_len = jax.nn.log_softmax(ys["length"].astype(F32), axis=-1)
        length = -jnp.mean(jnp.take_along_axis(logp_len, target_KN[..., None], axis=-1))

    stability = jnp.zeros((), F32)
    if K > 1:
        right_KNW = (ys["proposal"][:-1] == targets_NW[None]).astype(F32) * m[None]
        hinge = jnp.maximum(0.0, sg(ys["logp"][:-1]) - ys["logp"][1:])
        stability = jnp.mean(jax.vmap(lambda h, c: safe(jnp.sum(h * c), jnp.sum(c)))(hinge, right_KNW))

    if rcfg.halting_mode == "pondernet":
        # PonderNet: the halting-weighted reconstruction replaces the last-step CE, the KL prior replaces ponder.
        ce_KN = jnp.sum(ce_KNW * m[None], axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)[None]
        final_ce = jnp.mean(jnp.sum(p_KN * ce_KN, axis=0))
        bce = jnp.zeros((), F32)
    losses = {"final_ce": final_ce, "masked_ce": masked_ce, "halt": bce, "length": length, "ponder": ponder,
              "stability": stability}
    weights = {"final_ce": rcfg.lambda_final, "masked_ce": rcfg.lambda_masked, "halt": rcfg.lambda_halt,
               "length": rcfg.lambda_length, "ponder": rcfg.lambda_ponder, "stability": rcfg.lambda_stability}
    losses["total"] = sum(weights[k] * v for k, v in losses.items())
    correct_KNW = (ys["proposal"] == targets_NW[None]) & valid_NW[None]
    # Training-time views of the generation metrics under the halting distribution p: the chance of halting
    # before the cap K (commit_rate) and the expected verified commit length sum_k p_k min(W, 1 + LCP(yhat^k, y^k-1)).
    verified_KN = jnp.minimum(targets_NW.shape[1], 1 + jax.vmap(
        lambda prop, draft: jnp.sum(jnp.cumprod((prop == draft).astype(I32), axis=1), axis=1))(
            ys["proposal"], ys["draft"]))
    stats = {"expected_steps": jnp.mean(expected_steps_N),
             "commit_rate": jnp.mean(1.0 - p_KN[-1]),
             "avg_chunk_length": jnp.mean(jnp.sum(p_KN * verified_KN.astype(F32), axis=0)),
             "step_accuracy": jnp.sum(correct_KNW, axis=(1, 2)) / jnp.maximum(jnp.sum(m), 1.0),
             "halt_agree_rate": jnp.mean(agree_KN, axis=1),
             "halt_prob": jnp.mean(jax.nn.sigmoid(halt_logits), axis=1)}  # mean lambda_k of the halt head, per step
    return losses, stats


def recursive_objective(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig, batch: dict, key,
                        *, progress=0.0, train_base: bool = False, opts: RunOptions = RunOptions(),
                        eos_ids=()):
    """(total loss, metrics) for one batch {"input_ids": [B, T], "weights": [B, T]} (weights of next-token targets).

    With `train_base` False (phases A/B) the clean stream is stop-gradiented: no base gradient is ever formed.
    """
    ids_BT = jnp.asarray(batch["input_ids"], I32)
    B, T = ids_BT.shape
    W = rcfg.chunk_width
    k_starts, k_drafts = jax.random.split(key)
    starts_BN = window_starts(k_starts, B, T, W, model.config.kda_chunk_size)
    N = starts_BN.shape[1]
    h_BTD, cache, x_last = window_snapshots(model, ids_BT, starts_BN, W, opts=opts)
    if not train_base:
        h_BTD, cache = sg(h_BTD), sg(cache)
    offsets_NW = (starts_BN.reshape(B * N)[:, None] + jnp.arange(W)[None, :])  # input positions s .. s+W-1
    rows = jnp.repeat(jnp.arange(B), N)[:, None]
    targets_NW = ids_BT[rows, offsets_NW + 1]
    valid_NW = jnp.asarray(batch["weights"])[rows, offsets_NW] > 0
    clean_logits_NWV = model.logits(h_BTD[rows, offsets_NW])
    drafts_NW, kind_N = initial_drafts(k_drafts, rcfg, clean_logits_NWV, targets_NW, model.config.vocab_size,
                                       progress)

    def per_step(out, draft_in, k):
        logp = jax.nn.log_softmax(out.logits_BWV.astype(F32), axis=-1)
        return {"logp": jnp.take_along_axis(logp, targets_NW[..., None], axis=-1)[..., 0], "draft": draft_in}

    ys = refine_scan(model, sidecar, rcfg, cache, x_last, drafts_NW, opts=opts, per_step=per_step)
    flat = {"logp": ys["per_step"]["logp"], "draft": ys["per_step"]["draft"], "proposal": ys["proposal"],
            "halt": ys["halt"]}
    if "length" in ys:
        flat["length"] = ys["length"]
    losses, stats = recursive_losses(rcfg, flat, targets_NW, valid_NW, eos_ids)
    clean_ce = -jnp.take_along_axis(jax.nn.log_softmax(clean_logits_NWV.astype(F32), -1), targets_NW[..., None],
                                    axis=-1)[..., 0]
    stats["clean_ce"] = jnp.sum(clean_ce * valid_NW) / jnp.maximum(jnp.sum(valid_NW), 1)
    stats["tokens"] = jnp.sum(valid_NW)
    return losses["total"], {"loss": losses, "stats": stats}
