"""Kimi Delta Attention cores: a token-recurrent reference and an exact chunked form.

Both take the prepared per-head inputs (after the short conv, before the l2 norm) and run all maths in float32:

    q_BTHK, k_BTHK : queries / keys, l2-normalised inside (eps 1e-6 inside the sqrt, as fla)
    v_BTHV         : values
    g_BTHK         : per-channel log decay (<= 0, *unbounded* below: the 48B checkpoint reaches ~ -2000 per token)
    beta_BTH       : delta-rule step size in (0, 1)
    state_BHKV     : initial recurrent state (fp32), zero if None

Recurrence per token (spec §2.4):  S <- diag(exp g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t.

The chunked form (spec §2.5, chunk C = 64) never factors exp(G_i - G_j) into exp(G_i) * exp(-G_j): with unbounded
gates -G_j exceeds 88 within a chunk and overflows fp32. It builds the intra-chunk matrices by *recursive halving*:
for a block of 2b rows, the pairs (i in the second half, j in the first half) all straddle the midpoint m, so

    exp(G_i - G_j) = exp(sum_{m < t <= i} g_t) * exp(sum_{j < t <= m} g_t),    both exponents <= 0,

which turns that quarter of the block into one GEMM of decayed rows by decayed columns; the two diagonal halves
recurse down to single tokens (exp(0) = 1). Every exponent is a direct sum of same-signed terms (accurate to fp32
relative precision, never a difference of cumulative sums), so nothing overflows and nothing cancels. The inverse
(I + A)^-1 of the unit lower-triangular WY system is built alongside by block substitution,
[[M11, 0], [A21, M22]]^-1 = [[T11, 0], [-T22 A21 T11, T22]], which is as stable as forward substitution and uses
only matmuls (they partition under GSPMD on every backend; CPU `solve_triangular` is a LAPACK call that deadlocks
when batch-sharded). The work is O(C^2 K) per chunk, the same order as the plain GEMM form.

The sequential part is a `lax.scan` over groups of chunks: each step builds the intra-chunk matrices of its group
(batched) and then carries the state through the group's chunks. Grouping keeps the working set in cache on CPU
(batched small matmuls over all chunks at once run several times below peak there) and amortises the per-step
overhead; on accelerators a larger group batches more of the intra-chunk work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x, eps: float = 1e-6):
    """x / sqrt(sum x^2 + eps) over the last axis, in fp32 (fla's in-kernel l2norm, not max(||x||, eps))."""
    x = x.astype(F32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH):
    q = l2_normalize(q_BTHK) * (q_BTHK.shape[-1] ** -0.5)
    k = l2_normalize(k_BTHK)
    return q, k, v_BTHV.astype(F32), g_BTHK.astype(F32), beta_BTH.astype(F32)


def _zero_state(q_BTHK, v_BTHV):
    B, _, H, K = q_BTHK.shape
    return jnp.zeros((B, H, K, v_BTHV.shape[-1]), F32)


def kda_recurrent(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV=None):
    """Token-by-token reference (`lax.scan` over T). Returns (o_BTHV fp32, final state_BHKV fp32)."""
    q, k, v, g, beta = _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH)
    S = _zero_state(q, v) if state_BHKV is None else state_BHKV.astype(F32)

    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, g_BHK, b_BH = xs
        S_BHKV = S_BHKV * jnp.exp(g_BHK)[..., None]
        kS_BHV = jnp.einsum("bhk,bhkv->bhv", k_BHK, S_BHKV, precision=HIGHEST)
        delta_BHV = (v_BHV - kS_BHV) * b_BH[..., None]
        S_BHKV = S_BHKV + k_BHK[..., None] * delta_BHV[..., None, :]
        o_BHV = jnp.einsum("bhk,bhkv->bhv", q_BHK, S_BHKV, precision=HIGHEST)
        return S_BHKV, o_BHV

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    S, o_TBHV = jax.lax.scan(step, S, xs)
    return jnp.moveaxis(o_TBHV, 0, 1), S


