"""Dense SwiGLU MLP (layer 0 of the 48B, and the MoE's shared experts): down(silu(gate x) * up x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.layers.init import normal_param


class SwiGLU(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        D, F = hidden_size, intermediate_size
        self.gate_proj = normal_param(rngs, (D, F), dtype)
        self.up_proj = normal_param(rngs, (D, F), dtype)
        self.down_proj = normal_param(rngs, (F, D), dtype)

    def __call__(self, x_BTD):
        return swiglu(x_BTD, self.gate_proj[...], self.up_proj[...], self.down_proj[...])


def swiglu(x_BTD, gate_DF, up_DF, down_FD):
    gate_BTF = jnp.einsum("...d,df->...f", x_BTD, gate_DF)
    up_BTF = jnp.einsum("...d,df->...f", x_BTD, up_DF)
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate_BTF) * up_BTF, down_FD)
