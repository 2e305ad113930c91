"""Safetensors files without torch: a memory-mapped reader (bf16 included) and a writer.

The reader parses each shard's JSON header and slices one tensor at a time out of a memory map, so host memory holds
only what the caller keeps. bf16, the hub checkpoint's dtype, comes back as `ml_dtypes.bfloat16` (safetensors' own
numpy path cannot return it). The writer emits the same format, bf16 included.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from kimi_jax.errors import KimiJaxError

class CheckpointError(KimiJaxError, ValueError):
    """A checkpoint folder that does not hold the tensors its config.json describes."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}} plus "__metadata__"."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > os.path.getsize(path) - 8:
                raise CheckpointError(f"{path}: not a readable safetensors file (header length {size} exceeds the "
                                      "file; truncated or corrupt)")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise CheckpointError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
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
            file_size = os.path.getsize(path)
            for name, info in header.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                    raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'")
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
                start, stop = info["data_offsets"]
                if base + stop > file_size:
                    raise CheckpointError(f"{path}: truncated: tensor '{name}' ends at byte {base + stop}, but the "
                                          f"file has {file_size} bytes")
                itemsize = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
                if stop - start != int(np.prod(info["shape"], dtype=np.int64)) * itemsize:  # checked before any write
                    raise CheckpointError(f"{path}: tensor '{name}' has {stop - start} bytes, not "
                                          f"{tuple(info['shape'])} x {info['dtype']}")
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
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        count = (stop - start) // np_dtype.itemsize
        if count != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor '{name}' has {stop - start} bytes, not {shape} x {dtype}")
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(stop - start,))
        return np.array(mm.view(np_dtype).reshape(shape))



_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write {name: array} as one safetensors file (header, then each tensor's bytes in order). Returns bytes written."""
    header, offset, arrays = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {array.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    return 8 + len(blob) + offset


class PlannedSafetensorsWriter:
    """Write a set of shards whose tensor names, shapes and dtypes are known up front, one tensor at a time.

    Headers (and so every offset) are written first; each tensor is then written at its offset as it arrives, in any
    order, so only the tensor in hand is in memory. `close()` checks every planned tensor was written exactly once.
    """

    def __init__(self, folder: str, plan: list[tuple[str, tuple, np.dtype]], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        groups, current, size = [], [], 0
        for name, shape, dtype in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if current and size + nbytes > max_shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append((name, tuple(shape), np.dtype(dtype), nbytes))
            size += nbytes
        if current:
            groups.append(current)
        n = len(groups)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                           for i in range(n)]
        self.slots, self.total_bytes = {}, 0  # name -> (path, absolute offset, shape, dtype)
        for file, group in zip(self.files, groups):
            header, offset = {}, 0
            for name, shape, dtype, nbytes in group:
                if dtype not in _DTYPE_NAMES:
                    raise ValueError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset,
                                                                                                     offset + nbytes]}
                offset += nbytes
            if metadata:
                header["__metadata__"] = metadata
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            path = os.path.join(folder, file)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                f.truncate(8 + len(blob) + offset)
            base = 8 + len(blob)
            for name, info in header.items():
                if name != "__metadata__":
                    self.slots[name] = (path, base + info["data_offsets"][0], tuple(info["shape"]),
                                        np.dtype(SAFETENSORS_DTYPES[info["dtype"]]))
            self.total_bytes += base + offset
        self.written: set[str] = set()

    def write(self, name: str, array: np.ndarray) -> None:
        if name not in self.slots:
            raise ValueError(f"tensor '{name}' is not in the planned shards")
        if name in self.written:
            raise ValueError(f"tensor '{name}' was written twice")
        path, offset, shape, dtype = self.slots[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ValueError(f"tensor '{name}' is {array.shape} {array.dtype}, planned {shape} {dtype}")
        try:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(np.ascontiguousarray(array).tobytes())
        except OSError as e:  # a failed write() names no file: name the shard
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror, path) from e
            raise
        self.written.add(name)

    def close(self) -> dict[str, str]:
        """Return the weight map {name: file}; raise if a planned tensor was never written."""
        missing = sorted(set(self.slots) - self.written)
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. '{missing[0]}'")
        return {name: os.path.basename(path) for name, (path, _, _, _) in self.slots.items()}
