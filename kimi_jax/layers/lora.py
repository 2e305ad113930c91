"""The recursive stage's low-rank adapters (RECURSIVE_DESIGN.md §3.9, phase b), applied inside the KDA and MLA layers."""

import jax.numpy as jnp


def lora_apply(x, a, b, down: str, up: str):
    """A low-rank update x -> (x a) b in float32, cast back to x's dtype."""
    low = jnp.einsum(down, x.astype(jnp.float32), a.astype(jnp.float32))
    return jnp.einsum(up, low, b.astype(jnp.float32)).astype(x.dtype)
