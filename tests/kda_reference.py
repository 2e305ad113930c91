"""Shared KDA test inputs and float64 references (the spec's token recurrence, numpy and torch autograd), used by the
XLA core's tests (test_kda_ops.py) and the Pallas kernels' (test_kda_pallas.py)."""

from __future__ import annotations

import numpy as np

H, K, V = 2, 16, 16
GATE_KINDS = ("small", "medium", "huge", "realistic")  # batch element b draws its gates from GATE_KINDS[b]
GATE_SCALES = {"small": 0.05, "medium": 5.0, "huge": 700.0}


def softplus_np(z):
    return np.where(z > 20.0, z, np.log1p(np.exp(np.minimum(z, 20.0))))


def gates_np(rng, kind, T, H, K):
    """Per-token log decays g <= 0, shape [T, H, K] (float64)."""
    if kind == "realistic":
        # The layer's own formula with fla's A init and a heavy-tailed projection: reaches |g| > 1000.
        A_H = rng.uniform(1.0, 16.0, size=H)
        dt_bias_HK = rng.standard_normal((H, K))
        f_THK = rng.standard_t(2, size=(T, H, K)) * 8.0
        return -A_H[None, :, None] * softplus_np(f_THK + dt_bias_HK)
    return -np.abs(rng.standard_normal((T, H, K))) * GATE_SCALES[kind]


def make_inputs(seed, T, kinds=GATE_KINDS, with_state=False, H=H, K=K, V=V, gates=None):
    """q, k, v, g, beta (fp32 numpy) and an initial state (or None); batch element b uses gates of kinds[b], drawn by
    `gates(rng, kind, T, H, K)` (default `gates_np`)."""
    rng = np.random.default_rng(seed)
    B = len(kinds)
    q_BTHK = rng.standard_normal((B, T, H, K))
    k_BTHK = rng.standard_normal((B, T, H, K))
    v_BTHV = rng.standard_normal((B, T, H, V))
    g_BTHK = np.stack([(gates or gates_np)(rng, kind, T, H, K) for kind in kinds])
    beta_BTH = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H))))
    state_BHKV = rng.standard_normal((B, H, K, V)) if with_state else None
    f32 = lambda a: None if a is None else a.astype(np.float32)
    return tuple(map(f32, (q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH))), f32(state_BHKV)


def kda_reference_np(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, state_BHKV=None):
    """Spec §2.4 token recurrence in float64. Returns (o_BTHV, final state_BHKV, states after each token [B,T,H,K,V])."""
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH))
    q = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + 1e-6) * q.shape[-1] ** -0.5
    k = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + 1e-6)
    B, T, Hh, Kk = q.shape
    S = np.zeros((B, Hh, Kk, v.shape[-1])) if state_BHKV is None else np.asarray(state_BHKV, np.float64)
    o = np.zeros(v.shape)
    states = np.zeros((B, T) + S.shape[1:])
    for t in range(T):
        S = S * np.exp(g[:, t])[..., None]
        kS_BHV = np.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta_BHV = (v[:, t] - kS_BHV) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta_BHV[:, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
        states[:, t] = S
    return o, S, states


def rel_err(x, ref, axis=None):
    """max |x - ref| / max |ref|, over everything or per index of `axis` (e.g. per batch element)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if axis is None:
        return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))
    other = tuple(a for a in range(x.ndim) if a != axis)
    return np.max(np.abs(x - ref), axis=other) / np.max(np.abs(ref), axis=other)


def assert_finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a))), "non-finite values"


def kda_loss_grads_float64(q, k, v, g, beta, state, w_o):
    """Gradients of sum(o * w_o) + sum(sin(S_final)) through the spec's token recurrence, torch float64 autograd."""
    import torch

    leaves = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (q, k, v, g, beta, state)]
    q_, k_, v_, g_, b_, S = leaves
    norm = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    q_, k_ = norm(q_) * q.shape[-1] ** -0.5, norm(k_)
    outs = []
    for t in range(q.shape[1]):
        S = S * torch.exp(g_[:, t])[..., None]
        delta = (v_[:, t] - torch.einsum("bhk,bhkv->bhv", k_[:, t], S)) * b_[:, t, :, None]
        S = S + k_[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_[:, t], S))
    loss = (torch.stack(outs, 1) * torch.from_numpy(w_o.astype(np.float64))).sum() + torch.sin(S).sum()
    loss.backward()
    return [a.grad.numpy() for a in leaves]