def _intra_chunk(q_LCK, k_LCK, a_LCK, beta_LC):
    """Exact intra-chunk matrices of the WY form for chunks of C = 2^n tokens (any leading dims L).

    Works in the decay domain: a_t = exp(g_t) in [0, 1], and every decay between two tokens is a product of such
    factors, D(i, j) = prod_{j < t <= i} a_t (a product of numbers in [0, 1] never overflows, and it underflows only
    where the true decay is below fp32's range). Returns
      T_LCC  : (I + A)^-1, with A_ij = beta_i sum_d k_i k_j D(i, j) for j < i (unit lower-triangular inverse)
      P_LCC  : P_ij = sum_d q_i k_j D(i, j) for j <= i, zero above the diagonal
      Din_LCK  : prod_{t <= i} a_t, the decay from the chunk start through token i
      Dout_LCK : prod_{j < t < C} a_t, the decay from after token j to the chunk end
    """
    *lead, C, K = k_LCK.shape
    # One flat leading axis: simpler dots (and XLA:CPU 0.10 segfaulted differentiating the 3-batch-dim form).
    L = (int(np.prod(lead)),)
    q_LCK, k_LCK, a_LCK = (x.reshape(L + (C, K)) for x in (q_LCK, k_LCK, a_LCK))
    beta_LC = beta_LC.reshape(L + (C,))
    # Block size b = 1: every block is one token. pre / suf: inclusive prefix / exclusive suffix products in a block.
    pre = a_LCK[..., :, None, :]
    suf = jnp.ones_like(pre)
    T = jnp.ones(L + (C, 1, 1), F32)
    P = jnp.sum(q_LCK * k_LCK, axis=-1)[..., :, None, None]
    kq_LC2K = jnp.stack([k_LCK * beta_LC[..., None], q_LCK], axis=-2)  # rows of A (beta-scaled keys) and of P
    b = 1
    while b < C:
        n = C // (2 * b)
        pre2, suf2 = pre.reshape(L + (n, 2, b, K)), suf.reshape(L + (n, 2, b, K))
        # Second-half rows decayed back to the midpoint, first-half columns decayed up to it.
        rows_Lnb2K = kq_LC2K.reshape(L + (n, 2, b, 2, K))[..., 1, :, :, :] * pre2[..., 1, :, None, :]
        cols_LnbK = k_LCK.reshape(L + (n, 2, b, K))[..., 0, :, :] * suf2[..., 0, :, :]
        # Each matmul over one flat batch axis M = L * n (see kda_chunked on XLA:CPU and multi-batch-dim dots).
        M = L[0] * n
        cross_Ln2bb = jnp.einsum("misk,mjk->msij", rows_Lnb2K.reshape(M, b, 2, K), cols_LnbK.reshape(M, b, K),
                                 precision=HIGHEST).reshape(L + (n, 2, b, b))
        A21, P21 = cross_Ln2bb[..., 0, :, :], cross_Ln2bb[..., 1, :, :]
        T2, P2 = T.reshape(L + (n, 2, b, b)), P.reshape(L + (n, 2, b, b))
        T11, T22 = T2[..., 0, :, :], T2[..., 1, :, :]
        mm = lambda x, y: jnp.einsum("mij,mjk->mik", x.reshape(M, b, b), y.reshape(M, b, b),
                                     precision=HIGHEST).reshape(L + (n, b, b))
        T21 = -mm(T22, mm(A21, T11))
        zeros = jnp.zeros(L + (n, b, b), F32)
        T = jnp.concatenate([jnp.concatenate([T11, zeros], -1), jnp.concatenate([T21, T22], -1)], -2)
        P = jnp.concatenate([jnp.concatenate([P2[..., 0, :, :], zeros], -1),
                             jnp.concatenate([P21, P2[..., 1, :, :]], -1)], -2)
        # Merge: the second half's prefixes gain the first half's total, the first half's suffixes the second's.
        pre = jnp.concatenate([pre2[..., 0, :, :], pre2[..., 1, :, :] * pre2[..., 0, -1:, :]], -2)
        suf = jnp.concatenate([suf2[..., 0, :, :] * pre2[..., 1, -1:, :], suf2[..., 1, :, :]], -2)
        b *= 2
    out = lambda x, last: x.reshape(tuple(lead) + (C, last))
    return out(T, C), out(P, C), out(pre, K), out(suf, K)


