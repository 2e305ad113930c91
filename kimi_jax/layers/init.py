"""Parameter initialisers shared by the layers (HF's `_init_weights` conventions)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

INITIALIZER_RANGE = 0.02  # transformers' KimiLinearConfig.initializer_range


def normal_param(rngs: nnx.Rngs, shape, dtype, std: float = INITIALIZER_RANGE) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def kda_a_log(rngs: nnx.Rngs, num_heads: int) -> nnx.Param:
    """fla init: A ~ U[1, 16], stored as log A (fp32)."""
    return nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (num_heads,), jnp.float32, 1.0, 16.0)))


def kda_dt_bias(rngs: nnx.Rngs, shape) -> nnx.Param:
    """fla init: dt ~ logU[1e-3, 1e-1], stored as its inverse softplus (fp32)."""
    log_dt = jax.random.uniform(rngs.params(), shape, jnp.float32, math.log(1e-3), math.log(1e-1))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    return nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
