"""Pallas kernels of the chunked KDA core (TPU: Mosaic; GPU: Triton), forward and backward, exact under unbounded
gates. `kimi_jax.ops.kda.kda_chunked(..., impl="pallas_tpu" | "pallas_gpu")` is the entry point; on CPU both run in
Pallas interpret mode (what CI tests).

The maths is `ops/kda.py`'s (same WY form, same decay-domain exactness), re-expressed for one chunk of C tokens as
plain 2-D matmuls, elementwise products and iota masks, the operations both Mosaic and Triton lower well:

* Decays. Every decay a kernel needs is D(i, j) = exp(sum_{j < t <= i} g_t) over some token range. With 0/1 masks
  M (built from iotas) the sums are matmuls M @ g in fp32 (HIGHEST precision): each entry is a direct sum of
  same-signed terms, never a difference of cumulative sums, so exp() of it is accurate to fp32 wherever the decay
  is representable, is 0 where it underflows, and never overflows (exp(-G) is never formed).
* Intra-chunk matrices by recursive halving, flattened: at level b (b = 1, 2, .., C/2) the token pairs (i, j) with
  i in the second and j in the first half of the same aligned block of 2b tokens ("quarter" b) factor through the
  block's midpoint m: D(i, j) = pre_b(i) * suf_b(j), pre_b(i) = exp(sum_{m < t <= i} g_t) (inclusive prefix in i's
  block of b), suf_b(j) = exp(sum_{j < t <= m} g_t) (exclusive suffix in j's block of b), both <= 1. The quarters of
  all levels partition the strict lower triangle, so A = sum_b mask_b * ((beta k pre_b) (k suf_b)^T) and likewise
  P (with q, plus the diagonal q_i . k_i): one C x K x C matmul per level and matrix, masked.
* (I + A)^-1 by the same levels' block substitution: T starts as I; after level b it is the block-diagonal inverse
  over blocks of 2b, T <- T - T (mask_b * A) T (T22 A21 T11 lands exactly in quarter b). Stable as forward
  substitution, matmuls only.
* The backward differentiates those same expressions: every gate gradient is M^T (dpre * pre) or M^T (dsuf * suf),
  a sum over exactly the pair products that contain a_t = exp(g_t), each product <= 1, so it too stays exact where
  a_t underflows (no cancelling row-minus-column sums, see `ops/kda.py`).

Layout: heads first, [N = B * H, T, *], T padded to a multiple of C and K, V padded to a power of two >= 16
(zero channels are inert: zero keys add nothing, zero values read nothing). The state is fp32 [K, V] per (b, h);
inputs may be fp32 or bf16 and are upcast in the kernel; all maths and accumulation is fp32.

* TPU: grid (N, chunks), chunks "arbitrary" (sequential), the state in a VMEM scratch; the backward walks the chunks
  in reverse with the state's cotangent in scratch. Per chunk it reads q, k, v, g, beta once and writes o (forward)
  or every input's gradient (backward); the state before each chunk is saved by the forward for the backward (the
  recursive stage's window snapshots come from the same output).
* GPU: grid (N,), one program per (b, h) carrying the state through a `fori_loop` over the chunks (Triton has no
  sequential grid), the same per-chunk functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
EPS = 1e-6  # inside the l2 norm's sqrt, as `ops.kda.l2_normalize`
IMPLS = ("pallas_tpu", "pallas_gpu")


# ----------------------------------------------------------------------------------------------------- 2-D helpers
def _dot(x, y):  # x @ y
    return lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=HIGHEST, preferred_element_type=F32)


def _dot_t(x, y):  # x @ y.T
    return lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=F32)


def _t_dot(x, y):  # x.T @ y
    return _dot(x.T, y)


def _iota(n, m, axis):
    return lax.broadcasted_iota(jnp.int32, (n, m), axis)


def _where(mask, x):
    return jnp.where(mask, x, jnp.zeros_like(x))


def _shift(x, b):  # x // b for b a power of two
    return lax.shift_right_logical(x, jnp.full_like(x, b.bit_length() - 1))


def _decay_masks(C: int, b: int, transposed: bool = False):
    """0/1 masks of level b as fp32 [C, C]: pre[i, t] = (t <= i in i's aligned block of b tokens), suf[i, t] = (t > i
    in that block); `transposed` gives pre^T, suf^T (for the backward's M^T x)."""
    i, t = _iota(C, C, 0), _iota(C, C, 1)
    if transposed:
        i, t = t, i
    same = _shift(i, b) == _shift(t, b)
    one = jnp.ones((C, C), F32)
    return _where(same & (t <= i), one), _where(same & (t > i), one)


def _quarter(C: int, b: int):
    """Pairs (i, j) with i in the second and j in the first half of one aligned block of 2b tokens."""
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    bi, bj = _shift(i, b), _shift(j, b)
    return (bi == bj + 1) & ((bi & 1) == 1)


def _levels(C: int):
    return [1 << n for n in range(C.bit_length() - 1)]


def _diag_of_row(row_1K):
    """diag(row) as [K, K] (a row vector scaling a [K, V] matrix's rows, without a vector transpose)."""
    K = row_1K.shape[-1]
    return _where(_iota(K, K, 0) == _iota(K, K, 1), jnp.broadcast_to(row_1K, (K, K)))


def _column_to_row(col_K1):
    """[K, 1] -> [1, K] by a masked reduction (no transpose or slice of a vector: both lowerings take it)."""
    K = col_K1.shape[0]
    return jnp.sum(_where(_iota(K, K, 0) == _iota(K, K, 1), jnp.broadcast_to(col_K1, (K, K))), axis=0,
                   keepdims=True)


def _total_decay(g):
    """exp(sum_t g_t) over the chunk as [1, K]: the decay of the carried state (a direct sum, no slice)."""
    return jnp.exp(jnp.sum(g, axis=0, keepdims=True))


def _l2n(x):
    r = lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + EPS)
    return x * r, r


