"""Convert an HF Kimi-Linear checkpoint folder to a kimi_jax orbax checkpoint, streaming tensor by tensor.

    python -m convert.hf_to_orbax --hf_path DIR --output DIR [--dtype source|bfloat16|float32] [--overwrite]

The weights are stored in the source's dtype by default (`--dtype source`, lossless: the hub's bfloat16 stays
bfloat16, a float32 checkpoint stays float32); `--dtype bfloat16|float32` casts on request. Every tensor cast on the
way (a float16 or float64 tensor in a float32 checkpoint, say) is named in a notice on stderr.

Before anything is written, every tensor's name, shape and dtype is checked against config.json (hub or
transformers-native names, one file or indexed shards). Then each JAX parameter is assembled through the declarative
mapping (convert/mapping.py) and written to orbax; parameters stacked over a scanned run of layers are assembled and
written one layer at a time. Peak host memory is therefore about the largest *per-layer* parameter a couple of times
over (the tensor read, its transposed copy, the cast) plus orbax/tensorstore buffers: for Kimi-Linear-48B in bf16
that is one layer's routed-expert stack, 256 x 2304 x 1024 x 2 B = 1.1 GiB, never the 91.5 GiB checkpoint.
Writing to --dtype float32 doubles it; nothing else grows with model size. Assembly overlaps the writes: up to
512 MiB of assembled blocks may wait for tensorstore (kimi_jax.orbax_model.WRITE_AHEAD_BYTES), which compresses
64 MiB chunks on every core.

The output is built in a hidden temporary sibling folder and renamed into place only when complete, with config.json
and the tokenizer files copied alongside; an existing output is refused unless --overwrite, and an output that is,
contains or lies inside --hf_path is refused always. Ctrl-C, SIGTERM, a full disk or any error leave nothing behind
(a temporary left by a killed run is removed, with a notice, by the next run into the same output).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

import jax.numpy as jnp
import numpy as np

from kimi_jax.hf import mapping
from convert.cli import (ArgumentParser, UsageError, copy_sidecar_files, holds_exactly, human_bytes, listing, notice,
                         output_folder, progress_bar, relative_rounding, require_folder, run_main)
from kimi_jax.hf.safetensors_io import SAFETENSORS_DTYPES, SafetensorsReader
from kimi_jax import orbax_model
from kimi_jax.config import KimiLinearConfig
from kimi_jax.hf.loading import abstract_model, validate_checkpoint
from kimi_jax.model import keeps_fp32
from kimi_jax.safe_io import refuse_overlap

SOURCE = "source"  # --dtype: store what the source holds
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}  # what a checkpoint stores, narrowest first
DTYPE_CHOICES = (SOURCE, *DTYPES)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m convert.hf_to_orbax", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_path", required=True, help="HF checkpoint folder (config.json + safetensors)")
    p.add_argument("--output", required=True,
                   help="orbax checkpoint folder to create; never the --hf_path folder, inside it or around it")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=SOURCE,
                   help="storage dtype of the weights. 'source' stores the source's own dtype, losslessly: bfloat16 "
                        "stays bfloat16, float32 stays float32; a source in several dtypes, or in float16, is stored "
                        "as float32, float64 is rounded to float32 (a notice names every cast tensor). The router, "
                        "correction bias, dt_bias and A_log stay float32 always. (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (the old folder is removed only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def convert(hf_path: str, output: str, dtype: str = SOURCE, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert and return a summary {tensors, bytes_read, seconds, params, layout, dtype}."""
    require_folder(hf_path, "--hf_path")
    refuse_overlap(output, "--output", {"--hf_path": hf_path}, error=UsageError)
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"--dtype {dtype}: choose one of {list(DTYPE_CHOICES)}")
    cfg = KimiLinearConfig.from_pretrained(hf_path)
    reader = SafetensorsReader(hf_path)
    layout = validate_checkpoint(cfg, reader, hf_path)
    available = set(reader.names())
    specs = mapping.plan(cfg, layout)
    sources = source_tensors(specs, reader)
    stored = storage_dtype({t.dtype for t in sources.values() if not t.fp32_kept}) if dtype == SOURCE else dtype
    _, abstract_state = _split(abstract_model(cfg, DTYPES[stored]))
    targets = {name: np.dtype(abstract_state[spec.path].dtype) for spec in specs
               for name in _resolved_names(spec, available)}
    total_bytes = sum(reader.nbytes(n) for n in available)
    t0 = time.time()
    with output_folder(output, overwrite) as tmp:
        report_casts(sources, targets, requested=None if dtype == SOURCE else dtype)
        with progress_bar(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="hf -> orbax",
                          disable=not progress) as bar:
            params, counted = lazy_params(cfg, specs, abstract_state, reader, bar)
            orbax_model.save_params(os.path.join(tmp, orbax_model.PARAMS_DIR), params)
        copied = copy_sidecar_files(hf_path, tmp)
        shutil.copy2(os.path.join(hf_path, "config.json"), os.path.join(tmp, "config.json"))
        num_params = int(sum(p.size for p in params.values()))
        orbax_model.write_meta(tmp, dtype=stored, num_params=num_params, source=os.path.abspath(hf_path),
                              source_layout=layout, copied_files=copied)
    return {"tensors": len(counted), "bytes_read": total_bytes, "seconds": time.time() - t0, "params": num_params,
            "layout": layout, "dtype": stored}


