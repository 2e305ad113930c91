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

The backward is hand-written (`_chunked_scan`'s custom VJP): a reverse scan over the same groups carries the state's
cotangent back through each group's chunks, and every input's gradient comes from batched matmuls plus the same
recursive halving (`_decayed_triangular_products`), so the backward never divides by a decay either; d/dg sums only
the pair products that contain exp(g_t), which keeps it exact where exp(g_t) underflows to 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.ops.kda_pallas import kda_chunked_pallas

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


def _decayed_triangular_products(a_LCK, M_LSCC, Y_LCK, X_LSCK):
    """The backward's counterpart of `_intra_chunk`: with D(i, j) = prod_{j < t <= i} a_t (per channel) and S
    lower-triangular matrices M_s (zero above the diagonal),

      rows_LSCK[s, i] = sum_{j <= i} M_s[i, j] D(i, j) * Y_j          (a decayed M_s @ Y)
      cols_LCK[j]     = sum_s sum_{i >= j} M_s[i, j] D(i, j) * X_s,i  (a decayed sum_s M_s^T @ X_s)
      dlog_LCK[t]     = sum_{j < t <= i} E(i, j),  E(i, j) = sum_s M_s[i, j] X_s,i D(i, j) Y_j

    (dlog is the gradient of sum_{s,i,j} M_s[i, j] X_s,i D(i, j) Y_j with respect to log a_t), by the same recursive
    halving: at each level the pairs straddling a block's midpoint take one GEMM of the block's lower-left quarter
    with columns (rows) decayed to the midpoint, then rows (columns) decayed from it, so every decay is again a
    product of factors in [0, 1]. dlog_t only sums pairs whose decay contains a_t (a reverse cumulative sum of the
    straddling rows over the second half, a forward one of the columns over the first), never the difference of
    row and column sums that the plain chain rule through cumulative log decays gives: with gates of -1000 that
    difference cancels to rounding noise of the size of the uncancelled terms."""
    L, S, C, _ = M_LSCC.shape
    K = a_LCK.shape[-1]
    diag_LSC = jnp.diagonal(M_LSCC, axis1=-2, axis2=-1)
    rows = diag_LSC[..., None] * Y_LCK[:, None]
    # Sums over the S matrices are written out: XLA:CPU's library reduce over a short middle axis is slow.
    cols = sum(diag_LSC[:, i, :, None] * X_LSCK[:, i] for i in range(S))
    dlog = jnp.zeros_like(a_LCK)
    # The diagonal blocks of every size, coarsest first (slices only): blocks[s] is [L, S, C / s, s, s].
    blocks = {C: M_LSCC[:, :, None]}
    size = C
    while size > 2:
        half, blk = size // 2, blocks[size]
        blocks[half] = jnp.stack([blk[..., :half, :half], blk[..., half:, half:]], axis=3).reshape(
            L, S, C // half, half, half)
        size = half
    pre, suf = a_LCK, jnp.ones_like(a_LCK)  # inclusive prefix / exclusive suffix products within a block
    b = 1
    while b < C:
        n, M = C // (2 * b), L * C // (2 * b)
        pre2, suf2 = pre.reshape(L, n, 2, b, K), suf.reshape(L, n, 2, b, K)
        M21_MXb = jnp.moveaxis(blocks[2 * b][..., b:, :b], 1, 2).reshape(M, S * b, b)  # x = (s, row)
        # rows: second-half rows i gain pre_i * sum_j M21[i, j] (suf_j * Y_j) over first-half columns j.
        y_Mbk = (Y_LCK.reshape(L, n, 2, b, K)[:, :, 0] * suf2[:, :, 0]).reshape(M, b, K)
        r_LnSbK = jnp.einsum("mxj,mjk->mxk", M21_MXb, y_Mbk, precision=HIGHEST).reshape(L, n, S, b, K)
        r_LnSbK = r_LnSbK * pre2[:, :, 1][:, :, None]
        rows = rows + jnp.pad(jnp.moveaxis(r_LnSbK, 2, 1)[:, :, :, None], [(0, 0)] * 3 + [(1, 0), (0, 0), (0, 0)]
                              ).reshape(L, S, C, K)
        # cols: first-half columns j gain suf_j * sum_{s, i} M21_s[i, j] (pre_i * X_s,i) over second-half rows i.
        x2_LnSbK = jnp.moveaxis(X_LSCK.reshape(L, S, n, 2, b, K)[:, :, :, 1], 1, 2)
        x_MXk = (x2_LnSbK * pre2[:, :, 1][:, :, None]).reshape(M, S * b, K)
        c_Lnbk = jnp.einsum("mxj,mxk->mjk", M21_MXb, x_MXk, precision=HIGHEST).reshape(L, n, b, K) * suf2[:, :, 0]
        cols = cols + jnp.pad(c_Lnbk[:, :, None], [(0, 0), (0, 0), (0, 1), (0, 0), (0, 0)]).reshape(L, C, K)
        # dlog: a second-half t lies inside every pair (i >= t, j in the first half); a first-half t inside every
        # pair (j < t, i in the second half).
        row_terms = sum(r_LnSbK[:, :, i] * x2_LnSbK[:, :, i] for i in range(S))
        col_terms = c_Lnbk * Y_LCK.reshape(L, n, 2, b, K)[:, :, 0]
        second = jnp.flip(jnp.cumsum(jnp.flip(row_terms, 2), axis=2), 2)
        first = jnp.cumsum(col_terms, axis=2) - col_terms
        dlog = dlog + jnp.stack([first, second], axis=2).reshape(L, C, K)
        pre = jnp.concatenate([pre2[:, :, 0], pre2[:, :, 1] * pre2[:, :, 0, -1:]], axis=2).reshape(L, C, K)
        suf = jnp.concatenate([suf2[:, :, 0] * pre2[:, :, 1, -1:], suf2[:, :, 1]], axis=2).reshape(L, C, K)
        b *= 2
    return rows, cols, dlog


def _l2_normalize_vjp(x, dy, eps: float = 1e-6):
    """d/dx of `l2_normalize` applied to the cotangent dy: r (dy - y (y . dy)), r = 1 / sqrt(|x|^2 + eps)."""
    x = x.astype(F32)
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
    y = x * r
    return r * (dy - y * jnp.sum(y * dy, axis=-1, keepdims=True))


def _default_chunks_per_step(batch_heads: int) -> int:
    """On CPU about 16 (sample, head, chunk) triples per step keep a step's working set in cache (measured: 4 heads,
    batch 1 -> 4 chunks; batch 4 -> 1); accelerators batch more of the intra-chunk work."""
    return max(1, 16 // batch_heads) if jax.default_backend() == "cpu" else 16


KDA_IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def resolve_kda_impl(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` means on `platform` (default: JAX's default backend): "auto" is the Pallas kernel of
    the platform on TPU and GPU and the XLA scan elsewhere; anything else is taken as given."""
    if impl not in KDA_IMPLS:
        raise ValueError(f"kda impl must be one of {KDA_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(platform, "xla")


def kda_chunked(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV=None, *, chunk_size: int = 64,
                chunks_per_step: int | None = None, return_chunk_states: bool = False, impl: str = "auto",
                interpret: bool | None = None):
    """Chunked (WY / UT) KDA, exact for unbounded per-channel gates, with a hand-written backward pass.

    `impl` (see `resolve_kda_impl`): "xla" is the `lax.scan` below; "pallas_tpu" / "pallas_gpu" the kernels of
    `ops/kda_pallas.py` (same contract and exactness; Pallas interpret mode where `interpret`, by default on CPU).
    chunks_per_step applies to "xla" only.

    chunk_size must be a power of two (spec: 64). chunks_per_step chunks are handled per scan step (default: about
    16 // (batch * heads) on CPU, 16 elsewhere; fewer when the sequence has fewer chunks). The forward saves only
    its inputs and the state before each chunk; the backward (`_group_backward`) recomputes a step's intra-chunk
    matrices, carries the state's cotangent back through the step's chunks, then forms every input's gradient with
    batched matmuls and the recursive halving (no decay is ever inverted). Returns (o_BTHV fp32, final state_BHKV
    fp32) or, with `return_chunk_states`, also chunk_states_BNHKV: the state *before* chunk n (after n * chunk_size
    tokens; n = 0 is the initial state), for every chunk n.
    """
    impl = resolve_kda_impl(impl)
    if impl != "xla":
        return kda_chunked_pallas(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV, impl=impl,
                                  chunk_size=chunk_size, return_chunk_states=return_chunk_states, interpret=interpret)
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
    # Each scan step slices its G chunks out of the [B, T, H, *] inputs and writes its outputs back in place: passing
    # the inputs as scanned-over arrays made XLA copy all of them into the loop first (~30% of the forward at 16k).
    # The l2 norms, the decays a = exp(g) and the heads-first layout are done per step, while the group is in cache:
    # as separate passes over the whole sequence they cost more than the rest of the kernel once T * H * K outgrows
    # the cache.
    xs = tuple(x.astype(F32) for x in xs)
    S_final, o_BTHV, states_sBHGKV = _chunked_scan(S0.reshape(B * H, K, V), xs, G, C)
    S_final = S_final.reshape(B, H, K, V)
    o_BTHV = o_BTHV[:, :T]
    if return_chunk_states:
        states_BNHKV = jnp.moveaxis(states_sBHGKV, (0, 2), (1, 3)).reshape(B, n_steps * G, H, K, V)[:, :n_chunks]
        return o_BTHV, S_final, states_BNHKV
    return o_BTHV, S_final


def _step_inputs(xs, i, G: int, C: int):
    """Step i's G chunks of the [B, T, H, *] arrays, as [B, G, C, H, *]."""
    return tuple(jax.lax.dynamic_slice_in_dim(x, i * G * C, G * C, axis=1).reshape(x.shape[0], G, C, *x.shape[2:])
                 for x in xs)


def _put_step(buffer, x_BGCX, i):
    """Write step i's [B, G, C, *] block into the [B, T, *] buffer."""
    B, G, C = x_BGCX.shape[:3]
    return jax.lax.dynamic_update_slice_in_dim(buffer, x_BGCX.reshape(B, G * C, *x_BGCX.shape[3:]), i * G * C, axis=1)


# Inside a step every matmul has one flat batch axis (N = B * H, or N * G): XLA:CPU 0.10 segfaulted on some
# multi-batch-dim dots of this kernel's autodiff, and a flat axis is the plainest form for every backend.
def _heads_first(x):  # [B, G, C, H, *] -> [B * H, G, C, *]
    x = jnp.moveaxis(x, 3, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _heads_last(x_NGCX, B):  # the inverse of _heads_first
    N, G, C = x_NGCX.shape[:3]
    return jnp.moveaxis(x_NGCX.reshape(B, N // B, G, C, *x_NGCX.shape[3:]), 1, 3)


def _group_tensors(x_step, TP=None):
    """A step's per-chunk tensors that depend on its inputs only (not on the state). With TP = (T, P) saved by the
    forward, the backward skips the intra-chunk recursion and takes the decays from cumulative products."""
    qr_NGCK, kr_NGCK, v_NGCV, g_NGCK, beta_NGC = map(_heads_first, x_step)
    N, G, C, K = kr_NGCK.shape
    V = v_NGCV.shape[-1]
    q_NGCK = l2_normalize(qr_NGCK) * (K ** -0.5)
    k_NGCK = l2_normalize(kr_NGCK)
    a_NGCK = jnp.exp(g_NGCK)
    if TP is None:
        T_NGCC, P_NGCC, Din_NGCK, Dout_NGCK = _intra_chunk(q_NGCK, k_NGCK, a_NGCK, beta_NGC)
    else:
        T_NGCC, P_NGCC = (x.reshape(N, G, C, C) for x in TP)
        Din_NGCK = jnp.cumprod(a_NGCK, axis=2)
        # prod_{j < t < C} a_t: the reversed inclusive product, shifted by one token
        Dout_NGCK = jnp.concatenate([jnp.flip(jnp.cumprod(jnp.flip(a_NGCK[:, :, 1:], 2), axis=2), 2),
                                     jnp.ones_like(a_NGCK[:, :, :1])], axis=2)
    # (I + A) [U | W] = [beta V | beta K Din]  (the UT transform)
    rhs_NGCX = jnp.concatenate([v_NGCV * beta_NGC[..., None], k_NGCK * beta_NGC[..., None] * Din_NGCK], axis=-1)
    UW_NGCX = jnp.einsum("nij,njx->nix", T_NGCC.reshape(N * G, C, C), rhs_NGCX.reshape(N * G, C, V + K),
                         precision=HIGHEST).reshape(N, G, C, V + K)
    return dict(q=q_NGCK, k=k_NGCK, v=v_NGCV, g=g_NGCK, beta=beta_NGC, T=T_NGCC, P=P_NGCC, Din=Din_NGCK,
                Dout=Dout_NGCK, rhs=rhs_NGCX, U=UW_NGCX[..., :V], W=UW_NGCX[..., V:])


def _group_forward(S_NKV, x_step, keep_TP: bool = False):
    """One scan step: the intra-chunk work of G chunks (batched), then the state carried through them in order.
    With keep_TP the step also returns its T and P (kept for the backward: C^2 each per chunk and head)."""
    B = x_step[0].shape[0]
    t = _group_tensors(x_step)
    N, G, C, K = t["k"].shape
    # Rows that read the state: W (what the state already predicts, to subtract) and the decayed queries.
    reads_NGXK = jnp.concatenate([t["W"], t["q"] * t["Din"]], axis=-2)
    k_to_end_NGCK = t["k"] * t["Dout"]
    outs, states = [], []
    for c in range(G):  # the state recursion: sequential over the group's chunks
        states.append(S_NKV)
        read_NXV = jnp.einsum("nxk,nkv->nxv", reads_NGXK[:, c], S_NKV, precision=HIGHEST)
        v_new_NCV = t["U"][:, c] - read_NXV[:, :C]
        outs.append(read_NXV[:, C:] + jnp.einsum("nij,njv->niv", t["P"][:, c], v_new_NCV, precision=HIGHEST))
        S_NKV = (S_NKV * t["Din"][:, c, -1, :, None]
                 + jnp.einsum("nck,ncv->nkv", k_to_end_NGCK[:, c], v_new_NCV, precision=HIGHEST))
    o_BGCHV = _heads_last(jnp.stack(outs, axis=1), B)
    states_BHGKV = jnp.stack(states, axis=1).reshape(B, N // B, G, K, -1)
    if keep_TP:
        return S_NKV, (o_BGCHV, states_BHGKV, (t["T"], t["P"]))
    return S_NKV, (o_BGCHV, states_BHGKV)


def _group_backward(dS_NKV, per_step):
    """The cotangents of one step's inputs and of the state before it, from those of its outputs and of the state
    after it. Notation as `_intra_chunk`: D(i, j) the decay from token j to token i, Din / Dout its values from the
    chunk start / to the chunk end, A and P the intra-chunk matrices, T = (I + A)^-1; v_new = U - W S."""
    x_step, TP, S_BHGKV, do_BGCHV, dstates_BHGKV = per_step
    B = x_step[0].shape[0]
    t = _group_tensors(x_step, TP)
    q, k, v, beta, Din, Dout, T, P = (t[n] for n in ("q", "k", "v", "beta", "Din", "Dout", "T", "P"))
    N, G, C, K = k.shape
    V = v.shape[-1]
    NG = N * G
    S_NGKV = S_BHGKV.reshape(N, G, K, V)
    dS_in_NGKV = dstates_BHGKV.reshape(N, G, K, V)
    do_NGCV = _heads_first(do_BGCHV)
    mm = lambda spec, x, y: jnp.einsum(spec, x, y, precision=HIGHEST)
    flat = lambda x: x.reshape(NG, *x.shape[2:])
    v_new_NGCV = t["U"] - mm("nck,nkv->ncv", flat(t["W"]), flat(S_NGKV)).reshape(N, G, C, V)
    qD_NGCK, kO_NGCK = q * Din, k * Dout
    PTdo_NGCV = mm("nij,niv->njv", flat(P), flat(do_NGCV)).reshape(N, G, C, V)
    qTdo_NGKV = mm("nck,ncv->nkv", flat(qD_NGCK), flat(do_NGCV)).reshape(N, G, K, V)
    # The state's cotangent, carried backwards through the group's chunks (the only sequential part).
    dS_after, dv_new = [None] * G, [None] * G
    for c in reversed(range(G)):
        dS_after[c] = dS_NKV
        dv_new[c] = mm("nck,nkv->ncv", kO_NGCK[:, c], dS_NKV) + PTdo_NGCV[:, c]
        dS_NKV = (dS_NKV * Din[:, c, -1, :, None] + qTdo_NGKV[:, c] - mm("nck,ncv->nkv", t["W"][:, c], dv_new[c])
                  + dS_in_NGKV[:, c])
    dSa_NGKV, dvn_NGCV = jnp.stack(dS_after, axis=1), jnp.stack(dv_new, axis=1)
    # Everything else is batched over the group's chunks.
    d_kO = mm("ncv,nkv->nck", flat(v_new_NGCV), flat(dSa_NGKV)).reshape(N, G, C, K)
    d_qD_W = mm("ncv,nkv->nck", flat(jnp.concatenate([do_NGCV, -dvn_NGCV], axis=2)), flat(S_NGKV))
    d_qD, dW = d_qD_W.reshape(N, G, 2 * C, K)[:, :, :C], d_qD_W.reshape(N, G, 2 * C, K)[:, :, C:]
    lower = jnp.tril(jnp.ones((C, C), bool))
    dP = jnp.where(lower, mm("niv,njv->nij", flat(do_NGCV), flat(v_new_NGCV)), 0.0)
    dUW = flat(jnp.concatenate([dvn_NGCV, dW], axis=-1))
    d_rhs = mm("nji,njx->nix", flat(T), dUW).reshape(N, G, C, V + K)
    dT = mm("nix,njx->nij", dUW, flat(t["rhs"]))
    Tt = jnp.swapaxes(flat(T), -1, -2)
    dA = -jnp.where(jnp.tril(lower, -1), mm("nij,njk->nik", mm("nij,njk->nik", Tt, dT), Tt), 0.0)
    d_bv, d_bkD = d_rhs[..., :V], d_rhs[..., V:]
    bk = k * beta[..., None]
    # A_ij = sum_d bk_i k_j D(i, j) (j < i) and P_ij = sum_d q_i k_j D(i, j) (j <= i), differentiated at once.
    rows, cols, dlog = _decayed_triangular_products(
        flat(jnp.exp(t["g"])), jnp.stack([dA, dP], axis=1), flat(k), jnp.stack([flat(bk), flat(q)], axis=1))
    d_bk_A, dq_P = (r.reshape(N, G, C, K) for r in (rows[:, 0], rows[:, 1]))
    dk_cols = cols.reshape(N, G, C, K)
    dq = Din * d_qD + dq_P
    dk = beta[..., None] * (Din * d_bkD + d_bk_A) + Dout * d_kO + dk_cols
    dv = beta[..., None] * d_bv
    dbeta = jnp.sum(v * d_bv, axis=-1) + jnp.sum(k * (Din * d_bkD + d_bk_A), axis=-1)
    dDin = bk * d_bkD + q * d_qD
    # the chunk's decay of the carried state (a dot, not a library reduce: see `_decayed_triangular_products`)
    dDin = dDin.at[:, :, -1].add(jnp.einsum("ngkv,ngkv->ngk", S_NGKV, dSa_NGKV, precision=HIGHEST))
    # d/dg_t, each term a sum over the products that contain a_t = exp(g_t): Din_i for i >= t, Dout_j for j < t,
    # and D(i, j) for j < t <= i (see `_decayed_triangular_products` for why not the cumulative-log chain rule).
    din_terms, dout_terms = Din * dDin, Dout * k * d_kO
    dg = (dlog.reshape(N, G, C, K) + jnp.flip(jnp.cumsum(jnp.flip(din_terms, 2), axis=2), 2)
          + jnp.cumsum(dout_terms, axis=2) - dout_terms)
    qr, kr = map(_heads_first, x_step[:2])
    dqr = _l2_normalize_vjp(qr, dq * (K ** -0.5))
    dkr = _l2_normalize_vjp(kr, dk)
    grads = tuple(_heads_last(x, B) for x in (dqr, dkr, dv, dg, dbeta))
    return dS_NKV, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _chunked_scan(S0_NKV, xs, G: int, C: int):
    S_final, o_BTHV, (states,) = _forward_scan(S0_NKV, xs, G, C, keep_TP=False)
    return S_final, o_BTHV, states


def _forward_scan(S0_NKV, xs, G: int, C: int, keep_TP: bool):
    B, T, H = xs[0].shape[:3]
    V = xs[2].shape[-1]

    def body(carry, i):
        S_NKV, o_BTHV = carry
        S_NKV, (o_BGCHV, *per_step) = _group_forward(S_NKV, _step_inputs(xs, i, G, C), keep_TP)
        return (S_NKV, _put_step(o_BTHV, o_BGCHV, i)), tuple(per_step)

    (S_final, o_BTHV), per_step = jax.lax.scan(body, (S0_NKV, jnp.zeros((B, T, H, V), F32)),
                                               jnp.arange(T // (G * C)))
    return S_final, o_BTHV, per_step


def _chunked_scan_fwd(S0_NKV, xs, G: int, C: int):
    S_final, o_BTHV, (states, TP) = _forward_scan(S0_NKV, xs, G, C, keep_TP=True)
    return (S_final, o_BTHV, states), (xs, TP, states)


def _chunked_scan_bwd(G: int, C: int, residuals, cotangents):
    xs, TP, states = residuals
    dS_final, do_BTHV, dstates = cotangents

    def body(carry, per_step):
        dS_NKV, dxs = carry
        i, TP_i, states_i, dstates_i = per_step
        (do_BGCHV,) = _step_inputs((do_BTHV,), i, G, C)
        dS_NKV, grads = _group_backward(dS_NKV, (_step_inputs(xs, i, G, C), TP_i, states_i, do_BGCHV, dstates_i))
        return (dS_NKV, tuple(_put_step(d, g, i) for d, g in zip(dxs, grads))), None

    steps = xs[0].shape[1] // (G * C)
    (dS0, dxs), _ = jax.lax.scan(body, (dS_final, tuple(jnp.zeros_like(x) for x in xs)),
                                 (jnp.arange(steps), TP, states, dstates), reverse=True)
    return dS0, dxs


_chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)
