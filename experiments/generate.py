"""Generate text from a Kimi-Linear checkpoint: plain greedy decoding, or chunked recursive refinement.

    python -m experiments.generate --model_path DIR (--prompt TEXT [--prompt TEXT ...] | --prompts_file F)
        [--use_recursive] [--recursive_config PRESET_OR_JSON] [--chunk_width W] [--max_inner_steps K]
        [--commit_mode verified|learned|baseline_verified] [--draft_seed ar|leftover|mask] [--diagnostic]
        [--chat] [--max_new_tokens N] [--batch_size B] [--dtype float32|bfloat16] [--seed S] [--warmup]
        [--output_json F] [--quiet]

--model_path is an HF folder (config.json + safetensors) or a kimi_jax orbax folder (python -m convert.hf_to_orbax,
or a training checkpoint); its tokenizer files are used. Without --use_recursive (and without a --recursive_config
that enables recursion) the baseline runs: the same generator with recursion disabled, i.e. greedy decoding.
--use_recursive forces recursion on. The recursive config is --recursive_config, else the folder's own
recursive_config.json, else the preset "after_surgery"; the window/commit flags override single fields. The sidecar
is the folder's saved one when it fits that config, else a fresh zero-init one (the surgery: with verified commits it
reproduces greedy decoding token for token); a notice on stderr says which.

A prompt plus --max_new_tokens longer than the tokenizer's model_max_length (tokenizer_config.json) gets a notice
on stderr and is generated anyway: Kimi-Linear has no position embeddings (KDA + NoPE MLA), so the limit is the
context it was trained on, not one the model cannot run past.

Each prompt's continuation is printed, then (with recursion) the recursive metrics and the throughput;
--output_json writes everything, per-chunk traces included (atomically: the old or the new file, never a part; never
the --prompts_file or a file inside --model_path). Every expected failure (bad flag, missing folder or file, invalid
config.json or recursive config, a checkpoint or tokenizer that cannot be read) is one `error:` line on stderr with
exit status 2; a failed write of --output_json is one line with exit status 1. Ctrl-C exits with 130, SIGTERM with
143, and either says whether --output_json was written before it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from experiments.flags import add_kda_impl_flag
from kimi_jax.errors import UsageError, WriteError

if TYPE_CHECKING:
    from kimi_jax.safe_io import Writes

DTYPES = ("float32", "bfloat16")
COMMIT_MODES = ("verified", "learned", "baseline_verified")
SEED_MODES = ("ar", "leftover", "mask")
# flag -> RecursiveConfig field, for the single-field overrides
OVERRIDE_FLAGS = {"chunk_width": "--chunk_width", "max_inner_steps": "--max_inner_steps",
                  "commit_mode": "--commit_mode", "seed": "--draft_seed"}
SUMMARY_METRICS = ("avg_refine_steps", "commit_rate", "avg_chunk_length", "stability_at_k", "mean_flip_rate")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block; main() turns it into exit status 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.generate", description=__doc__.split("\n\n")[0],
                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True,
                   help="HF folder (config.json + safetensors) or kimi_jax orbax folder, with tokenizer files")
    p.add_argument("--use_recursive", action="store_true", help="generate with recursive refinement")
    p.add_argument("--recursive_config", metavar="JSON_OR_PRESET",
                   help="a preset (baseline, after_surgery, phase_a, phase_b, phase_c) or a JSON file of fields; "
                        "default: the folder's recursive_config.json, else after_surgery")
    p.add_argument("--chunk_width", type=int, metavar="W",
                   help="window width (a positive multiple of 64; default: the recursive config's)")
    p.add_argument("--max_inner_steps", type=int, metavar="K",
                   help="refinement step cap per chunk (default: the recursive config's)")
    p.add_argument("--commit_mode", choices=COMMIT_MODES,
                   help="how many window tokens a chunk commits (default: the recursive config's)")
    p.add_argument("--draft_seed", choices=SEED_MODES,
                   help="draft seed mode (the config field `seed`): AR greedy, previous leftover, or all [M] "
                        "(default: the recursive config's)")
    p.add_argument("--diagnostic", action="store_true",
                   help="always run K inner steps (same output; enables stability@K)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    prompts.add_argument("--prompts_file", metavar="F",
                         help="one prompt per line, or a .jsonl file of {\"prompt\": ...} objects")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template as a user message")
    p.add_argument("--max_new_tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per prompt (default 64; a notice says when a prompt plus N exceeds the "
                        "tokenizer's model_max_length, and generation goes on)")
    p.add_argument("--batch_size", type=int, metavar="B", help="prompts per batch (default: all in one batch)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="parameter dtype (default: the stored one for orbax folders, float32 for HF folders)")
    add_kda_impl_flag(p)
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="recorded in the output (default 0; generation is greedy, nothing is sampled)")
    p.add_argument("--warmup", action="store_true",
                   help="run the first batch once untimed, so tokens/s excludes XLA compilation")
    p.add_argument("--output_json", metavar="F",
                   help="write prompts, tokens, texts, metrics and traces here (default: not written)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------------------------------ inputs
def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        for i, text in enumerate(args.prompt, 1):
            if not text.strip():
                raise UsageError(f"--prompt: prompt {i} is empty")
        return list(args.prompt)
    path = args.prompts_file
    if not os.path.isfile(path):
        raise UsageError(f"--prompts_file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts_file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"--prompts_file {path}: cannot read it ({e.strerror})") from None
    prompts = []
    jsonl = path.endswith(".jsonl")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--prompts_file {path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise UsageError(f"--prompts_file {path}, line {lineno}: expected an object with a \"prompt\" field")
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise UsageError(f"--prompts_file {path}, line {lineno}: \"prompt\" must be a non-empty string")
        prompts.append(obj["prompt"])
    if not prompts:
        raise UsageError(f"--prompts_file {path}: no prompts (the file is empty or blank)")
    return prompts


def check_output_path(path: str | None, inputs: dict[str, str | None] | None = None) -> str | None:
    """`path` made absolute after checking that it can be written and is none of `inputs` ({flag: path})."""
    if path is None:
        return None
    from kimi_jax.safe_io import refuse_overlap

    path = os.path.abspath(path)
    refuse_overlap(path, "--output_json", inputs or {}, error=UsageError)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(f"--output_json {path}: is a folder")
    if not os.path.isdir(parent):
        raise UsageError(f"--output_json {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output_json {path}: folder {parent} is not writable")
    return path


# -------------------------------------------------------------------------------------------------------- main
def run(argv=None, writes: Writes | None = None) -> int:
    """The command without main()'s error handling; `writes` records what reached the disk."""
    from kimi_jax.safe_io import Writes

    writes = Writes() if writes is None else writes
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not os.path.isdir(args.model_path):
        raise UsageError(f"--model_path {args.model_path}: no such folder")
    output_json = check_output_path(args.output_json, {"--model_path": args.model_path,
                                                       "--prompts_file": args.prompts_file})
    prompts = read_prompts(args)

    import numpy as np

    from kimi_jax import model_folder, tokenizer as tokenizer_mod
    from kimi_jax.config import KimiLinearConfig
    from kimi_jax.model import RunOptions
    from kimi_jax.prompt_generation import (PromptGenerator, check_vocabulary, context_notice, encode_prompts,
                                            tokenizer_max_length)
    from kimi_jax.recursive import io
    from kimi_jax.evaluation.results import fmt_value
    from kimi_jax.recursive.metrics import recursive_metrics, traces_to_json

    def notice(message: str) -> None:
        print(f"notice: {message}", file=sys.stderr, flush=True)

    folder, resolved = model_folder.resolve(args.model_path)  # no model folder at all: fail before loading anything
    if resolved:
        notice(resolved)
    KimiLinearConfig.from_pretrained(folder)  # and a config.json that cannot describe one
    overrides = {field: getattr(args, "draft_seed" if field == "seed" else field) for field in OVERRIDE_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.use_recursive:
        overrides["recursive_enabled"] = True
    elif args.recursive_config is None:  # the default config (the folder's or after_surgery) enables recursion
        overrides["recursive_enabled"] = False
    # Validate the recursive config and the prompts before the (possibly huge) model is loaded.
    rcfg, _ = io.resolve_generation_config(folder, args.recursive_config, overrides)
    use_recursive = rcfg.recursive_enabled
    if not use_recursive:
        unused = [OVERRIDE_FLAGS[k] for k in OVERRIDE_FLAGS if k in overrides] + (["--diagnostic"]
                                                                                  if args.diagnostic else [])
        if unused:
            notice(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without recursion "
                   f"(pass --use_recursive)")
    rows = encode_prompts(tokenizer_mod.load(folder), prompts, chat=args.chat)
    too_long = context_notice(rows, args.max_new_tokens, tokenizer_max_length(folder))
    if too_long:
        notice(too_long)

    info: dict = {}
    model, sidecar, rcfg, tok = io.load_for_generation(folder, recursive_config=args.recursive_config,
                                                       overrides=overrides, dtype=args.dtype, notice=notice,
                                                       info=info)
    eos, pad = model_folder.special_tokens(model.config, tok)
    check_vocabulary(rows, model.config.vocab_size)
    N = args.max_new_tokens
    generator = PromptGenerator(model, sidecar, rcfg, rows, max_new_tokens=N, eos_ids=eos, pad_id=pad,
                                batch_size=args.batch_size, diagnostic=args.diagnostic,
                                opts=RunOptions(kda_impl=args.kda_impl))
    diagnostic = generator.diagnostic

    warmup_seconds = None
    if args.warmup:
        t0 = time.perf_counter()
        generator.run_batch(generator.batches[0])
        warmup_seconds = time.perf_counter() - t0

    from tqdm import tqdm

    def show(i: int, sample: dict) -> None:
        n = sample["num_tokens"]
        header = f"=== [{i + 1}/{len(rows)}] {prompts[i]!r}"
        tqdm.write(f"{header}\n{sample['text']}\n--- {n} token{'s' if n != 1 else ''}", file=sys.stdout)

    samples, traces, seconds = generator.generate(prompts, tok, progress=not args.quiet, on_sample=show)

    total = sum(s["num_tokens"] for s in samples)
    tokens_per_sec = total / seconds if seconds > 0 else None
    metrics = (recursive_metrics([t for per in traces for t in per], rcfg.chunk_width, rcfg.max_inner_steps)
               if use_recursive else {})
    if use_recursive:
        print(f"recursive: chunk_width {rcfg.chunk_width}, max_inner_steps {rcfg.max_inner_steps}, commit_mode "
              f"{rcfg.commit_mode}, draft seed {rcfg.seed}, sidecar {info.get('sidecar')}"
              + (", diagnostic" if diagnostic else ""))
        print("metrics: " + "  ".join(f"{k} {fmt_value(metrics.get(k))}" for k in SUMMARY_METRICS))
    else:
        print("baseline: greedy decoding (recursion disabled)")
    compile_note = "" if args.warmup else " (includes XLA compilation; --warmup excludes it)"
    print(f"generated {total} tokens in {seconds:.2f} s: {fmt_value(tokens_per_sec)} tokens/s{compile_note}")

    if output_json is not None:
        from kimi_jax.safe_io import describe_write_error, write_json_atomic

        writes.begin(output_json, "json")
        try:
            write_json_atomic(output_json, {
                "model_path": os.path.abspath(folder),
                "recursive_config": rcfg.to_dict(),
                "use_recursive": use_recursive,
                "samples": samples,
                "metrics": metrics,
                "traces": [traces_to_json(per) for per in traces],
                "timing": {"seconds": seconds, "tokens_per_sec": tokens_per_sec, "generated_tokens": total,
                           "includes_compilation": not args.warmup, "warmup_seconds": warmup_seconds},
                "settings": {"max_new_tokens": N, "batch_size": generator.batch_size,
                             "num_batches": len(generator.batches), "padded_prompt_length": generator.length,
                             "dtype": np.dtype(model.dtype).name, "seed": args.seed, "diagnostic": diagnostic,
                             "chat": args.chat,
                             "eos_token_ids": eos, "pad_token_id": pad, "model_format": info.get("model_format"),
                             "recursive_config_source": info.get("recursive_config_source"),
                             "sidecar": info.get("sidecar")},
            }, allow_nan=True)
        except OSError as e:
            raise WriteError(f"{describe_write_error(e, output_json)}; {writes.describe()}") from None
        writes.finish()
        print(f"wrote {output_json}")
    return 0


def main(argv=None) -> int:
    """Run the command; expected failures become one `error:` line on stderr and exit status 2, a failed write of
    --output_json one line and exit status 1; Ctrl-C (130) and SIGTERM (143) say whether --output_json was written."""
    from kimi_jax.safe_io import Writes, run_command

    return run_command(run, argv, Writes())


if __name__ == "__main__":
    sys.exit(main())