def _l2n_vjp(y, r, dy):
    return r * (dy - y * jnp.sum(y * dy, axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------------- per chunk
def _intra(q, k, g, beta, C: int):
    """T = (I + A)^-1, P, Din (decay from the chunk start through i), Dout (from after j to the chunk end)."""
    bk = k * beta
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    eye = i == j
    T = _where(eye, jnp.ones((C, C), F32))
    P = _where(eye, jnp.broadcast_to(jnp.sum(q * k, axis=-1, keepdims=True), (C, C)))
    for b in _levels(C):
        m_pre, m_suf = _decay_masks(C, b)
        pre, suf = jnp.exp(_dot(m_pre, g)), jnp.exp(_dot(m_suf, g))
        kc = k * suf
        quarter = _quarter(C, b)
        A_b = _where(quarter, _dot_t(bk * pre, kc))
        P = P + _where(quarter, _dot_t(q * pre, kc))
        T = T - _dot(T, _dot(A_b, T))
    m_pre, m_suf = _decay_masks(C, C)
    return T, P, jnp.exp(_dot(m_pre, g)), jnp.exp(_dot(m_suf, g))


def _prep(qr, kr, scale):
    q, rq = _l2n(qr.astype(F32))
    k, rk = _l2n(kr.astype(F32))
    return q * scale, k, rq, rk, q


def chunk_forward(qr, kr, v, g, beta, S, *, scale: float):
    """One chunk: (o [C, V], state after [K, V]) from raw q, k [C, K], v [C, V], g [C, K], beta [C, 1] and the state
    before [K, V] (fp32)."""
    C = qr.shape[0]
    q, k, _, _, _ = _prep(qr, kr, scale)
    v, g, beta = v.astype(F32), g.astype(F32), beta.astype(F32)
    T, P, Din, Dout = _intra(q, k, g, beta, C)
    U = _dot(T, v * beta)
    W = _dot(T, k * beta * Din)
    v_new = U - _dot(W, S)
    o = _dot(q * Din, S) + _dot(P, v_new)
    S_next = _dot(_diag_of_row(_total_decay(g)), S) + _t_dot(k * Dout, v_new)
    return o, S_next


def chunk_backward(qr, kr, v, g, beta, S, dS_after, do, *, scale: float):
    """One chunk's backward: the state before it S, the cotangents of the state after it and of its output ->
    (dq, dk, dv, dg, dbeta [C, 1], cotangent of the state before)."""
    C = qr.shape[0]
    q, k, rq, rk, qn = _prep(qr, kr, scale)
    v, g, beta, do = v.astype(F32), g.astype(F32), beta.astype(F32), do.astype(F32)
    bk = k * beta
    T, P, Din, Dout = _intra(q, k, g, beta, C)
    rhs_v, rhs_k = v * beta, bk * Din
    W = _dot(T, rhs_k)
    v_new = _dot(T, rhs_v) - _dot(W, S)
    kO, qD = k * Dout, q * Din
    din_last = _total_decay(g)
    dv_new = _dot(kO, dS_after) + _t_dot(P, do)
    dS_before = _dot(_diag_of_row(din_last), dS_after) + _t_dot(qD, do) - _t_dot(W, dv_new)
    d_kO = _dot_t(v_new, dS_after)
    d_qD = _dot_t(do, S)
    dW = -_dot_t(dv_new, S)
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    dP = _where(i >= j, _dot_t(do, v_new))
    d_bv, d_bkD = _t_dot(T, dv_new), _t_dot(T, dW)
    dT = _dot_t(dv_new, rhs_v) + _dot_t(dW, rhs_k)
    Tt = T.T
    dA = -_where(i > j, _dot(_dot(Tt, dT), Tt))
    dP_diag = jnp.sum(_where(i == j, dP), axis=1, keepdims=True)
    dq = Din * d_qD + dP_diag * k
    dk = Dout * d_kO + dP_diag * q
    dbk = Din * d_bkD
    # d/dg of the decays' pair products, level by level (see the module docstring): each sum holds only products
    # that contain exp(g_t).
    dg = jnp.zeros_like(g)
    for b in _levels(C):
        m_pre, m_suf = _decay_masks(C, b)
        pre, suf = jnp.exp(_dot(m_pre, g)), jnp.exp(_dot(m_suf, g))
        quarter = _quarter(C, b)
        dA_b, dP_b = _where(quarter, dA), _where(quarter, dP)
        kc, rA, rP = k * suf, bk * pre, q * pre
        g_rA, g_rP = _dot(dA_b, kc), _dot(dP_b, kc)
        g_kc = _t_dot(dA_b, rA) + _t_dot(dP_b, rP)
        dbk = dbk + pre * g_rA
        dq = dq + pre * g_rP
        dk = dk + suf * g_kc
        mt_pre, mt_suf = _decay_masks(C, b, transposed=True)
        dg = dg + _dot(mt_pre, rA * g_rA + rP * g_rP) + _dot(mt_suf, kc * g_kc)
    mt_pre, mt_suf = _decay_masks(C, C, transposed=True)
    dDin = bk * d_bkD + q * d_qD
    # The carried state's decay exp(sum_t g_t): every token's gate gets Din_last * sum_v S * dS_after.
    state_term = din_last * _column_to_row(jnp.sum(S * dS_after, axis=-1, keepdims=True))
    dg = dg + _dot(mt_pre, Din * dDin) + _dot(mt_suf, Dout * k * d_kO) + state_term
    dk = dk + beta * dbk
    dv = beta * d_bv
    dbeta = jnp.sum(v * d_bv, axis=-1, keepdims=True) + jnp.sum(k * dbk, axis=-1, keepdims=True)
    dqr = _l2n_vjp(qn, rq, dq * scale)
    dkr = _l2n_vjp(k, rk, dk)
    return dqr, dkr, dv, dg, dbeta, dS_before


# ----------------------------------------------------------------------------------------------------- TPU kernels
def _dims(xs, C: int):
    """(N, padded T, K, V, chunks) of the heads-first inputs."""
    N, Tp, K = xs[0].shape
    return N, Tp, K, xs[2].shape[-1], Tp // C


def _forward_outputs(N, Tp, n, K, V):
    """o [N, T, V], the state before every chunk [N, chunks, K, V], the final state [N, K, V] (fp32)."""
    return [jax.ShapeDtypeStruct((N, Tp, V), F32), jax.ShapeDtypeStruct((N, n, K, V), F32),
            jax.ShapeDtypeStruct((N, K, V), F32)]


def _tpu_forward_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s0_ref, o_ref, states_ref, final_ref, S_scr, *,
                        scale, n_chunks):
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        S_scr[...] = s0_ref[...].astype(F32)

    S = S_scr[...]
    states_ref[...] = S
    o, S_next = chunk_forward(q_ref[...], k_ref[...], v_ref[...], g_ref[...], b_ref[...], S, scale=scale)
    o_ref[...] = o.astype(o_ref.dtype)
    S_scr[...] = S_next

    @pl.when(c == n_chunks - 1)
    def _():
        final_ref[...] = S_next


def _tpu_backward_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, states_ref, do_ref, dstates_ref, dfinal_ref,
                         dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, dS_scr, *, scale, n_chunks):
    step = pl.program_id(1)  # chunk n_chunks - 1 - step

    @pl.when(step == 0)
    def _():
        dS_scr[...] = dfinal_ref[...]

    dqr, dkr, dv, dg, dbeta, dS_before = chunk_backward(
        q_ref[...], k_ref[...], v_ref[...], g_ref[...], b_ref[...], states_ref[...], dS_scr[...], do_ref[...],
        scale=scale)
    dq_ref[...], dk_ref[...], dv_ref[...], dg_ref[...], db_ref[...] = dqr, dkr, dv, dg, dbeta
    dS_before = dS_before + dstates_ref[...]
    dS_scr[...] = dS_before

    @pl.when(step == n_chunks - 1)
    def _():
        ds0_ref[...] = dS_before