def lazy_params(cfg: KimiLinearConfig, specs: list[mapping.ParamSpec], abstract_state: dict,
                reader: SafetensorsReader, bar) -> tuple[dict[str, orbax_model.LazyParam], set[str]]:
    """{parameter key: LazyParam assembling it from the HF tensors when orbax writes it}, and the set of tensor names
    read so far (filled as the write goes)."""
    available = set(reader.names())
    counted: set[str] = set()

    def read(name: str) -> np.ndarray:
        name = mapping.resolve_name(name, available)
        array = reader.get(name)
        if name not in counted:  # gate/up of a fused native tensor read it twice; count its bytes once
            counted.add(name)
            bar.update(reader.nbytes(name))
            bar.set_postfix(tensors=f"{len(counted)}/{len(available)}", refresh=False)
        return array

    def lazy(spec: mapping.ParamSpec, target) -> orbax_model.LazyParam:
        def blocks():
            for r, names in enumerate(spec.hf_names):
                out = spec.rule.to_jax([read(n) for n in names], cfg)[spec.output_index]
                yield (r if spec.layers else None), np.asarray(out).astype(target.dtype)

        return orbax_model.LazyParam(target.shape, target.dtype, blocks, stacked=bool(spec.layers))

    return {orbax_model.param_key(spec.path): lazy(spec, abstract_state[spec.path]) for spec in specs}, counted


# ------------------------------------------------------------------------------------------------ dtypes
@dataclasses.dataclass(frozen=True)
class SourceTensor:
    dtype: np.dtype
    fp32_kept: bool  # feeds a parameter that is stored in float32 whatever --dtype says (kimi_jax.model.keeps_fp32)


def _resolved_names(spec: mapping.ParamSpec, available) -> list[str]:
    return [mapping.resolve_name(n, available) for names in spec.hf_names for n in names]


def source_tensors(specs: list[mapping.ParamSpec], reader: SafetensorsReader) -> dict[str, SourceTensor]:
    """{HF name: its dtype and whether it feeds only float32-kept parameters} for every tensor the specs read."""
    available = set(reader.names())
    fp32_only: dict[str, bool] = {}
    for spec in specs:
        kept = keeps_fp32(orbax_model.param_key(spec.path))
        for name in _resolved_names(spec, available):
            fp32_only[name] = fp32_only.get(name, True) and kept
    return {name: SourceTensor(np.dtype(SAFETENSORS_DTYPES[reader.entries[name][1]]), kept)
            for name, kept in fp32_only.items()}


def storage_dtype(weight_dtypes: set) -> str:
    """--dtype source: the narrowest storage dtype that holds every weight dtype of the source exactly (bfloat16 for
    bfloat16 or float8 weights, float32 for float32, float16 or a mix); float32, the widest, when none does (float64
    weights, which are then rounded and said so)."""
    for name, dtype in DTYPES.items():
        if all(holds_exactly(d, dtype) for d in weight_dtypes):
            return name
    return list(DTYPES)[-1]


def report_casts(sources: dict[str, SourceTensor], targets: dict[str, np.dtype], requested: str | None) -> None:
    """One notice per (source dtype -> stored dtype) cast, naming the tensors: rounding always, exact casts too except
    the documented float32 of the router, correction bias, dt_bias and A_log."""
    groups: dict[tuple, list[str]] = {}
    for name, source in sources.items():
        target = targets[name]
        exact = holds_exactly(source.dtype, target)
        if source.dtype != target and not (exact and source.fp32_kept):
            groups.setdefault((source.dtype.name, target.name, exact), []).append(name)
    for (src, dst, exact), names in groups.items():
        if exact:
            how = f"stored as {dst}, which holds them exactly"
        else:
            why = f", as --dtype {requested} asks" if requested == dst else ""
            how = f"rounded to {dst} (up to {relative_rounding(dst):.0e} relative){why}"
        notice(f"{len(names)} tensor(s) are {src} in the source and {how}: {listing(names)}")


def _split(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return graphdef, dict(nnx.to_flat_state(state))


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = convert(args.hf_path, args.output, args.dtype, args.overwrite, progress=not args.quiet)
    rate = summary["bytes_read"] / max(summary["seconds"], 1e-9)
    print(f"converted {summary['tensors']} tensors ({summary['layout']} names, {human_bytes(summary['bytes_read'])}, "
          f"{summary['params']:,} parameters, stored in {summary['dtype']}) to {os.path.abspath(args.output)} in "
          f"{summary['seconds']:.1f} s ({human_bytes(rate)}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
