"""The window function, the refine edits and the one-pass layout (RECURSIVE_DESIGN.md §3.3-3.7, §3.11 T1/T2).

The base is a random tiny Kimi-Linear (KDA + MLA + MoE); its LM head is scaled up so that greedy argmaxes are far
from ties (random tiny models otherwise have top-2 gaps near float noise).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.sidecar import build_sidecar
from kimi_jax.recursive.window import refine_scan, window_pass, window_snapshots

W = 64
T = 3 * W + 5  # room for windows starting at 0, 64, 128 (targets up to start + W <= T - 1)


def small_rcfg(**kw) -> RecursiveConfig:
    base = dict(chunk_width=W, max_inner_steps=3, d_state=32, refine_rank=16, gate_hidden=32, mixer_heads=4,
                commit_mode="verified", seed="leftover")
    base.update(kw)
    return RecursiveConfig(**base)


def make_model(seed: int = 0, head_scale: float = 50.0) -> KimiLinearForCausalLM:
    # MLA at 1 and 3 (two MLA layers, one scanned KDA/MLA cycle), dense layer 0.
    cfg = tiny(num_hidden_layers=4, mla_layers=(1, 3), first_k_dense=1)
    model = KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * head_scale
    return model


def randomize_sidecar(sidecar, seed: int, scale: float = 0.3):
    """Give every zero-initialised output matrix (refine cells' b) random values: a *trained-looking* sidecar."""
    key = jax.random.PRNGKey(seed)
    sidecar.cells.b[...] = jax.random.normal(key, sidecar.cells.b[...].shape) * scale
    return sidecar


@pytest.fixture(scope="module")
def model():
    """Plain initialisation: logits of order 1, so absolute tolerances mean what they say."""
    return make_model(head_scale=1.0)


@pytest.fixture(scope="module")
def sharp_model():
    """Scaled LM head: argmax comparisons across programs are far from ties."""
    return make_model()


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(7).integers(3, 512, (2, T)).astype(np.int32)


# ---------------------------------------------------------------------------------------------- jitted helpers
@functools.partial(jax.jit, static_argnames=("gd", "sgd"))
def _one_pass_window(gd, state, sgd, sstate, ids_BT, starts_BN, drafts_BNW, gate):
    """All windows of all sequences at once, from the clean stream's exported snapshots."""
    model, sidecar = nnx.merge(gd, state), nnx.merge(sgd, sstate)
    h, cache, x_last = window_snapshots(model, ids_BT, starts_BN, W)
    B, N = starts_BN.shape
    z = sidecar.initial_z(B * N)
    out = window_pass(model, sidecar, cache, x_last, drafts_BNW.reshape(B * N, W), z, gate=gate)
    return out.logits_BWV, out.halt_B, out.length_BL, model.logits(h)


@functools.partial(jax.jit, static_argnames=("gd", "sgd", "prefix_len"))
def _rewind_window(gd, state, sgd, sstate, ids_BT, drafts_BW, *, prefix_len: int):
    """Inference layout: prefill the prefix ids[:, :start] into a decode cache, then run the window."""
    model, sidecar = nnx.merge(gd, state), nnx.merge(sgd, sstate)
    B = ids_BT.shape[0]
    cache = model.init_cache(B, prefix_len + W + 1)
    if prefix_len:
        _, cache = model.hidden_states(ids_BT[:, :prefix_len], cache=cache)
    z = sidecar.initial_z(B)
    out = window_pass(model, sidecar, cache, ids_BT[:, prefix_len], drafts_BW, z)
    return out.logits_BWV, out.halt_B, out.length_BL


def split(m):
    return nnx.split(m)


def true_drafts(ids, starts):
    """Drafts equal to the true next tokens (no corruption): window (b, n) holds ids[b, s+1 : s+1+W]."""
    return np.stack([np.stack([ids[b, s + 1:s + 1 + W] for s in row]) for b, row in enumerate(starts)])


STARTS = np.array([[0, 64, 128], [128, 0, 64]], np.int32)


# ---------------------------------------------------------------------------------------------- T1 / T2
@pytest.mark.slow
def test_t1_zero_sidecar_equals_gated_off_bitwise(model, ids):
    """T1: in one compiled program, the zeroed sidecar (b = 0) and the sidecar gated off give identical bits; so does
    a non-zero sidecar gated off (the gate multiplies every edit by exactly 0)."""
    rcfg = small_rcfg()
    gd, st = split(model)
    zero = build_sidecar(model.config, rcfg)
    sgd, zero_st = split(zero)
    _, live_st = split(randomize_sidecar(build_sidecar(model.config, rcfg), 1))
    drafts = true_drafts(ids, STARTS)
    on = _one_pass_window(gd, st, sgd, zero_st, ids, STARTS, drafts, jnp.float32(1.0))
    off = _one_pass_window(gd, st, sgd, zero_st, ids, STARTS, drafts, jnp.float32(0.0))
    live_off = _one_pass_window(gd, st, sgd, live_st, ids, STARTS, drafts, jnp.float32(0.0))
    chex.assert_trees_all_equal(np.asarray(on[0]), np.asarray(off[0]))
    chex.assert_trees_all_equal(np.asarray(on[0]), np.asarray(live_off[0]))


@pytest.mark.slow
def test_t2_uncorrupted_window_equals_clean_causal_logits(model, ids):
    """T2: a window whose draft is the true continuation reproduces the clean causal logits (fp32, <= 1e-5)."""
    rcfg = small_rcfg()
    gd, st = split(model)
    sgd, sst = split(build_sidecar(model.config, rcfg))
    window_logits, _, _, clean_logits = _one_pass_window(gd, st, sgd, sst, ids, STARTS, true_drafts(ids, STARTS),
                                                         jnp.float32(1.0))
    window_logits = np.asarray(window_logits).reshape(2, 3, W, -1)
    full = np.asarray(model(jnp.asarray(ids)))  # a separate program: the plain causal forward
    chex.assert_trees_all_close(np.asarray(clean_logits), full, atol=1e-5, rtol=0)
    for b in range(2):
        for n, s in enumerate(STARTS[b]):
            chex.assert_trees_all_close(window_logits[b, n], full[b, s:s + W], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_one_pass_equals_rewind_inference_with_live_sidecar(model, ids):
    """All windows of a batch in one pass == chunk-by-chunk rewind inference, with a non-zero sidecar, corrupted
    drafts and the [Z] slot (<= 1e-5 on logits, halt and length logits)."""
    rcfg = small_rcfg()
    gd, st = split(model)
    sgd, sst = split(randomize_sidecar(build_sidecar(model.config, rcfg), 2))
    rng = np.random.default_rng(3)
    drafts = true_drafts(ids, STARTS)
    drafts = np.where(rng.random(drafts.shape) < 0.4, rng.integers(3, 512, drafts.shape), drafts).astype(np.int32)
    logits, halt, length, _ = _one_pass_window(gd, st, sgd, sst, ids, STARTS, drafts, jnp.float32(1.0))
    logits = np.asarray(logits).reshape(2, 3, W, -1)
    halt, length = np.asarray(halt).reshape(2, 3), np.asarray(length).reshape(2, 3, -1)
    for b in range(2):
        for n, s in enumerate(STARTS[b]):
            ref_logits, ref_halt, ref_length = _rewind_window(gd, st, sgd, sst, ids[b:b + 1], drafts[b:b + 1, n],
                                                              prefix_len=int(s))
            chex.assert_trees_all_close(logits[b, n], np.asarray(ref_logits)[0], atol=1e-5, rtol=0)
            chex.assert_trees_all_close(halt[b, n], np.asarray(ref_halt)[0], atol=1e-5, rtol=0)
            chex.assert_trees_all_close(length[b, n], np.asarray(ref_length)[0], atol=1e-5, rtol=0)


def test_live_sidecar_changes_logits(model, ids):
    """The edits are really wired into the forward pass: a non-zero sidecar moves the window logits."""
    rcfg = small_rcfg()
    gd, st = split(model)
    sgd, zero_st = split(build_sidecar(model.config, rcfg))
    _, live_st = split(randomize_sidecar(build_sidecar(model.config, rcfg), 4))
    drafts = true_drafts(ids, STARTS)
    zero = np.asarray(_one_pass_window(gd, st, sgd, zero_st, ids, STARTS, drafts, jnp.float32(1.0))[0])
    live = np.asarray(_one_pass_window(gd, st, sgd, live_st, ids, STARTS, drafts, jnp.float32(1.0))[0])
    assert np.max(np.abs(zero - live)) > 1.0
    # Edits act on window positions only: the first window position sees the refined residual too, so every
    # position may move; but the clean stream (outputs [3]) is untouched.
    clean_zero = np.asarray(_one_pass_window(gd, st, sgd, zero_st, ids, STARTS, drafts, jnp.float32(1.0))[3])
    clean_live = np.asarray(_one_pass_window(gd, st, sgd, live_st, ids, STARTS, drafts, jnp.float32(1.0))[3])
    chex.assert_trees_all_equal(clean_zero, clean_live)


def test_layers_to_refine_subset_edits_only_those_layers(model, ids):
    """Refining only layer 2 (inside a scanned KDA/MLA cycle whose other repeat is not refined) still changes the
    logits, and the cell stack holds exactly one layer."""
    rcfg = small_rcfg(layers_to_refine=[2])
    side = randomize_sidecar(build_sidecar(model.config, rcfg), 5)
    assert side.cells.b[...].shape[0] == 1
    gd, st = split(model)
    sgd, sst = split(side)
    drafts = true_drafts(ids, STARTS)
    live = np.asarray(_one_pass_window(gd, st, sgd, sst, ids, STARTS, drafts, jnp.float32(1.0))[0])
    off = np.asarray(_one_pass_window(gd, st, sgd, sst, ids, STARTS, drafts, jnp.float32(0.0))[0])
    assert np.max(np.abs(live - off)) > 1e-2


# ---------------------------------------------------------------------------------------------- the scan and gradients
def _scan_loss(sidecar, model, rcfg, ids, starts, drafts):
    targets = jnp.asarray(true_drafts(ids, starts)).reshape(-1, W)  # host arrays: computed at trace time
    ids, starts = jnp.asarray(ids), jnp.asarray(starts)
    h, cache, x_last = window_snapshots(model, ids, starts, W)
    B, N = starts.shape

    def per_step(out, draft_in, k):
        logp = jax.nn.log_softmax(out.logits_BWV, axis=-1)
        ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
        return ce

    ys = refine_scan(model, sidecar, rcfg, cache, x_last, jnp.asarray(drafts).reshape(B * N, W), per_step=per_step)
    loss = jnp.sum(ys["per_step"]) + jnp.mean(jax.nn.softplus(ys["halt"])) + jnp.mean(ys["length"] ** 2) * 1e-3
    return loss, ys


@pytest.mark.slow
def test_gradients_reach_every_sidecar_parameter(model, ids):
    rcfg = small_rcfg(max_inner_steps=3)
    side = randomize_sidecar(build_sidecar(model.config, rcfg), 6, scale=0.05)
    starts = STARTS[:, :2]
    drafts = true_drafts(ids, starts)
    sgd, sst = nnx.split(side)
    gd, st = nnx.split(model)

    @jax.jit
    def grads(sst):
        return jax.grad(lambda s: _scan_loss(nnx.merge(sgd, s), nnx.merge(gd, st), rcfg, ids, starts,
                                             drafts)[0])(sst)

    g = grads(sst)
    flat = {"/".join(map(str, path)): float(jnp.sum(jnp.abs(v[...]))) for path, v in nnx.to_flat_state(g)}
    assert flat, "no sidecar parameters"
    missing = [name for name, total in flat.items() if not (total > 0 and np.isfinite(total))]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.slow
def test_gradients_at_zero_init_reach_the_output_matrices(model, ids):
    """At the surgery (b = 0) the first gradient is on b (and the heads): training can leave the zero point."""
    rcfg = small_rcfg(max_inner_steps=2)
    side = build_sidecar(model.config, rcfg)
    starts = STARTS[:, :1]
    sgd, sst = nnx.split(side)
    gd, st = nnx.split(model)
    g = jax.jit(jax.grad(lambda s: _scan_loss(nnx.merge(sgd, s), nnx.merge(gd, st), rcfg, ids, starts,
                                              true_drafts(ids, starts))[0]))(sst)
    assert float(jnp.sum(jnp.abs(g["cells"]["b"][...]))) > 0
    assert float(jnp.sum(jnp.abs(g["halt_head"]["b2"][...]))) > 0


def test_scan_steps_rewind_and_carry_proposals(sharp_model, ids):
    """Every scan step restarts from the snapshot: with the zero sidecar, step k's proposal is the baseline's argmax
    given the previous proposal as draft (a Jacobi iteration), which we recompute by hand with window_pass."""
    rcfg = small_rcfg(max_inner_steps=3)
    side = build_sidecar(sharp_model.config, rcfg)
    starts = STARTS[:, :1]
    drafts = np.random.default_rng(9).integers(3, 512, (2, 1, W)).astype(np.int32)
    model = sharp_model
    sgd, sst = nnx.split(side)
    gd, st = nnx.split(model)
    ys = jax.jit(lambda s: _scan_loss(nnx.merge(sgd, s), nnx.merge(gd, st), rcfg, ids, starts, drafts)[1])(sst)
    proposals = np.asarray(ys["proposal"])
    draft = drafts[:, 0]
    for k in range(3):
        logits, _, _ = _rewind_window(gd, st, sgd, sst, ids[:1], draft[:1], prefix_len=0)
        expect = np.asarray(logits).argmax(-1)
        chex.assert_trees_all_equal(proposals[k, 0], expect[0])
        draft = proposals[k]


# ---------------------------------------------------------------------------------------------- masked commits
@pytest.mark.slow
def test_right_padded_commit_equals_exact_prefill(model, ids):
    """A commit pass over W positions with only the first B' valid leaves exactly the cache of a prefill of those
    B' tokens: KDA states and conv tails equal, and the next decode step gives the same logits."""
    B = 2
    prefix = 40
    valid = np.array([5, 17])

    @jax.jit
    def run(state):
        m = nnx.merge(gd, state)
        cache = m.init_cache(B, prefix + W + 2).replace(length_B=jnp.zeros((B,), jnp.int32))
        _, cache = m.hidden_states(jnp.asarray(ids[:, :prefix]), cache=cache)
        chunk = jnp.asarray(ids[:, prefix:prefix + W])
        mask = jnp.arange(W)[None, :] < jnp.asarray(valid)[:, None]
        _, padded = m.hidden_states(chunk, cache=cache, attention_mask=mask)
        padded = padded.replace(length_B=cache.length_B + jnp.asarray(valid))
        nxt = jnp.take_along_axis(chunk, jnp.asarray(valid)[:, None], axis=1)
        logits, _ = m(nxt, cache=padded)
        return padded, logits

    gd, st = nnx.split(model)
    padded, logits = run(st)
    for b in range(B):
        exact_ids = ids[b:b + 1, :prefix + valid[b] + 1]
        full = np.asarray(model(jnp.asarray(exact_ids)))
        chex.assert_trees_all_close(np.asarray(logits)[b, 0], full[0, -1], atol=2e-5, rtol=0)
