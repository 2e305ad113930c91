"""RMS norms (spec §5 and §2.3). Statistics always in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def rms_norm(x, weight, eps: float):
    """Llama/T5-style: normalise in fp32, round to the input dtype, *then* scale by the weight (spec §5)."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def gated_rms_norm(x, gate, weight, eps: float):
    """KDA output norm: fp32 throughout, weight applied in fp32, gated by sigmoid (not SiLU); cast at the end."""
    x32 = x.astype(F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(F32) * normed * jax.nn.sigmoid(gate.astype(F32))).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=F32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
