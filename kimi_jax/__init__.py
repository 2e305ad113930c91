"""kimi-jax: Kimi-Linear (KDA + MLA + MoE) in JAX / Flax NNX."""

from kimi_jax.config import ConfigError, KimiLinearConfig
from kimi_jax.model import KimiLinearForCausalLM, RunOptions, forward

__all__ = ["ConfigError", "KimiLinearConfig", "KimiLinearForCausalLM", "RunOptions", "forward", "from_pretrained"]


def from_pretrained(path, dtype=None, **kwargs):
    """Load an HF Kimi-Linear checkpoint folder (hub or transformers-native names) into a Flax model."""
    from kimi_jax.hf.loading import from_pretrained as _load

    return _load(path, dtype=dtype, **kwargs)
