"""Convert an HF Kimi-Linear checkpoint folder to a kimi_jax orbax checkpoint, streaming tensor by tensor.

    python -m convert.hf_to_orbax --hf_path DIR --output DIR [--dtype bfloat16|float32] [--overwrite]

Before anything is written, every tensor's name, shape and dtype is checked against config.json (hub or
transformers-native names, one file or indexed shards). Then each JAX parameter is assembled through the declarative
mapping (convert/mapping.py) and written to orbax; parameters stacked over a scanned run of layers are assembled and
written one layer at a time. Peak host memory is therefore about the largest *per-layer* parameter a couple of times
over (the tensor read, its transposed copy, the cast) plus orbax/tensorstore buffers: for Kimi-Linear-48B in bf16
that is one layer's routed-expert stack, 256 x 2304 x 1024 x 2 B = 1.1 GiB, never the 91.5 GiB checkpoint.
Writing to --dtype float32 doubles it; nothing else grows with model size. Assembly overlaps the writes: up to
512 MiB of assembled blocks may wait for tensorstore (kimi_jax.checkpoint.WRITE_AHEAD_BYTES), which compresses
64 MiB chunks on every core.

The output is built in a temporary sibling folder and renamed into place only when complete, with config.json and
the tokenizer files copied alongside; an existing output is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from convert import mapping
from convert.cli import UsageError, atomic_output, copy_sidecar_files, human_bytes, require_folder, run_main
from convert.safetensors_io import SafetensorsReader
from kimi_jax import checkpoint
from kimi_jax.config import KimiLinearConfig
from kimi_jax.loading import abstract_model, validate_checkpoint

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m convert.hf_to_orbax", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_path", required=True, help="HF checkpoint folder (config.json + safetensors)")
    p.add_argument("--output", required=True, help="orbax checkpoint folder to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="storage dtype of the weights (router, correction bias, dt_bias and A_log stay float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def convert(hf_path: str, output: str, dtype="bfloat16", overwrite: bool = False, progress: bool = True) -> dict:
    """Convert and return a summary {tensors, bytes_read, seconds, params, layout}."""
    require_folder(hf_path, "--hf_path")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    cfg = KimiLinearConfig.from_pretrained(hf_path)
    reader = SafetensorsReader(hf_path)
    layout = validate_checkpoint(cfg, reader, hf_path)
    available = set(reader.names())
    _, abstract_state = _split(abstract_model(cfg, DTYPES[dtype]))
    total_bytes = sum(reader.nbytes(n) for n in available)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="hf -> orbax",
               disable=not progress, file=sys.stderr)
    counted: set[str] = set()

    def read(name: str) -> np.ndarray:
        name = mapping.resolve_name(name, available)
        array = reader.get(name)
        if name not in counted:  # gate/up of a fused native tensor read it twice; count its bytes once
            counted.add(name)
            bar.update(reader.nbytes(name))
            bar.set_postfix(tensors=f"{len(counted)}/{len(available)}", refresh=False)
        return array

    def lazy(spec: mapping.ParamSpec, target) -> checkpoint.LazyParam:
        def blocks():
            for r, names in enumerate(spec.hf_names):
                out = spec.rule.to_jax([read(n) for n in names], cfg)[spec.output_index]
                yield (r if spec.layers else None), np.asarray(out).astype(target.dtype)

        return checkpoint.LazyParam(target.shape, target.dtype, blocks, stacked=bool(spec.layers))

    params = {checkpoint.param_key(spec.path): lazy(spec, abstract_state[spec.path])
              for spec in mapping.plan(cfg, layout)}
    t0 = time.time()
    with atomic_output(output, overwrite) as tmp:
        checkpoint.save_params(os.path.join(tmp, checkpoint.PARAMS_DIR), params)
        copied = copy_sidecar_files(hf_path, tmp)
        shutil.copy2(os.path.join(hf_path, "config.json"), os.path.join(tmp, "config.json"))
        num_params = int(sum(p.size for p in params.values()))
        checkpoint.write_meta(tmp, dtype=dtype, num_params=num_params, source=os.path.abspath(hf_path),
                              source_layout=layout, copied_files=copied)
    bar.close()
    return {"tensors": len(counted), "bytes_read": total_bytes, "seconds": time.time() - t0, "params": num_params,
            "layout": layout}


def _split(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return graphdef, dict(nnx.to_flat_state(state))


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = convert(args.hf_path, args.output, args.dtype, args.overwrite, progress=not args.quiet)
    rate = summary["bytes_read"] / max(summary["seconds"], 1e-9)
    print(f"converted {summary['tensors']} tensors ({summary['layout']} names, {human_bytes(summary['bytes_read'])}, "
          f"{summary['params']:,} parameters) to {os.path.abspath(args.output)} in {summary['seconds']:.1f} s "
          f"({human_bytes(rate)}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