def _tpu_forward(xs, S0, *, C, scale, interpret):
    N, Tp, K, V, n = _dims(xs, C)
    tok = lambda d: pl.BlockSpec((None, C, d), lambda b, c: (b, c, 0))
    whole_state = pl.BlockSpec((None, K, V), lambda b, c: (b, 0, 0))
    return pl.pallas_call(
        functools.partial(_tpu_forward_kernel, scale=scale, n_chunks=n),
        grid=(N, n),
        in_specs=[tok(K), tok(K), tok(V), tok(K), tok(1), whole_state],
        out_specs=[tok(V), pl.BlockSpec((None, None, K, V), lambda b, c: (b, c, 0, 0)), whole_state],
        out_shape=_forward_outputs(N, Tp, n, K, V),
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(N, n, C, K, V, backward=False),
        interpret=interpret,
        name="kda_chunk_fwd",
    )(*xs, S0)


def _tpu_backward(xs, states, do, dstates, dfinal, *, C, scale, interpret):
    N, Tp, K, V, n = _dims(xs, C)
    rev = lambda b, c: (b, n - 1 - c, 0)
    tok = lambda d: pl.BlockSpec((None, C, d), rev)
    chunk_state = pl.BlockSpec((None, None, K, V), lambda b, c: (b, n - 1 - c, 0, 0))
    whole_state = pl.BlockSpec((None, K, V), lambda b, c: (b, 0, 0))
    shapes = [(N, Tp, K), (N, Tp, K), (N, Tp, V), (N, Tp, K), (N, Tp, 1), (N, K, V)]
    return pl.pallas_call(
        functools.partial(_tpu_backward_kernel, scale=scale, n_chunks=n),
        grid=(N, n),
        in_specs=[tok(K), tok(K), tok(V), tok(K), tok(1), chunk_state, tok(V), chunk_state, whole_state],
        out_specs=[tok(K), tok(K), tok(V), tok(K), tok(1), whole_state],
        out_shape=[jax.ShapeDtypeStruct(s, F32) for s in shapes],
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(N, n, C, K, V, backward=True),
        interpret=interpret,
        name="kda_chunk_bwd",
    )(*xs, states, do, dstates, dfinal)


