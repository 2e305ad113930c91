"""Compare kimi_jax's logits with transformers' on the same tokens; exit 1 above the tolerance.

    python -m convert.check_logits --hf_path DIR --ckpt DIR [--text TEXT ...] [--tolerance 1e-4]
                                   [--dtype float32|bfloat16] [--num_tokens N] [--seed S]

`--hf_path` is run by transformers' KimiLinearForCausalLM (torch, CPU); `--ckpt` by kimi_jax, either a kimi_jax orbax
checkpoint (from convert.hf_to_orbax or training) or an HF folder. Tokens come from `--text` through the checkpoint's
tokenizer (kimi_jax.tokenizer), or are `--num_tokens` seeded random ids when no text (or no tokenizer) is given.
Prints max and mean |logit diff| and top-1 agreement per input, and a note when `--ckpt` stores weights in a dtype
that rounds the source's (a bfloat16 checkpoint of a float32 source: its logits differ by far more than 1e-4 without
any conversion error). The real 48B needs ~200 GB of host memory per model in float32; `--dtype bfloat16` halves it
(compare with a looser tolerance then).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from convert.cli import (ArgumentParser, UsageError, holds_exactly, listing, relative_rounding, require_folder,
                         run_main)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m convert.check_logits", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_path", required=True, help="HF checkpoint folder, run by transformers")
    p.add_argument("--ckpt", required=True, help="kimi_jax orbax checkpoint folder or HF folder, run by kimi_jax")
    p.add_argument("--text", nargs="*", default=None,
                   help="input text(s); needs a tokenizer in either folder (default: --num_tokens random ids)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed (default: %(default)g)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype both models compute in (weights are cast to it on load); bfloat16 halves the memory "
                        "and needs a looser --tolerance (default: %(default)s)")
    p.add_argument("--num_tokens", type=int, default=64,
                   help="length of the random-id input without --text (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random ids drawn without --text (default: %(default)s)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _hf_param_dtypes(folder: str) -> dict[str, set]:
    """{parameter key: dtypes of the HF tensors it is assembled from} of an HF folder (headers only)."""
    from kimi_jax.hf import mapping
    from kimi_jax.hf.safetensors_io import SAFETENSORS_DTYPES, SafetensorsReader
    from kimi_jax.orbax_model import param_key
    from kimi_jax.config import KimiLinearConfig

    reader = SafetensorsReader(folder)
    available = set(reader.names())
    out = {}
    for spec in mapping.plan(KimiLinearConfig.from_pretrained(folder), mapping.detect_layout(reader.names())):
        names = {mapping.resolve_name(n, available) for group in spec.hf_names for n in group}
        out[param_key(spec.path)] = {np.dtype(SAFETENSORS_DTYPES[reader.entries[n][1]]) for n in names
                                     if n in reader.entries}
    return out


def storage_note(hf_path: str, ckpt: str) -> str | None:
    """A note when `ckpt` stores a parameter in a dtype that rounds the source's values (None when it holds them all
    exactly): then logits differ by far more than a conversion error would make them."""
    from kimi_jax import orbax_model

    source = _hf_param_dtypes(hf_path)
    if orbax_model.is_checkpoint(ckpt):
        stored = {key: {np.dtype(s.dtype)} for key, s in orbax_model.stored_arrays(ckpt).items()}
    else:
        stored = _hf_param_dtypes(ckpt)
    rounded: dict[tuple, list[str]] = {}  # (stored dtype, source dtype) -> parameter keys
    for key, source_dtypes in source.items():
        for src in source_dtypes:
            for dst in stored.get(key, ()):
                if not holds_exactly(src, dst):
                    rounded.setdefault((dst.name, src.name), []).append(key)
    if not rounded:
        return None
    parts = "; ".join(f"{dst} where the source has {src} ({len(keys)} parameter(s): {listing(keys, 2)})"
                      for (dst, src), keys in rounded.items())
    worst = max(relative_rounding(dst) for dst, _ in rounded)
    return (f"note: --ckpt stores {parts}, rounding each weight by up to {worst:.0e} relative: logit differences from "
            f"that rounding are expected, not a conversion error (hf_to_orbax's default, --dtype source, stores the "
            f"source exactly)")


def token_inputs(args, vocab_size: int) -> list[tuple[str, np.ndarray]]:
    if args.text:
        from kimi_jax.tokenizer import TokenizerError, load

        for folder in (args.ckpt, args.hf_path):
            try:
                tok = load(folder)
                break
            except TokenizerError:
                continue
        else:
            raise UsageError(f"--text needs a tokenizer (tiktoken.model or tokenizer.json) in {args.ckpt} or "
                             f"{args.hf_path}")
        inputs = []
        for text in args.text:
            ids = tok.encode(text)
            if not ids:
                raise UsageError(f"--text {text!r} tokenizes to nothing")
            if max(ids) >= vocab_size:
                raise UsageError(f"the tokenizer produced id {max(ids)} >= vocab_size {vocab_size}")
            inputs.append((text[:40], np.asarray(ids)[None]))
        return inputs
    if args.num_tokens < 1:
        raise UsageError(f"--num_tokens must be >= 1, got {args.num_tokens}")
    rng = np.random.default_rng(args.seed)
    return [(f"{args.num_tokens} random ids (seed {args.seed})", rng.integers(0, vocab_size, (1, args.num_tokens)))]


def main(argv=None) -> int:
    args = parse_args(argv)
    require_folder(args.hf_path, "--hf_path")
    require_folder(args.ckpt, "--ckpt")
    import jax.numpy as jnp
    import torch
    from transformers import KimiLinearForCausalLM as TorchModel

    import kimi_jax
    from kimi_jax import orbax_model
    from kimi_jax.config import KimiLinearConfig

    cfg = KimiLinearConfig.from_pretrained(args.hf_path)
    inputs = token_inputs(args, cfg.vocab_size)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    ours = (orbax_model.load_model(args.ckpt, dtype=dtype) if orbax_model.is_checkpoint(args.ckpt)
            else kimi_jax.from_pretrained(args.ckpt, dtype=dtype))
    torch_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    reference = TorchModel.from_pretrained(args.hf_path, dtype=torch_dtype).eval()
    worst = 0.0
    print(f"{'input':<42} {'tokens':>6} {'max |diff|':>11} {'mean |diff|':>12} {'top-1 agree':>12}")
    for label, ids in inputs:
        with torch.no_grad():
            want = reference(torch.as_tensor(ids)).logits.float().numpy()
        got = np.asarray(kimi_jax.forward(ours, ids))
        diff = np.abs(got - want)
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        worst = max(worst, float(diff.max()))
        print(f"{label:<42} {ids.shape[1]:>6d} {diff.max():>11.3e} {diff.mean():>12.3e} {agree * 100:>11.1f}%")
    note = storage_note(args.hf_path, args.ckpt)
    if note:
        print(note)
    verdict = "PASSED" if worst <= args.tolerance else "FAILED"
    print(f"{verdict}: max |logit diff| {worst:.3e} vs tolerance {args.tolerance:.0e} ({args.dtype}; "
          f"ours: {os.path.abspath(args.ckpt)}, reference: transformers on {os.path.abspath(args.hf_path)})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
