"""Load an HF Kimi-Linear checkpoint folder into a kimi_jax model, in memory.

The folder holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json`, with hub (remote-code) or transformers-native tensor names; both are detected.
Tensors are read one at a time and assembled per JAX parameter through `convert.mapping`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from kimi_jax.hf import mapping
from kimi_jax.hf.safetensors_io import CheckpointError, SafetensorsReader
from kimi_jax.config import KimiLinearConfig
from kimi_jax.model import KimiLinearForCausalLM


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    return ", ".join(items[:5]) + more


def validate_checkpoint(cfg: KimiLinearConfig, reader: SafetensorsReader, source: str) -> str:
    """Check every tensor name, shape and dtype against config.json before anything is assembled.

    Returns the naming layout ("hub" or "native"). Raises CheckpointError naming the folder and the tensor.
    """
    try:
        layout = mapping.detect_layout(reader.names())
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    available = set(reader.names())
    expected = mapping.expected_hf_tensors(cfg, layout, available)
    missing = [n for n in expected if n not in available]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) that config.json implies are missing: "
                              f"{_listing(missing)}")
    unknown = sorted(available - set(expected))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensor(s) not part of a Kimi-Linear model of this config "
                              f"({layout} names): {_listing(unknown)}")
    for name, shape in expected.items():
        path, dtype, got, _, _ = reader.entries[name]
        if got != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {got}, but config.json implies {shape}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}; weights must be floating point")
    return layout


def abstract_model(cfg: KimiLinearConfig, dtype) -> KimiLinearForCausalLM:
    return nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def from_pretrained(path, dtype=None, *, config: KimiLinearConfig | None = None) -> KimiLinearForCausalLM:
    path = os.fspath(path)
    cfg = config or KimiLinearConfig.from_pretrained(path)
    dtype = jnp.dtype(dtype or jnp.float32)
    reader = SafetensorsReader(path)
    layout = validate_checkpoint(cfg, reader, path)
    available = set(reader.names())

    model = abstract_model(cfg, dtype)
    graphdef, abstract_state = nnx.split(model)
    targets = dict(nnx.to_flat_state(abstract_state))
    filled = {}
    for spec in mapping.plan(cfg, layout):
        if spec.path not in targets:
            raise RuntimeError(f"mapping names parameter {spec.path}, which the model does not have")
        target = targets[spec.path]
        array = mapping.assemble(spec, cfg, lambda n: reader.get(mapping.resolve_name(n, available)))
        if tuple(array.shape) != tuple(target.shape):  # a mapping bug, not bad input: names/shapes were checked
            raise RuntimeError(f"mapping built {array.shape} for {spec.path}, the model expects {target.shape}")
        filled[spec.path] = target.replace(jnp.asarray(array, dtype=target.dtype))
    missing = [p for p in targets if p not in filled]
    if missing:
        raise RuntimeError(f"mapping does not cover parameters {missing[:5]}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
