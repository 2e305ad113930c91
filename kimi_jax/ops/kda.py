"""Kimi Delta Attention cores: a token-recurrent reference and an exact chunked form.

Both take the prepared per-head inputs (after the short conv, before the l2 norm) and run all maths in float32:

    q_BTHK, k_BTHK : queries / keys, l2-normalised inside (eps 1e-6 inside the sqrt, as fla)
    v_BTHV         : values
    g_BTHK         : per-channel log decay (<= 0, *unbounded* below: the 48B checkpoint reaches ~ -2000 per token)
    beta_BTH       : delta-rule step size in (0, 1)
    state_BHKV     : initial recurrent state (fp32), zero if None

Recurrence per token (spec §2.4):  S <- diag(exp g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t.

The chunked form (spec §2.5, chunk C = 64) never factors exp(G_i - G_j) into exp(G_i) * exp(-G_j): with unbounded
gates -G_j exceeds 88 within a chunk and overflows fp32. Instead each chunk is split into sub-blocks of `sub` rows:
  * diagonal sub-blocks use exact pairwise differences G_i - G_j (j <= i, masked *before* exp);
  * off-diagonal sub-blocks (row block I, columns j < start of I) use a GEMM through the anchor r = start of I:
    exp(G_i - G_j) = exp(G_i - G_r) * exp(G_r - G_j), where both exponents are <= 0 because G is non-increasing.
This keeps every exponent non-positive (no overflow, at worst a harmless underflow of a tiny true value) while
materialising only C*sub*K pairwise terms per chunk instead of C*C*K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def _range_sum_mask(rows: int, cols: int, length: int, row_end, col_start):
    """M[i, j, t] = 1 where col_start(j) < t <= row_end(i): selects the tokens whose log decays lie between j and i."""
    t = jnp.arange(length)
    return ((col_start[None, :, None] < t[None, None, :]) & (t[None, None, :] <= row_end[:, None, None])).astype(F32)


def _intra_chunk_scores(x_NSsK, k_NCK, g_NCK, sub: int, include_diagonal: bool):
    """sum_d x_i[d] k_j[d] exp(G_i[d] - G_j[d]) for all j <= i (or j < i) inside each chunk, without overflow.

    G_i - G_j = sum_{j < t <= i} g_t is always formed as a *direct sum of same-signed terms* over its token range,
    never as a difference of cumulative sums: after a token with g ~ -2000, |G| ~ 1e5 and a difference of cumsums
    keeps only ~1e-2 absolute accuracy in fp32, which corrupts exp(G_i - G_j) exactly where it is O(1).

    Shapes: N = batch*heads*chunks, S = C // sub row blocks of s rows, C = chunk length, K = key dim.
    Returns scores_NSsC (row i = I*sub + a, column j), zero above the diagonal (or on it, if excluded).
    """
    N, S, s, K = x_NSsK.shape
    C = S * s
    g_NSsK = g_NCK.reshape(N, S, s, K)
    # Anchor of row block I is its first row r = I*s. For i in I: G_i - G_r = sum_{r < t <= i} g_t <= 0.
    row_exp_NSsK = jnp.cumsum(g_NSsK.at[:, :, 0, :].set(0.0), axis=2)
    # For j < r: G_r - G_j = sum_{j < t <= r} g_t <= 0; columns at or after r are masked before exp.
    anchors = jnp.arange(S) * s
    col_mask_SCt = _range_sum_mask(S, C, C, anchors, jnp.arange(C))
    col_exp_NSCK = jnp.einsum("ijt,ntk->nijk", col_mask_SCt, g_NCK, precision=HIGHEST)
    col_before_SC = jnp.arange(C)[None, :] < anchors[:, None]
    col_exp_NSCK = jnp.where(col_before_SC[None, :, :, None], col_exp_NSCK, -jnp.inf)
    k_scaled_NSCK = k_NCK[:, None, :, :] * jnp.exp(col_exp_NSCK)
    off_NSsC = jnp.einsum("nisk,nick->nisc", x_NSsK * jnp.exp(row_exp_NSsK), k_scaled_NSCK, precision=HIGHEST)

    # Diagonal blocks: exact pairwise G_a - G_b = sum_{b < t <= a} g_t, masked before exp (exp(-inf) = 0).
    k_NSsK = k_NCK.reshape(N, S, s, K)
    pair_mask_abt = _range_sum_mask(s, s, s, jnp.arange(s), jnp.arange(s))
    diff_NSabK = jnp.einsum("abt,nitk->niabk", pair_mask_abt, g_NSsK, precision=HIGHEST)
    tri_ab = jnp.tril(jnp.ones((s, s), bool), 0 if include_diagonal else -1)
    diff_NSabK = jnp.where(tri_ab[None, None, :, :, None], diff_NSabK, -jnp.inf)
    diag_NSab = jnp.einsum("niak,nibk,niabk->niab", x_NSsK, k_NSsK, jnp.exp(diff_NSabK), precision=HIGHEST)
    # Place each diagonal block at its own column block.
    eye_SS = jnp.eye(S, dtype=F32)
    diag_NSsC = jnp.einsum("niab,ij->niajb", diag_NSab, eye_SS).reshape(N, S, s, C)
    return off_NSsC + diag_NSsC


def unit_lower_solve(A_NCC, rhs_NCX):
    """Solve (I + A) X = rhs for strictly lower-triangular A, with matmuls only.

    A is nilpotent (A^C = 0), so (I + A)^-1 = (I - A)(I + A^2)(I + A^4)...(I + A^(C/2)): log2(C) squarings, exact in
    exact arithmetic. Matmuls partition cleanly under GSPMD on every backend, whereas `solve_triangular` lowers to a
    LAPACK custom call on CPU that deadlocks when batch-sharded across devices. The product form is less stable than
    substitution when keys are far from orthogonal (small head dims, little decay: ~1e-5 relative error), so one
    step of iterative refinement follows, reusing the powers; it brings the error back to substitution's (~2e-7).
    """
    C = A_NCC.shape[-1]
    mm = lambda a, b: jnp.einsum("nij,njx->nix", a, b, precision=HIGHEST)
    powers = []  # A^2, A^4, ..., A^(2^k) < C
    power, span = A_NCC, 2
    while span < C:
        power = mm(power, power)
        powers.append(power)
        span *= 2

    def inverse_times(rhs):
        X = rhs - mm(A_NCC, rhs)
        for p in powers:
            X = X + mm(p, X)
        return X

    X = inverse_times(rhs_NCX)
    residual = rhs_NCX - X - mm(A_NCC, X)
    return X + inverse_times(residual)


def kda_chunked(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV=None, *, chunk_size: int = 64,
                sub_block: int = 16, return_chunk_states: bool = False):
    """Chunked (WY / UT) KDA, exact for unbounded per-channel gates.

    Returns (o_BTHV fp32, final state_BHKV fp32) or, with `return_chunk_states`, also chunk_states_BNHKV: the state
    *before* chunk n (after n * chunk_size tokens; n = 0 is the initial state), for every chunk n.
    """
    q, k, v, g, beta = _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    sub = min(sub_block, C)
    if C % sub:
        raise ValueError(f"kda_chunked: chunk_size {C} is not a multiple of sub_block {sub}")
    S0 = _zero_state(q, v) if state_BHKV is None else state_BHKV.astype(F32)
    pad = (-T) % C
    if pad:
        # Zero padding is inert: g = 0 keeps the state, beta = k = 0 adds nothing.
        padT = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q, k, v, g, beta = map(padT, (q, k, v, g, beta))
    Tp = T + pad
    nC = Tp // C

    # [B, T, H, *] -> [B, H, nC, C, *]
    to_chunks = lambda a: jnp.moveaxis(a, 2, 1).reshape(B, H, nC, C, *a.shape[3:])
    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))
    # Within-chunk cumulative log decays, each a same-signed sum (accurate to fp32 relative precision):
    # G_i = sum_{t <= i} g_t from the chunk start, and E_j = G_last - G_j = sum_{j < t <= last} g_t to its end.
    gcum = jnp.cumsum(g, axis=3)
    g_to_end = jnp.flip(jnp.cumsum(jnp.flip(jnp.concatenate([g[:, :, :, 1:], jnp.zeros_like(g[:, :, :, :1])], 3),
                                            3), 3), 3)

    flat = lambda a: a.reshape(B * H * nC, *a.shape[3:])
    qf, kf, gf, betaf = flat(q), flat(k), flat(g), flat(beta)
    N = B * H * nC
    blocks = lambda a: a.reshape(N, C // sub, sub, a.shape[-1])
    # A_ij = beta_i sum_d k_i k_j exp(G_i - G_j), strictly lower; P_ij = sum_d q_i k_j exp(G_i - G_j), j <= i.
    A_NCC = _intra_chunk_scores(blocks(kf), kf, gf, sub, include_diagonal=False).reshape(N, C, C)
    A_NCC = A_NCC * betaf[:, :, None]
    P_NCC = _intra_chunk_scores(blocks(qf), kf, gf, sub, include_diagonal=True).reshape(N, C, C)

    # (I + A) [U | W] = [beta V | beta K exp(G)]: unit lower-triangular solve (the UT transform).
    rhs_NCX = jnp.concatenate([flat(v) * betaf[..., None], kf * betaf[..., None] * jnp.exp(flat(gcum))], axis=-1)
    UW_NCX = unit_lower_solve(A_NCC, rhs_NCX)
    unflat = lambda a: a.reshape(B, H, nC, *a.shape[1:])
    U_BHNCV, W_BHNCK = unflat(UW_NCX[..., :V]), unflat(UW_NCX[..., V:])
    P_BHNCC = unflat(P_NCC)
    q_decayed = q * jnp.exp(gcum)  # exponent <= 0
    g_last_BHNK = gcum[:, :, :, -1, :]
    k_to_end = k * jnp.exp(g_to_end)  # exponent <= 0

    # Only the state recursion is sequential: scan over chunks.
    def chunk_step(S_BHKV, xs):
        U, W, P, qd, kd, glast = xs
        v_new_BHCV = U - jnp.einsum("bhck,bhkv->bhcv", W, S_BHKV, precision=HIGHEST)
        o_BHCV = (jnp.einsum("bhck,bhkv->bhcv", qd, S_BHKV, precision=HIGHEST)
                  + jnp.einsum("bhcj,bhjv->bhcv", P, v_new_BHCV, precision=HIGHEST))
        S_next = (S_BHKV * jnp.exp(glast)[..., None]
                  + jnp.einsum("bhck,bhcv->bhkv", kd, v_new_BHCV, precision=HIGHEST))
        return S_next, (o_BHCV, S_BHKV)

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (U_BHNCV, W_BHNCK, P_BHNCC, q_decayed, k_to_end, g_last_BHNK))
    S_final, (o_NBHCV, states_NBHKV) = jax.lax.scan(chunk_step, S0, xs)
    o_BTHV = jnp.moveaxis(o_NBHCV, 0, 2).reshape(B, H, Tp, V)[:, :, :T]
    o_BTHV = jnp.moveaxis(o_BTHV, 1, 2)
    if return_chunk_states:
        return o_BTHV, S_final, jnp.moveaxis(states_NBHKV, 0, 1)
    return o_BTHV, S_final
