"""Export a kimi_jax orbax checkpoint as an HF Kimi-Linear folder that transformers (and vLLM) load.

    python -m convert.orbax_to_hf --ckpt DIR --output DIR [--layout hub|native] [--dtype stored|bfloat16|float32]
                                  [--max_shard_size 5GB] [--overwrite]

Writes safetensors shards of at most --max_shard_size each (+ `model.safetensors.index.json` when there is more than
one), config.json and the tokenizer files. `--layout hub` (default) uses the original hub names, which both
transformers and the hub's remote code read; `native` uses transformers' fused in-memory names. Parameters are
restored one at a time (an orbax partial restore), so peak memory is about one stacked parameter plus one output shard.

The output is built in a hidden temporary sibling folder and renamed into place only when complete; an existing
output is refused unless --overwrite, and an output that is, contains or lies inside --ckpt is refused always. Ctrl-C,
SIGTERM, a full disk or any error leave nothing behind (a temporary left by a killed run is removed, with a notice, by
the next run into the same output).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

import numpy as np

from kimi_jax.hf import mapping
from convert.cli import (ArgumentParser, UsageError, copy_sidecar_files, human_bytes, output_folder, progress_bar,
                         require_folder, run_main)
from kimi_jax.hf.safetensors_io import PlannedSafetensorsWriter
from kimi_jax import orbax_model
from kimi_jax.config import KimiLinearConfig
from kimi_jax.model import keeps_fp32
from kimi_jax.safe_io import refuse_overlap

DTYPES = ("stored", "bfloat16", "float32")
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1GiB', '123' -> bytes (K/M/G/T are powers of 1024, with or without B or iB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UsageError(f"--max_shard_size {text!r}: expected a size such as 5GB, 500MB or 1GiB")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    size = int(float(m.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise UsageError(f"--max_shard_size {text!r}: must be at least one byte (e.g. 5GB)")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m convert.orbax_to_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="kimi_jax checkpoint folder (from hf_to_orbax or training)")
    p.add_argument("--output", required=True,
                   help="HF folder to create; never the --ckpt folder, inside it or around it")
    p.add_argument("--layout", choices=mapping.LAYOUTS, default=mapping.HUB,
                   help="tensor naming: hub (the original names) or native (transformers' fused names) "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="stored",
                   help="dtype of the written weights (kimi_jax.model.FP32_PARAMS stay float32); 'stored' keeps the "
                        "checkpoint's (default: %(default)s)")
    p.add_argument("--max_shard_size", default="5GB",
                   help="largest safetensors file, e.g. 5GB, 500MB, 1GiB; must hold the largest tensor "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (the old folder is removed only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def export(ckpt: str, output: str, layout: str = mapping.HUB, dtype: str = "stored", max_shard_size: int = 5 << 30,
           overwrite: bool = False, progress: bool = True) -> dict:
    require_folder(ckpt, "--ckpt")
    refuse_overlap(output, "--output", {"--ckpt": ckpt}, error=UsageError)
    if layout not in mapping.LAYOUTS:
        raise UsageError(f"--layout {layout}: choose one of {mapping.LAYOUTS}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {DTYPES}")
    orbax_model.read_meta(ckpt)  # a clear error if this is not a kimi_jax checkpoint
    cfg = KimiLinearConfig.from_pretrained(ckpt)
    stored = orbax_model.stored_arrays(ckpt)
    specs = mapping.plan(cfg, layout)
    wanted = {orbax_model.param_key(s.path) for s in specs}
    if wanted != set(stored):
        missing, unknown = sorted(wanted - set(stored)), sorted(set(stored) - wanted)
        raise orbax_model.CheckpointFormatError(f"{ckpt}: parameters do not match config.json: missing {missing[:3]}, "
                                               f"unexpected {unknown[:3]}")

    @functools.lru_cache(maxsize=2)  # a rule reads at most 2 parameters (fused native gate/up); keep only those
    def restore(key: str) -> np.ndarray:
        return orbax_model.restore_arrays(ckpt, {key: stored[key]})[key]

    # Every output tensor's name, shape and dtype is known from the config, so the shard layout is planned first
    # and each tensor is written at its offset as soon as it is produced: memory holds one parameter, not a shard.
    expected = mapping.expected_hf_tensors(cfg, layout)
    weight_dtype = _weight_dtype(stored, dtype)
    fp32_names = {name.split("|")[0] for spec in specs if keeps_fp32(orbax_model.param_key(spec.path))
                  for names in spec.hf_names for name in names}
    plan = [(name, shape, np.dtype(np.float32) if name in fp32_names else weight_dtype)
            for name, shape in expected.items()]
    _check_shard_size(plan, max_shard_size)
    total_params = int(sum(s.size for s in stored.values()))
    t0 = time.time()
    with output_folder(output, overwrite) as tmp:
        with progress_bar(total=total_params, unit="param", unit_scale=True, desc="orbax -> hf",
                          disable=not progress) as bar:
            writer = PlannedSafetensorsWriter(tmp, plan, max_shard_size, metadata={"format": "pt"})
            for name, tensor in mapping.disassemble(cfg, layout, lambda path: restore(orbax_model.param_key(path))):
                writer.write(name, tensor.astype(writer.slots[name][3]))
                bar.update(tensor.size)
            weight_map = writer.close()
        if len(writer.files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(ckpt, "config.json")) as f:
            hf_config = json.load(f)
        hf_config.setdefault("architectures", ["KimiLinearForCausalLM"])
        hf_config["dtype"] = "bfloat16" if weight_dtype.name == "bfloat16" else str(weight_dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        copy_sidecar_files(ckpt, tmp)
    return {"tensors": len(weight_map), "shards": len(writer.files), "bytes": writer.total_bytes,
            "seconds": time.time() - t0}


def _check_shard_size(plan: list[tuple[str, tuple, np.dtype]], max_shard_size: int) -> None:
    """A shard limit below the largest tensor cannot be kept (that tensor would get a larger file of its own, and
    every smaller one its own file too at a limit of a few bytes): refuse it, naming the size that works."""
    nbytes = {name: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for name, shape, dtype in plan}
    largest = max(nbytes, key=nbytes.get)
    if max_shard_size < nbytes[largest]:
        raise UsageError(f"--max_shard_size {human_bytes(max_shard_size)} is smaller than the largest tensor, "
                         f"'{largest}' ({human_bytes(nbytes[largest])}, {nbytes[largest]} bytes); pass at least that")


def _weight_dtype(stored: dict, dtype: str) -> np.dtype:
    """The dtype of every exported tensor that is not kept in float32."""
    if dtype == "stored":
        dtypes = {np.dtype(s.dtype) for key, s in stored.items() if not keeps_fp32(key)}
        if len(dtypes) != 1:
            raise orbax_model.CheckpointFormatError(f"weights are stored in several dtypes {sorted(map(str, dtypes))};"
                                                   " pass --dtype bfloat16 or float32")
        return dtypes.pop()
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = export(args.ckpt, args.output, args.layout, args.dtype, parse_size(args.max_shard_size),
                     args.overwrite, progress=not args.quiet)
    print(f"exported {summary['tensors']} tensors ({args.layout} names) in {summary['shards']} shard(s), "
          f"{human_bytes(summary['bytes'])}, to {os.path.abspath(args.output)} in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
