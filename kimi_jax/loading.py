"""Load an HF Kimi-Linear checkpoint folder into a kimi_jax model, in memory.

The folder holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json`, with hub (remote-code) or transformers-native tensor names; both are detected.
Tensors are read one at a time and assembled per JAX parameter through `convert.mapping`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from convert import mapping
from kimi_jax.config import KimiLinearConfig
from kimi_jax.model import KimiLinearForCausalLM


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold the tensors its config.json describes."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}} plus "__metadata__"."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    header["__data_start__"] = 8 + size
    return header


class SafetensorsReader:
    """Name -> numpy tensor over one safetensors file or an indexed set of shards.

    Reads headers directly and each tensor through a memory map, one tensor at a time, so host memory holds only
    what the caller keeps; bf16 (the hub checkpoint's dtype) comes back as `ml_dtypes.bfloat16`, no torch needed.
    """

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not os.path.exists(os.path.join(folder, shard)):
                    raise CheckpointError(f"{index}: lists shard {shard}, which is missing")
        elif os.path.exists(single):
            shards = ["model.safetensors"]
            weight_map = None
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.entries = {}  # name -> (path, dtype, shape, start, stop)
        for shard in shards:
            path = os.path.join(folder, shard)
            header = read_safetensors_header(path)
            base = header.pop("__data_start__")
            header.pop("__metadata__", None)
            for name, info in header.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
                start, stop = info["data_offsets"]
                self.entries[name] = (path, info["dtype"], tuple(info["shape"]), base + start, base + stop)
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.entries]
            if absent:
                raise CheckpointError(f"{index}: tensor '{absent[0]}' is listed but not in shard {weight_map[absent[0]]}")

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def nbytes(self, name: str) -> int:
        _, _, _, start, stop = self.entries[name]
        return stop - start

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing")
        path, dtype, shape, start, stop = self.entries[name]
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        count = (stop - start) // np_dtype.itemsize
        if count != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor '{name}' has {stop - start} bytes, not {shape} x {dtype}")
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(stop - start,))
        return np.array(mm.view(np_dtype).reshape(shape))


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