# ----------------------------------------------------------------------------------------------------- GPU kernels
def _gpu_forward_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s0_ref, o_ref, states_ref, final_ref, *, C, scale,
                        n_chunks):
    def body(c, S):
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        o, S_next = chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows, :], b_ref[rows, :],
                                  S, scale=scale)
        states_ref[c] = S
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return S_next

    final_ref[...] = lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))


def _gpu_backward_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, states_ref, do_ref, dstates_ref, dfinal_ref,
                         dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, *, C, scale, n_chunks):
    def body(step, dS):
        c = n_chunks - 1 - step
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        dqr, dkr, dv, dg, dbeta, dS_before = chunk_backward(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows, :], b_ref[rows, :], states_ref[c], dS,
            do_ref[rows, :], scale=scale)
        dq_ref[rows, :], dk_ref[rows, :], dv_ref[rows, :], dg_ref[rows, :], db_ref[rows, :] = (
            dqr, dkr, dv, dg, dbeta)
        return dS_before + dstates_ref[c]

    ds0_ref[...] = lax.fori_loop(0, n_chunks, body, dfinal_ref[...])


def _gpu_params():
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _gpu_forward(xs, S0, *, C, scale, interpret):
    N, Tp, K, V, n = _dims(xs, C)
    per_head = lambda *shape: pl.BlockSpec((None,) + shape, lambda b: (b,) + (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(_gpu_forward_kernel, C=C, scale=scale, n_chunks=n),
        grid=(N,),
        in_specs=[per_head(Tp, K), per_head(Tp, K), per_head(Tp, V), per_head(Tp, K), per_head(Tp, 1),
                  per_head(K, V)],
        out_specs=[per_head(Tp, V), per_head(n, K, V), per_head(K, V)],
        out_shape=_forward_outputs(N, Tp, n, K, V),
        compiler_params=None if interpret else _gpu_params(),
        cost_estimate=_cost(N, n, C, K, V, backward=False),
        interpret=interpret,
        name="kda_chunk_fwd",
    )(*xs, S0)


def _gpu_backward(xs, states, do, dstates, dfinal, *, C, scale, interpret):
    N, Tp, K, V, n = _dims(xs, C)
    per_head = lambda *shape: pl.BlockSpec((None,) + shape, lambda b: (b,) + (0,) * len(shape))
    shapes = [(N, Tp, K), (N, Tp, K), (N, Tp, V), (N, Tp, K), (N, Tp, 1), (N, K, V)]
    return pl.pallas_call(
        functools.partial(_gpu_backward_kernel, C=C, scale=scale, n_chunks=n),
        grid=(N,),
        in_specs=[per_head(Tp, K), per_head(Tp, K), per_head(Tp, V), per_head(Tp, K), per_head(Tp, 1),
                  per_head(n, K, V), per_head(Tp, V), per_head(n, K, V), per_head(K, V)],
        out_specs=[per_head(Tp, K), per_head(Tp, K), per_head(Tp, V), per_head(Tp, K), per_head(Tp, 1),
                   per_head(K, V)],
        out_shape=[jax.ShapeDtypeStruct((N,) + s[1:], F32) for s in shapes],
        compiler_params=None if interpret else _gpu_params(),
        cost_estimate=_cost(N, n, C, K, V, backward=True),
        interpret=interpret,
        name="kda_chunk_bwd",
    )(*xs, states, do, dstates, dfinal)


def _cost(N, n, C, K, V, *, backward: bool):
    """The kernels' matmul FLOPs, counted from `chunk_forward` / `chunk_backward` (elementwise work left out), and
    their HBM traffic, for XLA's and the planner's cost models."""
    levels = C.bit_length() - 1
    mm = lambda m, k, n_: 2 * m * k * n_
    # per level: pre / suf decays, the A and P quarters, T's substitution; then Din / Dout
    intra = levels * (2 * mm(C, C, K) + 2 * mm(C, K, C) + 2 * mm(C, C, C)) + 2 * mm(C, C, K)
    uw = mm(C, C, V) + mm(C, C, K)
    if not backward:
        # U, W; W S, (q Din) S, P v_new; the state's decay and update
        flops = intra + uw + 2 * mm(C, K, V) + mm(C, C, V) + mm(K, K, V) + mm(K, C, V)
    else:
        # recomputed intra / U / W / v_new; dv_new; dS_before; d_kO, d_qD, dW; dP; d_rhs; dT; dA; per level the
        # decays, the rows' and columns' products and the gate sums; the Din / Dout gate sums
        flops = (intra + uw + mm(C, K, V) + mm(C, K, V) + mm(C, C, V) + mm(K, K, V) + 2 * mm(K, C, V)
                 + 3 * mm(C, V, K) + mm(C, V, C) + mm(C, C, V) + mm(C, C, K) + mm(C, V, C) + mm(C, K, C)
                 + 2 * mm(C, C, C) + levels * (2 * mm(C, C, K) + 2 * mm(C, C, K) + 2 * mm(C, C, K)
                                               + 2 * mm(C, C, K)) + 2 * mm(C, C, K))
    # reads q, k, g (K wide), v (V), beta, the state; writes o (forward) or every input's gradient (backward)
    io = 4 * (C * (3 * K + V + 1) + K * V) * (2 if backward else 1)
    return pl.CostEstimate(flops=int(N * n * flops), transcendentals=int(N * n * (2 * levels + 2) * C * K),
                           bytes_accessed=int(N * n * io))


_DRIVERS = {"pallas_tpu": (_tpu_forward, _tpu_backward), "pallas_gpu": (_gpu_forward, _gpu_backward)}


# ----------------------------------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _core(q, k, v, g, beta, S0, impl, C, scale, interpret):
    o, states, final = _DRIVERS[impl][0]((q, k, v, g, beta), S0, C=C, scale=scale, interpret=interpret)
    return o, final, states


def _core_fwd(q, k, v, g, beta, S0, impl, C, scale, interpret):
    o, states, final = _DRIVERS[impl][0]((q, k, v, g, beta), S0, C=C, scale=scale, interpret=interpret)
    return (o, final, states), ((q, k, v, g, beta), states)


def _core_bwd(impl, C, scale, interpret, residuals, cotangents):
    xs, states = residuals
    do, dfinal, dstates = cotangents
    dq, dk, dv, dg, dbeta, dS0 = _DRIVERS[impl][1](xs, states, do, dstates, dfinal, C=C, scale=scale,
                                                   interpret=interpret)
    return tuple(d.astype(x.dtype) for d, x in zip((dq, dk, dv, dg, dbeta), xs)) + (dS0,)


_core.defvjp(_core_fwd, _core_bwd)


def padded_dim(d: int) -> int:
    """Head dims are padded to a power of two >= 16 (Triton's dot and load shapes; zero channels are inert)."""
    return max(16, 1 << (d - 1).bit_length())


def kda_chunked_pallas(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV=None, *, impl: str,
                       chunk_size: int = 64, return_chunk_states: bool = False, interpret: bool | None = None):
    """`kda_chunked`'s contract on a Pallas kernel (impl "pallas_tpu" or "pallas_gpu"). `interpret` defaults to True
    on CPU (Pallas interpret mode) and False elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"kda_chunked_pallas: impl must be one of {IMPLS}, got {impl!r}")
    C = chunk_size
    if C < 16 or C & (C - 1):
        raise ValueError(f"kda_chunked_pallas: chunk_size must be a power of two >= 16 (Triton's smallest dot), "
                         f"got {C}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    Kp, Vp = padded_dim(K), padded_dim(V)
    n = -(-T // C)
    Tp = n * C

    def heads_first(x, d, dp):  # [B, T, H, d] -> [B * H, Tp, dp], zero padded
        x = jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, dp - d)])
        return jnp.moveaxis(x, 2, 1).reshape(B * H, Tp, dp)

    # g and beta travel in fp32 whatever the inputs' dtype (g is unbounded: bf16 would round a -2000 by 8).
    xs = (heads_first(q_BTHK, K, Kp), heads_first(k_BTHK, K, Kp), heads_first(v_BTHV, V, Vp),
          heads_first(g_BTHK.astype(F32), K, Kp), heads_first(beta_BTH.astype(F32)[..., None], 1, 1))
    S0 = jnp.zeros((B, H, K, V), F32) if state_BHKV is None else state_BHKV.astype(F32)
    S0 = jnp.pad(S0, [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)]).reshape(B * H, Kp, Vp)
    o, final, states = _core(*xs, S0, impl, C, float(K) ** -0.5, bool(interpret))
    o_BTHV = jnp.moveaxis(o.reshape(B, H, Tp, Vp), 1, 2)[:, :T, :, :V]
    final_BHKV = final.reshape(B, H, Kp, Vp)[..., :K, :V]
    if return_chunk_states:
        states_BNHKV = jnp.moveaxis(states.reshape(B, H, n, Kp, Vp), 1, 2)[..., :K, :V]
        return o_BTHV, final_BHKV, states_BNHKV
    return o_BTHV, final_BHKV
