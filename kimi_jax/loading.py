"""Load an HF Kimi-Linear checkpoint folder into a kimi_jax model, in memory.

The folder holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json`, with hub (remote-code) or transformers-native tensor names; both are detected.
Tensors are read one at a time and assembled per JAX parameter through `convert.mapping`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import mapping
from kimi_jax.config import KimiLinearConfig
from kimi_jax.model import KimiLinearForCausalLM


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold the tensors its config.json describes."""


class SafetensorsReader:
    """Name -> numpy tensor over one safetensors file or an indexed set of shards (opened lazily, read per tensor)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        self._safe_open = safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            self.location = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
            for shard in sorted(set(self.location.values())):
                if not os.path.exists(shard):
                    raise CheckpointError(f"{index}: lists shard {os.path.basename(shard)}, which is missing")
        elif os.path.exists(single):
            with safe_open(single, "np") as f:
                self.location = {name: single for name in f.keys()}
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}

    def names(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def _handle(self, path):
        if path not in self._handles:
            self._handles[path] = self._safe_open(path, "np")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.location[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing")
        path = self.location[name]
        try:
            return self._handle(path).get_tensor(name)
        except TypeError:
            # numpy has no bfloat16: read through torch-free ml_dtypes via the raw pytorch-less path.
            import ml_dtypes
            from safetensors import safe_open

            with safe_open(path, "pt") as f:  # pragma: no cover - only reached with bf16 files and torch present
                return f.get_tensor(name).float().numpy().astype(ml_dtypes.bfloat16)


def check_tensor_names(cfg: KimiLinearConfig, layout: str, available: Iterable[str], source: str) -> None:
    available = set(available)
    expected = mapping.hf_tensor_names(cfg, layout, available)
    missing = [n for n in expected if n not in available]
    unknown = sorted(available - set(expected))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) that config.json implies are missing: "
                              f"{', '.join(missing[:5])}{more}")
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(f"{source}: {len(unknown)} tensor(s) not part of a Kimi-Linear model of this config: "
                              f"{', '.join(unknown[:5])}{more}")


def abstract_model(cfg: KimiLinearConfig, dtype) -> KimiLinearForCausalLM:
    return nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))


def from_pretrained(path, dtype=None, *, config: KimiLinearConfig | None = None) -> KimiLinearForCausalLM:
    path = os.fspath(path)
    cfg = config or KimiLinearConfig.from_pretrained(path)
    dtype = jnp.dtype(dtype or jnp.float32)
    reader = SafetensorsReader(path)
    layout = mapping.detect_layout(reader.names())
    check_tensor_names(cfg, layout, reader.names(), path)
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
        if tuple(array.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor(s) {', '.join(spec.hf_names[0])} give shape {array.shape} for "
                                  f"{'.'.join(map(str, spec.path))}, but config.json implies {tuple(target.shape)}")
        filled[spec.path] = target.replace(jnp.asarray(array, dtype=target.dtype))
    missing = [p for p in targets if p not in filled]
    if missing:
        raise RuntimeError(f"mapping does not cover parameters {missing[:5]}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