def _default_chunks_per_step(batch_heads: int) -> int:
    """On CPU about 16 (sample, head, chunk) triples per step keep a step's working set in cache (measured: 4 heads,
    batch 1 -> 4 chunks; batch 4 -> 1); accelerators batch more of the intra-chunk work."""
    return max(1, 16 // batch_heads) if jax.default_backend() == "cpu" else 16


def _scan_remat_backward(step, carry0, xs):
    """`lax.scan(step, carry0, xs)` whose backward recomputes each step from its saved input carry (the state at
    the step's first chunk, which `step` also emits) instead of storing every intermediate of the intra-chunk
    construction: the same as `jax.checkpoint(step)` under a scan for the gradient (1.5x faster than storing on
    CPU), without checkpoint's cost on a forward-only call (it slowed the plain forward by ~40%)."""

    @jax.custom_vjp
    def run(carry0, xs):
        return jax.lax.scan(step, carry0, xs)

    def run_fwd(carry0, xs):
        carry, (ys, states) = jax.lax.scan(step, carry0, xs)
        first_BHKV = states[:, :, :, 0]  # [steps, B, H, K, V]: each step's input carry
        return (carry, (ys, states)), (xs, first_BHKV.reshape((first_BHKV.shape[0],) + carry0.shape))

    def run_bwd(residuals, cotangents):
        xs, carries_in = residuals
        d_carry, (d_ys, d_states) = cotangents

        def back(d_carry, per_step):
            x, carry_in, d_y, d_state = per_step
            _, vjp = jax.vjp(step, carry_in, x)
            d_carry_in, d_x = vjp((d_carry, (d_y, d_state)))
            return d_carry_in, d_x

        d_carry0, d_xs = jax.lax.scan(back, d_carry, (xs, carries_in, d_ys, d_states), reverse=True)
        return d_carry0, d_xs

    run.defvjp(run_fwd, run_bwd)
    return run(carry0, xs)


def kda_chunked(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV=None, *, chunk_size: int = 64,
                chunks_per_step: int | None = None, return_chunk_states: bool = False):
    """Chunked (WY / UT) KDA, exact for unbounded per-channel gates.

    chunk_size must be a power of two (spec: 64). chunks_per_step chunks are handled per scan step (default: about
    16 // (batch * heads) on CPU, 16 elsewhere; fewer when the sequence has fewer chunks). Each step is
    rematerialised in the backward pass (only the carried state is saved per step): on CPU that is 1.5x faster
    than storing every intermediate of the intra-chunk construction (see `_scan_remat_backward`). Returns (o_BTHV fp32, final state_BHKV fp32) or,
    with `return_chunk_states`, also chunk_states_BNHKV: the state *before* chunk n (after n * chunk_size tokens;
    n = 0 is the initial state), for every chunk n.
    """
    C = chunk_size
    if C < 1 or C & (C - 1):
        raise ValueError(f"kda_chunked: chunk_size must be a power of two, got {C}")
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    S0 = _zero_state(q_BTHK, v_BTHV) if state_BHKV is None else state_BHKV.astype(F32)
    n_chunks = -(-T // C)
    G = max(1, min(chunks_per_step or _default_chunks_per_step(B * H), n_chunks))
    n_steps = -(-n_chunks // G)
    pad = n_steps * G * C - T
    xs = (q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH)
    if pad:
        # Zero padding is inert: g = 0 keeps the state, beta = k = 0 adds nothing.
        xs = tuple(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs)
    # [B, T, H, *] -> [steps, B, G, C, H, *] is a reshape (no copy for B = 1). The l2 norms, the decays a = exp(g)
    # and the heads-first layout are done per step, while the group is in cache: as separate passes over the whole
    # sequence they cost more than the rest of the kernel once T * H * K outgrows the cache.
    xs = tuple(jnp.moveaxis(x.reshape(B, n_steps, G, C, *x.shape[2:]), 1, 0) for x in xs)
    heads_first = lambda x: jnp.moveaxis(x, 3, 1)  # [B, G, C, H, *] -> [B, H, G, C, *]

    # Inside a step every matmul has one flat batch axis (N = B * H, or N * G): XLA:CPU 0.10 segfaulted on some
    # multi-batch-dim dots of this kernel's backward, and a flat axis is the plainest form for every backend.
    N = B * H

    def group_step(S_NKV, xs):
        q, k, v, g, beta = _prepare(*map(heads_first, xs))
        flat = lambda x: x.reshape(N, G, C, *x.shape[4:])
        q_NGCK, k_NGCK, v_NGCV, g_NGCK, beta_NGC = map(flat, (q, k, v, g, beta))
        T_NGCC, P_NGCC, Din_NGCK, Dout_NGCK = _intra_chunk(q_NGCK, k_NGCK, jnp.exp(g_NGCK), beta_NGC)
        # (I + A) [U | W] = [beta V | beta K Din]  (the UT transform)
        rhs_NGCX = jnp.concatenate([v_NGCV * beta_NGC[..., None], k_NGCK * beta_NGC[..., None] * Din_NGCK], axis=-1)
        UW_NGCX = jnp.einsum("nij,njx->nix", T_NGCC.reshape(N * G, C, C), rhs_NGCX.reshape(N * G, C, V + K),
                             precision=HIGHEST).reshape(N, G, C, V + K)
        # Rows that read the state: W (what the state already predicts, to subtract) and the decayed queries.
        reads_NGXK = jnp.concatenate([UW_NGCX[..., V:], q_NGCK * Din_NGCK], axis=-2)
        k_to_end_NGCK = k_NGCK * Dout_NGCK
        chunk_decay_NGK = Din_NGCK[:, :, -1, :]
        outs, states = [], []
        for c in range(G):  # the state recursion: sequential over the group's chunks
            states.append(S_NKV)
            read_NXV = jnp.einsum("nxk,nkv->nxv", reads_NGXK[:, c], S_NKV, precision=HIGHEST)
            v_new_NCV = UW_NGCX[:, c, :, :V] - read_NXV[:, :C]
            outs.append(read_NXV[:, C:] + jnp.einsum("nij,njv->niv", P_NGCC[:, c], v_new_NCV, precision=HIGHEST))
            S_NKV = (S_NKV * chunk_decay_NGK[:, c, :, None]
                     + jnp.einsum("nck,ncv->nkv", k_to_end_NGCK[:, c], v_new_NCV, precision=HIGHEST))
        o_BGCHV = jnp.moveaxis(jnp.stack(outs, axis=1).reshape(B, H, G, C, V), 1, 3)
        return S_NKV, (o_BGCHV, jnp.stack(states, axis=1).reshape(B, H, G, K, V))

    S_final, (o_sBGCHV, states_sBHGKV) = _scan_remat_backward(group_step, S0.reshape(N, K, V), xs)
    S_final = S_final.reshape(B, H, K, V)
    o_BTHV = jnp.moveaxis(o_sBGCHV, 0, 1).reshape(B, n_steps * G * C, H, V)[:, :T]
    if return_chunk_states:
        states_BNHKV = jnp.moveaxis(states_sBHGKV, (0, 2), (1, 3)).reshape(B, n_steps * G, H, K, V)[:, :n_chunks]
        return o_BTHV, S_final, states_BNHKV
    return o_BTHV, S_final
