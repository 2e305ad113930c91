"""Fine-tune Kimi-Linear: the vanilla causal-LM stage, or the recursive-refinement stage in phase a, b or c.

    python -m experiments.train --model_path DIR [--stage vanilla|recursive | --use_recursive] [--phase a|b|c]
        [--data demo|FILE|FOLDER|GLOB|HF_NAME] [--eval_data SPEC] [--chat] [--seq_len T] [--batch_size B]
        [--grad_accum G] [--num_steps N] [--lr LR] [--warmup_steps S] [--schedule cosine|linear]
        [--weight_decay WD] [--clip_norm C] [--train_groups G1,G2,...] [--recursive_config PRESET_OR_JSON]
        [--chunk_width W] [--max_inner_steps K] [--mesh data=2,fsdp=-1] [--dtype float32|bfloat16]
        [--remat | --no-remat] [--unroll_layers] [--seed S] [--output_dir DIR] [--log_dir DIR] [--eval_interval N]
        [--max_eval_batches N] [--save_interval N] [--max_to_keep N] [--resume | --no-resume] [--quiet]

Model. --model_path (alias --model_name) is an HF folder (config.json + safetensors, converted in memory; fine for
small models: the whole model is loaded on one device before it is sharded) or a kimi_jax orbax folder
(`python -m convert.hf_to_orbax`, or a training checkpoint), restored straight into the mesh: use one for the 48B.
Its tokenizer files are used for the data and copied into every checkpoint. --trust_remote_code is accepted and
ignored (kimi_jax is its own implementation).

Stages. `vanilla` (default) trains the causal-LM cross-entropy with AdamW (`kimi_jax.training.vanilla`);
--train_groups restricts it to parameter groups (embeddings, lm_head, mixers, ffn, routers, norms; default all).
`recursive` (--use_recursive is the same) trains the recursive-refinement sidecar (RECURSIVE_DESIGN.md §3.9) with
the recursive config --recursive_config (a preset or JSON file; default the preset phase_{--phase}, --phase default
a), whose chunk_width / max_inner_steps --chunk_width / --max_inner_steps override. Phase a: sidecar only (base
frozen); b: + LoRA in the noisy stream; c: + the config's unfrozen blocks, with L2-SP. The flags of the other stage
are accepted and ignored with a one-line notice (the evaluation plan's vanilla command passes --phase a and
--chunk_width 128), except --train_groups with --stage recursive, which is an error.

Learning rates. Vanilla: --lr (default 1e-5), --weight_decay (default 0), --clip_norm (default 1; 0 = no clipping)
and --schedule (default cosine: linear warmup over --warmup_steps, cosine decay to 10% at --num_steps; linear:
warmup, then linear decay to 0). Recursive: the config's per-group learning rates (lr_sidecar, lr_heads, lora_lr,
lr_unfrozen) with warmup + cosine decay to 10%; --lr LR multiplies every group's rate by LR / lr_sidecar, so the
sidecar group trains at exactly LR and the groups keep the config's ratios. --weight_decay replaces the config's
weight_decay; --clip_norm must be > 0; --schedule linear and --grad_accum > 1 are errors (the recursive trainer has
neither). --warmup_steps defaults to min(100, num_steps // 10) (on resume: the checkpoint's). train/lr logs the
vanilla rate / the sidecar group's rate.

Data. --data (default demo: the built-in Shakespeare corpus, downloaded once, Python's own docs prose offline; local
.txt/.jsonl/.json/.parquet files, folders and globs; HF dataset names) is packed into rows of --seq_len tokens
(`kimi_jax.data`). --eval_data (default: the validation split of --data) is held-out data. A local file is validation
data when its name has a `validation`/`val`/`dev`/`eval`/`test` word; without such files a fixed 5% of the records (a
.txt file is one record, a .jsonl line one record) is held out, chosen by a hash of their index (at least one record,
never all), and a single text (e.g. `--data corpus.txt`) is split instead: its last 5% of characters, from a line
(else word) boundary, is validation. Train and validation never overlap. Held-out data is evaluated every
--eval_interval steps, at step 0 and at the end (0 = never): `evaluation/perplexity` (token-weighted exp of the mean
NLL over every held-out row, or the first --max_eval_batches batches; for the recursive stage the clean path, i.e.
the base with the phase-C blocks merged in) and `evaluation/token_accuracy`; for the recursive stage also
`evaluation/loss/total`, `evaluation/final_ce` and `evaluation/step_accuracy/k{1..K}` (the recursive objective with a
fixed RNG key and the end-of-training corruption rate, token-weighted over the batches; without the phase-C L2-SP
term).

Checkpoints (`kimi_jax.training.checkpoints`). Every --save_interval steps (0 = only at the end) and at the end,
`{output_dir}/step_N` is written asynchronously and renamed into place when complete; each is a complete model
folder (`python -m experiments.generate --model_path DIR/step_N` loads it, with its sidecar in the recursive stage)
plus the training state (train_state/: optimizer state, trainable tree, RNG key; train_state.json: step, data
iterator position, run settings); `{output_dir}/latest` names the newest. While the base is unchanged (recursive
phases a, b) params/ is hard-linked from the orbax model folder or the previous checkpoint instead of rewritten.
--max_to_keep keeps the newest N (0 = all, the default). --output_dir defaults to ./checkpoints/<basename of
--log_dir>, else ./checkpoints/<stage>_finetune (the evaluation plan's layout); neither it nor --log_dir may be or lie
inside --model_path (a model folder inside --output_dir, e.g. one of its checkpoints, is fine).

Resume. By default a run whose --output_dir holds a checkpoint continues from the newest one exactly (same data
order, RNG, optimizer state: the losses equal an uninterrupted run's); settings that change the trajectory must be
the same (an error names the first that differs; --num_steps may change, with a notice; the mesh and the number of
processes may change too). --no-resume starts from --model_path and, once the model is built, deletes the output
folder's checkpoints (step_N, latest) and metrics.jsonl; --resume requires a checkpoint. Nothing else deletes them:
an --output_dir holding an earlier run's outputs but no complete checkpoint (metrics.jsonl, TensorBoard files, a
step_N that is not a complete checkpoint) is an error without --no-resume, and a checkpoint is never replaced. A
killed run's logs past its last checkpoint are dropped (metrics.jsonl) or hidden (TensorBoard purge_step), so the
logs read as one run; its half-written `.step_N.tmp` folder is removed (with a notice).

One run per output folder: process 0 holds an exclusive lock on --output_dir ({output_dir}/.lock, "host H pid P")
from before it looks for a checkpoint until it exits; a second run with the same --output_dir is refused and names
the holder. A lock left by a process that no longer runs (a crash, SIGKILL) is reported and taken over.

Logs (process 0). A tqdm bar (step, loss, tokens/s, ETA); `{output_dir}/metrics.jsonl`, one JSON object per train
step (every metric of the step, lr, tokens/s = batch_size x seq_len / step time, memory) and per evaluation;
TensorBoard scalars under --log_dir (default {output_dir}/logs): train/loss/{total, final_ce, masked_ce, halt, ponder,
length, stability} (vanilla: its CE as total and final_ce; phase c adds l2sp), train/lr, train/grad_norm,
train/generation/{avg_refine_steps (the expected steps under the halting distribution), commit_rate,
avg_chunk_length}, train/performance/{tokens_per_sec, steps_per_sec, memory_mb (peak device memory where the
backend reports it, else host RSS)}, evaluation/... as above.

Multi-host: run the same command on every host (`kimi_jax.distributed`); each process loads its rows of every
batch, orbax writes each process's shards, process 0 writes the logs and JSON files. Set JAX_COMPILATION_CACHE_DIR
to reuse compiled programs across runs.

Exit status: 0 done; 1 a checkpoint or log could not be written (a full disk: one `error:` line naming the path;
the earlier checkpoints and `latest` stay intact and nothing partial is left); 2 bad flags, paths, configs, data,
damaged model or checkpoint files, a checkpoint that does not fit or an output folder in use (one `error:` line);
3 a non-finite loss or gradient norm (the step is named; nothing is saved for it, the previous checkpoints stay
intact); 130 / 143 after Ctrl-C / SIGTERM, once a checkpoint of the last finished step is written (a second Ctrl-C
aborts at once).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import time

from experiments.flags import add_kda_impl_flag

STAGES = ("vanilla", "recursive")
PHASES = ("a", "b", "c")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear")
DEFAULT_VANILLA_LR = 1e-5
EXIT_USAGE, EXIT_NONFINITE = 2, 3
# The settings that determine the trajectory: resuming with any of them changed would not continue the same run.
STRICT_RUN_FIELDS = ("stage", "phase", "dtype", "batch_size", "seq_len", "grad_accum", "seed", "lr", "warmup_steps",
                     "schedule", "weight_decay", "clip_norm", "train_groups", "chat", "data_fingerprint",
                     "recursive_config", "model_config")


class UsageError(Exception):
    """Bad flags, paths, configs or data: one `error:` line, exit status 2."""


class NonFiniteError(Exception):
    """A non-finite loss or gradient norm: the run stops without saving that state (exit status 3)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0],
                epilog="\n\n".join(__doc__.split("\n\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and stage")
    g.add_argument("--model_path",
                   help="HF folder (config.json + safetensors) or kimi_jax orbax folder, with its tokenizer "
                        "(required)")
    g.add_argument("--model_name", help="the same as --model_path (the evaluation plan's name)")
    g.add_argument("--stage", choices=STAGES, help="vanilla (default) or recursive")
    g.add_argument("--use_recursive", action="store_true", help="the same as --stage recursive")
    g.add_argument("--phase", choices=PHASES, help="recursive training phase (default a)")
    g.add_argument("--recursive_config", metavar="PRESET_OR_JSON",
                   help="recursive config: a preset (phase_a, phase_b, phase_c, ...) or JSON file; "
                        "default the preset phase_{--phase}")
    g.add_argument("--chunk_width", type=int, metavar="W",
                   help="recursive window width, a multiple of 64 (default: the recursive config's)")
    g.add_argument("--max_inner_steps", type=int, metavar="K",
                   help="recursive inner steps (default: the recursive config's)")
    g.add_argument("--train_groups", metavar="G1,G2",
                   help="vanilla: train only these parameter groups (embeddings, lm_head, mixers, ffn, routers, "
                        "norms); default all")
    g.add_argument("--dtype", choices=DTYPES,
                   help="parameter dtype (default: the stored one for orbax folders, float32 for HF folders)")
    g.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                   help="rematerialise each layer cycle in the backward pass (default on)")
    g.add_argument("--unroll_layers", action="store_true",
                   help="unroll the scans over layers (faster steps for small models; compile time grows with depth)")
    add_kda_impl_flag(g)
    g.add_argument("--mesh", help="mesh spec, e.g. data=2,fsdp=-1 (default: fsdp over every device)")
    g.add_argument("--trust_remote_code", action="store_true", help="accepted and ignored")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="demo",
                   help="training data: demo, a .txt/.jsonl/.json/.parquet file, folder or glob, or an HF dataset "
                        "name; its train split (see Data. below; default demo)")
    d.add_argument("--eval_data",
                   help="held-out data, a spec like --data; its validation split: validation-named files, else 5%% "
                        "of the records, or the last 5%% of a single text (default: the validation split of --data)")
    d.add_argument("--chat", action="store_true", help="render prompt/response records with the chat template")
    d.add_argument("--seq_len", type=int, default=2048, metavar="T", help="tokens per row (default 2048)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=4, metavar="B", help="global batch in rows (default 4)")
    o.add_argument("--grad_accum", type=int, default=1, metavar="G",
                   help="micro-batches per step (vanilla; B must divide by G x processes; default 1)")
    o.add_argument("--num_steps", type=int, default=1000, metavar="N", help="optimizer steps (default 1000)")
    o.add_argument("--lr", type=float, metavar="LR",
                   help=f"peak learning rate (vanilla default {DEFAULT_VANILLA_LR:g}; recursive: the sidecar "
                        f"group's, the other groups keep the config's ratios; default the config's lr_sidecar; see "
                        f"Learning rates below)")
    o.add_argument("--warmup_steps", type=int, metavar="S",
                   help="linear warmup (default min(100, num_steps // 10); on resume the checkpoint's)")
    o.add_argument("--schedule", choices=SCHEDULES, help="decay after warmup (default cosine)")
    o.add_argument("--weight_decay", type=float, metavar="WD",
                   help="AdamW weight decay (vanilla default 0; recursive default the config's weight_decay)")
    o.add_argument("--clip_norm", type=float, default=1.0, metavar="C", help="global-norm clip (default 1)")
    o.add_argument("--seed", type=int, default=0, help="data order and recursive RNG (default 0)")
    r = p.add_argument_group("outputs")
    r.add_argument("--output_dir",
                   help="checkpoints and metrics.jsonl (default ./checkpoints/<basename of --log_dir>, else "
                        "./checkpoints/<stage>_finetune)")
    r.add_argument("--log_dir", help="TensorBoard logs (default {output_dir}/logs)")
    r.add_argument("--eval_interval", type=int, default=1000, metavar="N",
                   help="evaluate every N steps, at step 0 and at the end (0 = never; default 1000)")
    r.add_argument("--max_eval_batches", type=int, metavar="N", help="evaluate at most N batches (default all)")
    r.add_argument("--save_interval", type=int, default=5000, metavar="N",
                   help="checkpoint every N steps and at the end (0 = only at the end; default 5000)")
    r.add_argument("--max_to_keep", type=int, default=0, metavar="N",
                   help="keep the newest N checkpoints (0 = all; default 0)")
    r.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from --output_dir's newest checkpoint (default: when there is one)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or start/end summaries")
    return p


# ------------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass
class Settings:
    """The flags after defaults, aliases and consistency checks (no JAX needed)."""
    args: argparse.Namespace
    stage: str  # "vanilla" | "recursive"
    model_path: str  # absolute
    output_dir: str  # absolute
    log_dir: str  # absolute
    warmup_steps: int
    schedule: str
    notices: list[str]  # printed by process 0 once JAX's distributed runtime is up


def resolve_settings(args) -> Settings:
    notices: list[str] = []
    if args.use_recursive and args.stage == "vanilla":
        raise UsageError("--use_recursive contradicts --stage vanilla")
    stage = "recursive" if args.use_recursive else (args.stage or "vanilla")
    paths = [p for p in (args.model_path, args.model_name) if p is not None]
    if not paths:
        raise UsageError("--model_path (or --model_name) is required")
    if len(paths) == 2 and os.path.abspath(paths[0]) != os.path.abspath(paths[1]):
        raise UsageError(f"--model_path {paths[0]} and --model_name {paths[1]} name different folders")
    model_path = paths[0]
    if not os.path.isdir(model_path):
        hint = (" (hub names are not downloaded here: fetch it first, e.g. `huggingface-cli download "
                f"{model_path} --local-dir DIR`)") if model_path.count("/") == 1 and not os.path.exists(
            os.path.dirname(model_path)) else ""
        raise UsageError(f"--model_path {model_path}: no such folder{hint}")

    def at_least(name: str, value, lo):
        if value is not None and value < lo:
            raise UsageError(f"--{name} must be >= {lo}, got {value}")

    for name, lo in (("batch_size", 1), ("num_steps", 1), ("seq_len", 2), ("grad_accum", 1), ("warmup_steps", 0),
                     ("eval_interval", 0), ("save_interval", 0), ("max_to_keep", 0), ("max_eval_batches", 1),
                     ("seed", 0)):
        at_least(name, getattr(args, name), lo)
    for name in ("lr", "weight_decay", "clip_norm"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (name == "lr" and value == 0)):
            raise UsageError(f"--{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value}")
    if args.batch_size % args.grad_accum:
        raise UsageError(f"--batch_size {args.batch_size} is not divisible by --grad_accum {args.grad_accum}")
    if args.warmup_steps is not None and args.warmup_steps > args.num_steps:
        raise UsageError(f"--warmup_steps {args.warmup_steps} exceeds --num_steps {args.num_steps}")
    if stage == "vanilla":
        ignored = [f"--{n}" for n in ("phase", "recursive_config", "chunk_width", "max_inner_steps")
                   if getattr(args, n) is not None]
        if ignored:
            notices.append(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored in the vanilla stage "
                           f"(pass --use_recursive or --stage recursive to train the recursive sidecar)")
    else:
        if args.train_groups is not None:
            raise UsageError("--train_groups applies to the vanilla stage; the recursive stage trains what --phase "
                             "and the recursive config select")
        if args.schedule == "linear":
            raise UsageError("--schedule linear: the recursive stage's optimizer uses warmup + cosine decay "
                             "(RECURSIVE_DESIGN.md §3.9); leave --schedule out")
        if args.grad_accum > 1:
            raise UsageError("--grad_accum > 1 is not supported by the recursive trainer (it has no micro-batch "
                             "accumulation); lower --batch_size instead")
        if args.clip_norm == 0:
            raise UsageError("--clip_norm 0: the recursive optimizer always clips; give a positive norm")
    if args.trust_remote_code:
        notices.append("--trust_remote_code is ignored: kimi_jax implements Kimi-Linear itself")
    if args.output_dir is not None:
        output_dir = os.path.abspath(args.output_dir)
    else:  # the evaluation plan's layout: --log_dir ./logs/X trains into ./checkpoints/X
        name = os.path.basename(os.path.normpath(args.log_dir)) if args.log_dir else f"{stage}_finetune"
        output_dir = os.path.abspath(os.path.join("checkpoints", name))
        notices.append(f"--output_dir defaults to {output_dir}")
    log_dir = os.path.abspath(args.log_dir) if args.log_dir else os.path.join(output_dir, "logs")
    from kimi_jax.safe_io import check_writable_location

    for flag, folder in (("--output_dir", output_dir), ("--log_dir", log_dir)):
        refuse_inside_model(flag, folder, model_path)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder} exists and is not a folder")
        check_writable_location(folder, flag, UsageError)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, args.num_steps // 10)
    return Settings(args=args, stage=stage, model_path=os.path.abspath(model_path), output_dir=output_dir,
                    log_dir=log_dir, warmup_steps=warmup, schedule=args.schedule or "cosine", notices=notices)


def refuse_inside_model(flag: str, folder: str, model_path: str) -> None:
    """An output that is or lies inside the model folder would write into the user's model (and --no-resume delete
    from it): refused. The reverse, the model inside the output folder (--model_path one of the run's own
    checkpoints), is how runs continue, and stays allowed."""
    from kimi_jax.safe_io import refuse_overlap

    out, model = os.path.realpath(folder), os.path.realpath(model_path)
    if not model.startswith(out.rstrip(os.sep) + os.sep):
        refuse_overlap(folder, flag, {"--model_path": model_path}, error=UsageError)


# -------------------------------------------------------------------------------------------------- the run
class Run:
    """One training run; `execute()` returns the exit status."""

    def __init__(self, s: Settings):
        self.s = s
        self.args = s.args
        self.stop_signal: int | None = None

    # ----------------------------------------------------------------------------------------- messages
    def notice(self, message: str) -> None:
        if self.main:
            print(f"notice: {message}", file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        if self.main and not self.args.quiet:
            print(message, flush=True)

    # ----------------------------------------------------------------------------------------- set-up
    def execute(self) -> int:
        s, args = self.s, self.args
        import jax

        from kimi_jax import distributed

        distributed.maybe_initialize()
        self.main = jax.process_index() == 0
        for message in s.notices:
            self.notice(message)
        self.process_count = jax.process_count()
        if args.batch_size % (args.grad_accum * self.process_count):
            raise UsageError(f"--batch_size {args.batch_size} is not divisible by --grad_accum {args.grad_accum} x "
                             f"{self.process_count} processes")
        self.micro_batch = args.batch_size // args.grad_accum
        self._load_config_and_tokenizer()
        self._build_data()
        self._lock_output_dir()
        try:
            self._decide_resume()
            self._build_model_and_trainer()
            self._build_eval()
            return self._train()
        finally:
            self._unlock_output_dir()

    def _lock_output_dir(self) -> None:
        """Process 0 locks --output_dir before anything in it is read for the resume decision or changed, for the
        rest of the run (one run per output folder; see the module docstring). Every process stops when it fails."""
        from kimi_jax.safe_io import FolderLock, describe_write_error
        from kimi_jax.training import checkpoints as ck

        out = self.s.output_dir
        self.lock, failure = None, None
        if self.main:
            self.created_output_dir = not os.path.exists(out)
            try:
                self.lock = FolderLock(out, flag="--output_dir", error=UsageError, notice=self.notice).acquire()
            except UsageError as e:
                failure = e
            except OSError as e:  # creating the folder or the lock file: a full disk, permissions
                failure = ck.TrainWriteError(f"--output_dir {out}: cannot lock it "
                                             f"({describe_write_error(e, os.path.join(out, FolderLock.NAME))})")
        if not ck.broadcast_from_main(int(failure is None)):
            raise failure or UsageError(f"--output_dir {out}: process 0 could not lock it")

    def _unlock_output_dir(self) -> None:
        """Release the lock; a folder this run created and left empty (it failed before writing anything) is
        removed again. The lock file is unlinked while still held, so no other run can take it in between."""
        if self.lock is None:
            return
        out, lock = self.s.output_dir, self.lock
        self.lock = None
        try:
            if self.created_output_dir and os.listdir(out) == [os.path.basename(lock.path)]:
                os.unlink(lock.path)
                lock.release()
                os.rmdir(out)
        except OSError:
            pass
        finally:
            lock.release()

    def _load_config_and_tokenizer(self) -> None:
        s, args = self.s, self.args
        from kimi_jax import orbax_model as ckpt_lib
        from kimi_jax import tokenizer as tokenizer_mod
        from kimi_jax.config import KimiLinearConfig
        from kimi_jax.recursive import io

        self.format = io.model_format(s.model_path)
        self.cfg = KimiLinearConfig.from_pretrained(s.model_path)
        self._check_model_files()
        self.tok = tokenizer_mod.load(s.model_path)
        if self.tok.vocab_size > self.cfg.vocab_size:
            raise UsageError(f"--model_path {s.model_path}: the tokenizer has {self.tok.vocab_size} tokens but "
                             f"config.json's vocab_size is {self.cfg.vocab_size}")
        stored = ckpt_lib.read_meta(s.model_path).get("dtype", "float32") if self.format == "orbax" else "float32"
        self.stored_dtype = str(stored)
        self.dtype_name = args.dtype or self.stored_dtype
        if self.dtype_name not in DTYPES:
            raise UsageError(f"--model_path {s.model_path}: stored dtype {self.dtype_name!r}; pass --dtype")
        self.rcfg = None
        self.train_groups = None
        if s.stage == "recursive":
            self._resolve_recursive_config()
        elif args.train_groups is not None:
            from kimi_jax.training.vanilla import PARAM_GROUPS

            names = [n.strip() for n in args.train_groups.split(",") if n.strip()]
            unknown = [n for n in names if n not in PARAM_GROUPS]
            if names != ["all"] and (unknown or not names):
                what = f"unknown group {unknown[0]!r}" if unknown else "no group named"
                raise UsageError(f"--train_groups {args.train_groups!r}: {what}; choose from "
                                 f"{', '.join(PARAM_GROUPS)} (comma-separated) or all")
            if names != ["all"]:
                self.train_groups = tuple(dict.fromkeys(names))
        self.model_files = None  # read lazily on process 0

    def _check_model_files(self) -> None:
        """Damaged or mismatched weights are refused before the data is loaded, from headers and metadata alone:
        an HF folder's safetensors (every tensor's name, shape, dtype and extent against config.json, every shard
        present), an orbax folder's array metadata (readable, every parameter with its shape). What only reading
        the arrays shows (a truncated or corrupt orbax data file) is caught where they are read."""
        path = self.s.model_path
        if self.format == "hf":
            from kimi_jax.hf.safetensors_io import SafetensorsReader
            from kimi_jax.hf.loading import validate_checkpoint

            validate_checkpoint(self.cfg, SafetensorsReader(path), path)
        else:
            from kimi_jax.orbax_model import check_stored_params

            check_stored_params(path, self.cfg)

    def _resolve_recursive_config(self) -> None:
        args = self.args
        from kimi_jax.recursive.config import RecursiveConfigError, resolve
        from kimi_jax.recursive.objective import num_windows

        spec = args.recursive_config or f"phase_{args.phase or 'a'}"
        rcfg = resolve(spec)
        phase = args.phase or rcfg.phase or "a"
        if args.phase is not None and rcfg.phase is not None and rcfg.phase != args.phase:
            raise UsageError(f"--phase {args.phase} contradicts the recursive config {spec} (phase {rcfg.phase!r})")
        if not rcfg.recursive_enabled:
            self.notice(f"the recursive config {spec} has recursive_enabled false; training turns it on")
        changes = {"recursive_enabled": True, "phase": phase}
        if args.chunk_width is not None:
            changes["chunk_width"] = args.chunk_width
        if args.max_inner_steps is not None:
            changes["max_inner_steps"] = args.max_inner_steps
        if args.weight_decay is not None:
            changes["weight_decay"] = args.weight_decay
        try:
            rcfg = rcfg.replace(**changes)
        except RecursiveConfigError as e:
            flags = ", ".join(f"--{k} {v}" for k, v in changes.items() if k not in ("recursive_enabled", "phase"))
            raise UsageError(f"{flags + ' with ' if flags else ''}{e}") from None
        cfg = self.cfg
        rcfg.refined_layers(cfg.num_hidden_layers)
        if rcfg.uses_lora:
            rcfg.lora_layer_indices(cfg.num_hidden_layers)
        if phase == "c" and not rcfg.unfrozen_layer_indices(cfg.mixer_types):
            raise UsageError(f"recursive phase c: unfreeze_layers {_short(rcfg.to_dict()['unfreeze_layers'])} selects "
                             f"no layer of this {cfg.num_hidden_layers}-layer model; set unfreeze_layers in the "
                             f"recursive config (a list of layer indices, every_4th or mla)")
        if rcfg.chunk_width % cfg.kda_chunk_size:
            raise UsageError(f"--chunk_width {rcfg.chunk_width} is not a multiple of the model's KDA chunk size "
                             f"{cfg.kda_chunk_size}")
        try:
            self.windows = num_windows(args.seq_len, rcfg.chunk_width, cfg.kda_chunk_size)
        except ValueError:
            need = 2 * rcfg.chunk_width - cfg.kda_chunk_size + 1
            raise UsageError(f"--seq_len {args.seq_len} is too short for one recursive window of chunk_width "
                             f"{rcfg.chunk_width} (every window offset must fit: need --seq_len >= {need})") from None
        self.rcfg = rcfg
        self.phase = phase
        self.lr_scale = 1.0 if args.lr is None else args.lr / rcfg.lr_sidecar

    def _build_data(self) -> None:
        args = self.args
        import jax

        from kimi_jax.data import BatchIterator, PackedDataset, load_documents

        show = self.main and not args.quiet
        records = load_documents(args.data, split="train", progress=show)
        self.train_ds = PackedDataset(self.tok, records, args.seq_len, chat=args.chat, progress=show)
        self.iterator = BatchIterator(self.train_ds, args.batch_size, seed=args.seed,
                                      process_index=jax.process_index(), process_count=self.process_count)
        self.eval_ds = None
        if args.eval_interval > 0:
            from kimi_jax.data import DataError

            eval_spec = args.eval_data or args.data
            try:
                eval_records = load_documents(eval_spec, split="validation", progress=show)
                self.eval_ds = PackedDataset(self.tok, eval_records, args.seq_len, chat=args.chat, progress=show)
            except DataError as e:
                raise UsageError(f"held-out data: {e} (pass --eval_data SPEC, or --eval_interval 0 to train without "
                                 f"evaluation)") from None

    def _run_info(self) -> dict:
        s, args = self.s, self.args
        return {"stage": s.stage, "phase": getattr(self, "phase", None), "dtype": self.dtype_name,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
                "seed": args.seed, "lr": self.effective_lr(), "warmup_steps": s.warmup_steps,
                "schedule": s.schedule if s.stage == "vanilla" else "cosine",
                "weight_decay": (args.weight_decay or 0.0) if s.stage == "vanilla" else self.rcfg.weight_decay,
                "clip_norm": args.clip_norm, "chat": args.chat,
                "train_groups": None if self.train_groups is None else list(self.train_groups),
                "data": args.data, "data_fingerprint": self.train_ds.fingerprint,
                "eval_data": args.eval_data or args.data,
                "eval_fingerprint": None if self.eval_ds is None else self.eval_ds.fingerprint,
                "recursive_config": None if self.rcfg is None else self.rcfg.to_dict(),
                "model_config": self.cfg.to_hf_dict(), "model_path": s.model_path, "num_steps": args.num_steps}

    def effective_lr(self):
        if self.s.stage == "vanilla":
            return self.args.lr if self.args.lr is not None else DEFAULT_VANILLA_LR
        return {"lr_scale": self.lr_scale, "lr_sidecar": self.rcfg.lr_sidecar * self.lr_scale}

    def _decide_resume(self) -> None:
        s, args = self.s, self.args
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import METRICS_FILE

        self.run_info = self._run_info()
        latest = ck.latest_checkpoint(s.output_dir)
        resume = args.resume if args.resume is not None else latest is not None
        self.resume_from = None
        outputs, events = ck.run_outputs(s.output_dir, extra_files=(METRICS_FILE,)), self._event_files()
        if args.resume is None and latest is None and (outputs or events):  # deleted only when --no-resume asks
            what = [f"it deletes {_listing(outputs)}"] if outputs else []
            what += ["TensorBoard hides the earlier events"] if events else []
            raise UsageError(f"--output_dir {s.output_dir} holds an earlier run's outputs "
                             f"({_listing(outputs + events)}) but no complete checkpoint to resume from; pass "
                             f"--no-resume to start over ({'; '.join(what)}) or choose another --output_dir")
        # --no-resume over an earlier run: its checkpoints and metrics are deleted once the model is built (so a
        # run that fails to start leaves them alone).
        self.clear_outputs = not resume and bool(outputs)
        if args.resume and latest is None:
            raise UsageError(f"--resume: {s.output_dir} holds no complete checkpoint")
        inside = os.path.realpath(s.model_path).startswith(os.path.realpath(s.output_dir) + os.sep)
        if self.clear_outputs and inside:
            raise UsageError(f"--no-resume would delete the checkpoints of {s.output_dir}, and --model_path "
                             f"{s.model_path} is one of them; train into another --output_dir")
        if not resume:
            return
        step, folder = latest
        self._refuse_later_step_folders(step)
        with self._reading_resume_checkpoint(folder):
            state = ck.read_train_state(folder)
        saved = state["run"]
        if args.warmup_steps is None and isinstance(saved.get("warmup_steps"), int):
            # The default warmup depends on --num_steps: keep the saved run's when --num_steps is extended.
            s.warmup_steps = saved["warmup_steps"]
            self.run_info["warmup_steps"] = s.warmup_steps
        for field in STRICT_RUN_FIELDS:
            if saved.get(field) != self.run_info[field]:
                raise UsageError(f"--output_dir {s.output_dir} holds a checkpoint of a run with other settings "
                                 f"({field}: {_short(saved.get(field))} there, {_short(self.run_info[field])} now); "
                                 f"resume with the same settings, pass --no-resume to start over, or use another "
                                 f"--output_dir")
        if saved.get("num_steps") != args.num_steps:
            self.notice(f"--num_steps {args.num_steps} differs from the checkpoint's run ({saved.get('num_steps')}): "
                        f"the learning-rate schedule is recomputed for the new total")
        if saved.get("model_path") != s.model_path:
            self.notice(f"resuming a run started from {saved.get('model_path')} with --model_path {s.model_path} "
                        f"(same config.json)")
        if step > args.num_steps:
            raise UsageError(f"--num_steps {args.num_steps}: the checkpoint in {s.output_dir} is already at step "
                             f"{step}")
        self.iterator.restore(state["data_state"])
        self.resume_from = (step, folder, state)

    def _event_files(self) -> list[str]:
        """TensorBoard files an earlier run left in --log_dir (as paths relative to --output_dir where inside)."""
        import glob

        s = self.s
        found = sorted(glob.glob(os.path.join(s.log_dir, "events.out.tfevents.*")))
        return [os.path.relpath(p, s.output_dir) if p.startswith(s.output_dir + os.sep) else p for p in found]

    def _refuse_later_step_folders(self, step: int) -> None:
        """A `step_M` after the checkpoint this run resumes from is not a complete checkpoint (or it would be the
        newest); this run would have to write step_M again, and a checkpoint is never replaced: refused now rather
        than when step M is saved (e.g. a model folder kept from a checkpoint whose train_state was deleted)."""
        from kimi_jax.training import checkpoints as ck

        later = []
        for name in os.listdir(self.s.output_dir):
            match = re.fullmatch(ck.STEP_PREFIX + r"(\d+)", name)
            if match and step < int(match.group(1)) <= self.args.num_steps:
                later.append((int(match.group(1)), name))
        if later:
            name = min(later)[1]
            raise UsageError(f"--output_dir {self.s.output_dir} holds {name}, which is not a complete checkpoint, "
                             f"after step_{step}, the checkpoint this run resumes from; training would write {name} "
                             f"again: move it away, or pass --no-resume to start over")

    @contextlib.contextmanager
    def _reading_resume_checkpoint(self, folder: str):
        """A damaged checkpoint to resume from: one line naming the file or array, and what the user can do."""
        from kimi_jax.orbax_model import CheckpointFormatError
        from kimi_jax.training.checkpoints import TrainCheckpointError

        try:
            yield
        except (CheckpointFormatError, TrainCheckpointError) as e:
            raise TrainCheckpointError(f"cannot resume from {folder}: {e}; move it out of --output_dir to resume from "
                                       f"the checkpoint before it, or pass --no-resume to start over") from None

    # ----------------------------------------------------------------------------------------- model
    def _build_model_and_trainer(self) -> None:
        s, args = self.s, self.args
        import jax
        import jax.numpy as jnp
        import numpy as np

        from kimi_jax import sharding
        from kimi_jax.model import RunOptions
        from kimi_jax.training import checkpoints as ck

        self.mesh = sharding.make_mesh(args.mesh)
        self.opts = RunOptions(remat=args.remat, unroll_layers=args.unroll_layers, kda_impl=args.kda_impl)
        self.dtype = jnp.dtype(self.dtype_name)
        self.root_key = np.asarray(jax.random.PRNGKey(args.seed), np.uint32)
        if self.resume_from is not None:
            folder = self.resume_from[1]
            targets = {"rng": jax.ShapeDtypeStruct(self.root_key.shape, self.root_key.dtype)}
            with self._reading_resume_checkpoint(folder):
                stored = ck.restore_arrays(os.path.join(folder, ck.TRAIN_STATE_DIR), targets)
            self.root_key = np.asarray(stored["rng"], np.uint32)
        train_key, eval_key = jax.random.split(jnp.asarray(self.root_key))
        self.train_key, self.eval_key = np.asarray(train_key), np.asarray(eval_key)
        if s.stage == "vanilla":
            self._build_vanilla()
        else:
            self._build_recursive()
        self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.model_param_tree())))
        check_process_rows(self.trainer.batch_sharding, args.batch_size, args.seq_len, "--batch_size")

    def _load_model(self, folder: str, fmt: str):
        from kimi_jax.orbax_model import load_model
        from kimi_jax.hf.loading import from_pretrained

        if fmt == "orbax":
            return load_model(folder, self.dtype, mesh=self.mesh)
        return from_pretrained(folder, self.dtype)

    def _build_vanilla(self) -> None:
        args = self.args
        import jax
        from flax import nnx

        from kimi_jax.model import KimiLinearForCausalLM
        from kimi_jax.training.vanilla import build_trainer, make_optimizer
        from kimi_jax.training import checkpoints as ck

        tx = make_optimizer(self.effective_lr(), warmup_steps=self.s.warmup_steps, total_steps=args.num_steps,
                            weight_decay=args.weight_decay or 0.0, clip_norm=args.clip_norm or None,
                            schedule=self.s.schedule)
        kwargs = dict(opts=self.opts, grad_accum=args.grad_accum, trainable_groups=self.train_groups)
        if self.resume_from is None:
            model = self._load_model(self.s.model_path, self.format)
            self.trainer, self.params, self.opt_state = build_trainer(model, tx, self.mesh, args.batch_size, **kwargs)
            return
        _, folder, _ = self.resume_from
        cfg, dtype = self.cfg, self.dtype
        abstract = nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
        self.trainer, _, abstract_opt = build_trainer(abstract, tx, self.mesh, args.batch_size, **kwargs)
        with self._reading_resume_checkpoint(folder):
            model = self._load_model(folder, "orbax")
            self.params = jax.device_put(nnx.split(model)[1], self.trainer.param_shardings)
            del model
            flat = ck.restore_arrays(os.path.join(folder, ck.TRAIN_STATE_DIR), ck.flatten(abstract_opt, "opt."))
        self.opt_state = ck.unflatten(abstract_opt, flat, "opt.")

    def _build_recursive(self) -> None:
        args = self.args
        from kimi_jax.recursive.sidecar import build_sidecar
        from kimi_jax.training.recursive import build_recursive_trainer, make_recursive_optimizer
        from kimi_jax.training import checkpoints as ck

        tx = make_recursive_optimizer(self.rcfg, warmup_steps=self.s.warmup_steps, total_steps=args.num_steps,
                                      clip_norm=args.clip_norm, lr_scale=self.lr_scale)
        model = self._load_model(self.s.model_path, self.format)
        sidecar = build_sidecar(self.cfg, self.rcfg)
        self.trainer, self.base, self.trainable, self.opt_state = build_recursive_trainer(
            model, sidecar, self.rcfg, tx, self.mesh, args.batch_size, opts=self.opts)
        del model, sidecar
        if self.resume_from is not None:
            _, folder, _ = self.resume_from
            targets_tr, targets_opt = ck.abstract_of(self.trainable), ck.abstract_of(self.opt_state)
            del self.trainable, self.opt_state
            with self._reading_resume_checkpoint(folder):
                flat = ck.restore_arrays(os.path.join(folder, ck.TRAIN_STATE_DIR),
                                         {**ck.flatten(targets_tr, "trainable."), **ck.flatten(targets_opt, "opt.")})
            self.trainable = ck.unflatten(targets_tr, flat, "trainable.")
            self.opt_state = ck.unflatten(targets_opt, flat, "opt.")
        # params/ is hard-linked instead of rewritten while the base is untouched (phases a and b): from the source
        # orbax folder when its stored dtype is the training dtype, else from this run's newest checkpoint (or the
        # one it resumed from), see save().
        self.base_unchanged = self.phase in ("a", "b")
        self.link_source = (self.s.model_path if self.base_unchanged and self.format == "orbax"
                            and self.stored_dtype == self.dtype_name else None)

    def model_param_tree(self):
        if self.s.stage == "vanilla":
            return self.params
        return self.base

    def materialize(self):
        """The current (model, sidecar or None) as nnx modules."""
        from flax import nnx

        if self.s.stage == "vanilla":
            return nnx.merge(self.trainer.graphdef, self.params), None
        return self.trainer.materialize(self.trainable, self.base)

    # ----------------------------------------------------------------------------------------- evaluation
    def _build_eval(self) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P

        from kimi_jax.training.vanilla import batch_spec, cross_entropy

        if self.eval_ds is None:
            return
        mesh = self.mesh
        replicated = NamedSharding(mesh, P())
        self.eval_sharding = batch_spec(mesh, self.micro_batch)
        check_process_rows(self.eval_sharding, self.micro_batch, self.args.seq_len, "--batch_size / --grad_accum")
        opts = dataclasses.replace(self.opts, remat=False,
                                   activation_sharding=NamedSharding(mesh, P(self.eval_sharding.spec[0], None, None)))

        def lm_stats(model, batch):
            logits = model(batch["input_ids"], opts=opts)
            nll, count = cross_entropy(logits, batch["targets"], batch["weights"])
            correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * batch["weights"])
            return {"nll": nll, "tokens": count, "correct": correct}

        if self.s.stage == "vanilla":
            graphdef = self.trainer.graphdef
            self.eval_fn = jax.jit(lambda params, batch: lm_stats(nnx.merge(graphdef, params), batch),
                                   out_shardings=replicated)
            return
        from kimi_jax.recursive.objective import recursive_objective

        trainer, rcfg = self.trainer, self.rcfg
        eos = tuple(self.cfg.eos_token_ids)

        def rec_stats(trainable, base, batch, key):
            model, sidecar = trainer.materialize(trainable, base)
            rec_batch = {"input_ids": batch["input_ids"], "weights": batch["weights"]}
            _, aux = recursive_objective(model, sidecar, rcfg, rec_batch, key, progress=1.0, opts=opts, eos_ids=eos)
            out = lm_stats(model, batch)
            out.update(rec_tokens=aux["stats"]["tokens"].astype(jnp.float32), total=aux["loss"]["total"],
                       final_ce=aux["loss"]["final_ce"], step_accuracy=aux["stats"]["step_accuracy"])
            return out

        self.eval_fn = jax.jit(rec_stats, out_shardings=replicated)

    def evaluate(self, step: int) -> dict:
        import itertools

        import jax
        import numpy as np
        from tqdm.auto import tqdm

        from kimi_jax import distributed
        from kimi_jax.data import eval_batches, num_eval_batches

        args = self.args
        total = num_eval_batches(self.eval_ds, self.micro_batch)
        if args.max_eval_batches:
            total = min(total, args.max_eval_batches)
        batches = itertools.islice(eval_batches(self.eval_ds, self.micro_batch, process_index=jax.process_index(),
                                                process_count=self.process_count), total)
        sums = {"nll": 0.0, "tokens": 0.0, "correct": 0.0, "rec_tokens": 0.0, "total": 0.0, "final_ce": 0.0}
        step_acc = None
        bar = tqdm(batches, total=total, desc=f"eval @ {step}", leave=False, unit="batch", dynamic_ncols=True,
                   disable=not self.main or args.quiet)
        for i, local in enumerate(bar):
            batch = distributed.global_batch(local, self.eval_sharding)
            if self.s.stage == "vanilla":
                out = jax.device_get(self.eval_fn(self.params, batch))
            else:
                key = np.asarray(jax.random.fold_in(self.eval_key, i))
                out = jax.device_get(self.eval_fn(self.trainable, self.base, batch, key))
                w = float(out["rec_tokens"])
                sums["rec_tokens"] += w
                sums["total"] += float(out["total"]) * w
                sums["final_ce"] += float(out["final_ce"]) * w
                acc = np.asarray(out["step_accuracy"], np.float64) * w
                step_acc = acc if step_acc is None else step_acc + acc
            for k in ("nll", "tokens", "correct"):
                sums[k] += float(out[k])
        tokens = max(sums["tokens"], 1.0)
        nll = sums["nll"] / tokens
        result = {"type": "eval", "step": step, "nll": nll, "perplexity": math.exp(min(nll, 700.0)),
                  "token_accuracy": sums["correct"] / tokens, "tokens": int(sums["tokens"]), "batches": total}
        if self.s.stage == "recursive":
            w = max(sums["rec_tokens"], 1.0)
            result.update({"loss/total": sums["total"] / w, "final_ce": sums["final_ce"] / w,
                           "step_accuracy": (step_acc / w).tolist() if step_acc is not None else [],
                           "recursive_tokens": int(sums["rec_tokens"])})
        return result

    def log_eval(self, result: dict) -> None:
        tags = {"evaluation/perplexity": result["perplexity"], "evaluation/token_accuracy": result["token_accuracy"]}
        if self.s.stage == "recursive":
            tags["evaluation/loss/total"] = result["loss/total"]
            tags["evaluation/final_ce"] = result["final_ce"]
            for k, acc in enumerate(result["step_accuracy"], 1):
                tags[f"evaluation/step_accuracy/k{k}"] = acc
        self.log.scalars(tags, result["step"])
        self.log.record(dict(result, time=time.time()))
        self.last_eval = result

    # ----------------------------------------------------------------------------------------- checkpoints
    def save(self, step: int, last_record: dict | None) -> None:
        import jax

        from kimi_jax.orbax_model import model_param_arrays
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import to_python

        self.writer.wait()  # the previous save is finished (and its folder usable as a link source)
        self.log.flush()  # the logs up to this step are on disk before the checkpoint can appear
        model, sidecar = self.materialize()
        state_arrays = {**ck.flatten(self.opt_state, "opt."), "rng": self.root_key}
        link = None
        if self.s.stage == "recursive":
            state_arrays.update(ck.flatten(self.trainable, "trainable."))
            if self.base_unchanged:
                link = self.link_source or self.writer.last_params_folder
        meta = {"dtype": self.dtype_name, "num_params": self.num_params, "source": self.s.model_path,
                "training": {"stage": self.s.stage, "phase": getattr(self, "phase", None), "step": step,
                             "num_steps": self.args.num_steps, "output_dir": self.s.output_dir}}
        state_json = {"data_state": self.iterator.state(), "run": self.run_info,
                      "metrics": to_python(last_record) if last_record else None,
                      "mesh": {k: int(v) for k, v in self.mesh.shape.items()}, "devices": jax.device_count(),
                      "processes": self.process_count}
        self.writer.save(step, config=self.cfg.to_hf_dict(), meta=meta, params=model_param_arrays(model),
                         state_arrays=state_arrays, state_json=state_json, sidecar=sidecar, rcfg=self.rcfg,
                         link_params_from=link)
        self.saved_step = step

    # ----------------------------------------------------------------------------------------- loop
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.main:
                name = signal.Signals(signum).name
                print(f"\nnotice: {name}: stopping after this step and saving a checkpoint (Ctrl-C again aborts "
                      f"at once)", file=sys.stderr, flush=True)

        import threading

        if threading.current_thread() is not threading.main_thread():  # signal handlers need the main thread
            self._previous_handlers = {}
            return
        self._previous_handlers = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self) -> None:
        for sig, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, previous)

    def _stop_requested(self) -> bool:
        if self.process_count == 1:
            return self.stop_signal is not None
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.stop_signal or 0))
        hits = [int(f) for f in np.asarray(flags).reshape(-1) if int(f)]
        if hits and self.stop_signal is None:
            self.stop_signal = hits[0]
        return bool(hits)

    def _train(self) -> int:
        s, args = self.s, self.args
        import jax

        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import MetricsLog

        start = 0 if self.resume_from is None else self.resume_from[0]
        if self.main:
            self._prepare_output_dir(start)
            self.model_files = ck.read_model_files(s.model_path)
        _sync("kimi_jax_train_outputs_ready")
        self.writer = ck.CheckpointWriter(s.output_dir, max_to_keep=args.max_to_keep,
                                          model_files=self.model_files or {}, protect=(s.model_path,))
        if self.resume_from is not None and s.stage == "recursive" and self.base_unchanged:
            self.writer.last_params_folder = self.resume_from[1]  # same base: its params/ may be linked
        self.log = None
        self.saved_step = start
        self.last_eval = None
        B, T = args.batch_size, args.seq_len
        mesh_desc = ",".join(f"{k}={v}" for k, v in self.mesh.shape.items() if v > 1) or "single device"
        what = "vanilla" if s.stage == "vanilla" else f"recursive phase {self.phase} (W {self.rcfg.chunk_width}, " \
                                                      f"K {self.rcfg.max_inner_steps}, {self.windows} windows/row)"
        self.say(f"train: {what}; model {s.model_path} ({self.format}, {self.dtype_name}, {self.num_params:,} params); "
                 f"data {args.data}: {len(self.train_ds)} rows x {T} tokens"
                 + (f", eval {len(self.eval_ds)} rows" if self.eval_ds is not None else "")
                 + f"; batch {B}{' in ' + str(args.grad_accum) + ' micro-batches' if args.grad_accum > 1 else ''}; "
                 f"mesh {mesh_desc} ({jax.device_count()} devices, {self.process_count} processes); steps "
                 f"{start} -> {args.num_steps}; output {s.output_dir}")
        if self.resume_from is not None:
            self.notice(f"resuming from {self.resume_from[1]} (step {start} of {args.num_steps})")
        self._install_signal_handlers()
        try:
            try:
                self.log = MetricsLog(s.output_dir, s.log_dir, enabled=self.main,
                                      purge_step=start + 1 if start else 0)
                status = self._loop(start)
            finally:
                self._restore_signal_handlers()
        except NonFiniteError as e:
            self._close_outputs(quiet=True)  # a save in flight holds an earlier, good state: it is finished first
            print(f"error: {e}; stopped without saving this state; {self._last_good()}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE
        except ck.TrainWriteError as e:  # a full disk: one line, and what is still on disk
            self._close_outputs(quiet=True)
            raise type(e)(f"{e}; {self._last_good()}") from None
        except BaseException:
            self._close_outputs(quiet=True)
            raise
        self._close_outputs(quiet=False)
        return status

    def _prepare_output_dir(self, start: int) -> None:
        """Process 0, holding the lock: --no-resume's deletions, a killed run's half-written leftovers, and the
        metrics of steps past the checkpoint this run resumes from."""
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import METRICS_FILE, truncate_jsonl

        s = self.s
        if self.clear_outputs:
            removed = ck.remove_run_outputs(s.output_dir, extra_files=(METRICS_FILE,))
            if removed:
                self.notice(f"--no-resume: deleted {', '.join(removed)} in {s.output_dir}")
        stale = ck.remove_stale(s.output_dir)
        if stale:
            self.notice(f"removed {', '.join(stale)} in {s.output_dir}: half-written by an earlier run that was "
                        f"stopped before it finished")
        if start:
            dropped = truncate_jsonl(os.path.join(s.output_dir, METRICS_FILE), start)
            if dropped:
                self.notice(f"dropped {dropped} records after step {start} from {METRICS_FILE} (the interrupted "
                            f"run went past its last checkpoint)")

    def _close_outputs(self, quiet: bool) -> None:
        """Finish the checkpoint in flight, then close the logs. `quiet`: the run is already failing, and its own
        error is the one to report (a full disk fails every write after the first)."""
        from kimi_jax.training.checkpoints import TrainWriteError

        errors = []
        for output in (self.writer, self.log):
            try:
                if output is not None:
                    output.close()
            except TrainWriteError as e:
                errors.append(e)
        if errors and not quiet:
            raise errors[0]

    def _last_good(self) -> str:
        last = self.writer.last_saved or (self.resume_from[:2] if self.resume_from else None)
        return f"the last good checkpoint is {last[1]}" if last else "no checkpoint was written"

    def _loop(self, start: int) -> int:
        s, args = self.s, self.args
        import jax
        import numpy as np
        from tqdm.auto import tqdm

        from kimi_jax import distributed
        from kimi_jax.training.logging import memory_mb, recursive_lr, vanilla_lr

        B, T, N = args.batch_size, args.seq_len, args.num_steps
        if start == 0 and self.eval_ds is not None:
            self.log_eval(self.evaluate(0))
        if start >= N:
            self.notice(f"the checkpoint is already at step {start} of --num_steps {N}; nothing to train")
            return 0
        bar = tqdm(total=N, initial=start, desc=f"train {s.stage}", unit="step", dynamic_ncols=True,
                   disable=not self.main or args.quiet)
        loss_key = "loss" if s.stage == "vanilla" else "total"
        t_last = time.perf_counter()
        timed = [0, 0.0]  # tokens and seconds of the steps after this run's first (which includes compilation)
        last_record = None
        step = start
        try:
            while step < N:
                local = next(self.iterator)
                step += 1
                if s.stage == "vanilla":
                    batch = distributed.global_batch(local, self.trainer.batch_sharding)
                    self.params, self.opt_state, metrics = self.trainer.step_fn(self.params, self.opt_state, batch)
                    lr = vanilla_lr(self.effective_lr(), s.warmup_steps, N, s.schedule, step - 1)
                else:
                    batch = distributed.global_batch({"input_ids": local["input_ids"], "weights": local["weights"]},
                                                     self.trainer.batch_sharding)
                    key = np.asarray(jax.random.fold_in(self.train_key, step))
                    progress = np.float32((step - 1) / N)
                    self.trainable, self.opt_state, metrics = self.trainer.step_fn(
                        self.trainable, self.opt_state, self.base, batch, key, progress)
                    lr = recursive_lr(self.rcfg.lr_sidecar * self.lr_scale, s.warmup_steps, N, step - 1)
                metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                bad = [k for k in (loss_key, "grad_norm") if k in metrics and not np.all(np.isfinite(metrics[k]))]
                record = self._train_record(step, metrics, lr, dt, B * T)
                self.log.record(record)
                if bad:
                    raise NonFiniteError(f"non-finite {' and '.join(bad)} at step {step} ("
                                         + ", ".join(f"{k} {float(metrics[k])}" for k in bad) + ")")
                self._log_train(record, metrics, step)
                if step > start + 1:
                    timed[0] += B * T
                    timed[1] += dt
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                last_record = record
                if self.eval_ds is not None and (step % args.eval_interval == 0 or step == N):
                    self.log_eval(self.evaluate(step))
                    t_last = time.perf_counter()  # evaluation time is not step time
                if (args.save_interval and step % args.save_interval == 0) or step == N:
                    self.save(step, last_record)
                    t_last = time.perf_counter()
                if step < N and self._stop_requested():
                    if self.saved_step != step:
                        self.save(step, last_record)
                    self.writer.wait()
                    bar.close()
                    name = signal.Signals(self.stop_signal).name
                    self.notice(f"stopped by {name} at step {step}; checkpoint {self.writer.last_saved[1]}; run the "
                                f"same command to resume")
                    return 128 + int(self.stop_signal)
        finally:
            bar.close()
        saved = self.writer.wait()
        summary = f"done: step {step}, loss {last_record['loss']:.4f}"
        if self.last_eval is not None:
            summary += f", eval perplexity {self.last_eval['perplexity']:.4f} at step {self.last_eval['step']}"
        if timed[1] > 0:
            summary += f", {timed[0] / timed[1]:,.0f} tokens/s (steps after the first)"
        summary += f", memory {memory_mb():,.0f} MB"
        if saved:
            summary += f", checkpoint {saved[1]}"
        if self.main:
            print(summary, flush=True)
        return 0

    def _train_record(self, step: int, metrics: dict, lr: float, dt: float, tokens: int) -> dict:
        from kimi_jax.training.logging import memory_mb, to_python

        record = {"type": "train", "step": step}
        loss_key = "loss" if self.s.stage == "vanilla" else "total"
        record["loss"] = to_python(metrics[loss_key])
        for k, v in metrics.items():
            record[k] = to_python(v)
        record.update(lr=lr, tokens_per_sec=tokens / dt if dt > 0 else None, steps_per_sec=1.0 / dt if dt > 0 else None,
                      memory_mb=memory_mb(), step_time_s=dt, time=time.time())
        return record

    def _log_train(self, record: dict, metrics: dict, step: int) -> None:
        tags = {"train/lr": record["lr"], "train/grad_norm": record.get("grad_norm"),
                "train/performance/tokens_per_sec": record["tokens_per_sec"],
                "train/performance/steps_per_sec": record["steps_per_sec"],
                "train/performance/memory_mb": record["memory_mb"]}
        if self.s.stage == "vanilla":
            tags["train/loss/total"] = record["loss"]
            tags["train/loss/final_ce"] = record["loss"]
        else:
            for name in ("total", "final_ce", "masked_ce", "halt", "ponder", "length", "stability", "l2sp"):
                if name in record:
                    tags[f"train/loss/{name}"] = record[name]
            tags["train/generation/avg_refine_steps"] = record.get("expected_steps")
            tags["train/generation/commit_rate"] = record.get("commit_rate")
            tags["train/generation/avg_chunk_length"] = record.get("avg_chunk_length")
        self.log.scalars(tags, step)


def check_process_rows(sharding, batch: int, seq_len: int, flag: str) -> None:
    """Each process feeds rows [p b, (p + 1) b) of every global batch (b = batch / processes): the batch sharding must
    give each process exactly those rows, i.e. split the batch over the processes rather than replicate it."""
    import jax

    n = jax.process_count()
    if n == 1:
        return
    per = batch // n
    want = set(range(jax.process_index() * per, (jax.process_index() + 1) * per))
    have = set()
    for index in sharding.addressable_devices_indices_map((batch, seq_len)).values():
        have.update(range(batch)[index[0]])
    if have != want:
        mesh = ",".join(f"{k}={v}" for k, v in sharding.mesh.shape.items())
        raise UsageError(f"{flag} {batch} on mesh {mesh} with {n} processes: the batch is not split across the "
                         f"processes (each must hold {per} of the {batch} rows); make the batch divisible by the "
                         f"data-parallel mesh size (data x fsdp x expert)")


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -------------------------------------------------------------------------------------------------------- main
def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    return Run(settings).execute()


def main(argv=None) -> int:
    expected: tuple[type[BaseException], ...] = (UsageError,)
    runtime: tuple[type[BaseException], ...] = ()
    try:
        from kimi_jax.hf.safetensors_io import CheckpointError
        from kimi_jax.orbax_model import CheckpointFormatError
        from kimi_jax.config import ConfigError
        from kimi_jax.data import DataError
        from kimi_jax.recursive.config import RecursiveConfigError
        from kimi_jax.recursive.io import LoadError
        from kimi_jax.sharding import ShardingError
        from kimi_jax.tokenizer import TokenizerError
        from kimi_jax.training.checkpoints import TrainCheckpointError, TrainWriteError

        runtime: tuple[type[BaseException], ...] = (TrainWriteError,)
        expected += (CheckpointError, CheckpointFormatError, ConfigError, DataError, RecursiveConfigError, LoadError,
                     ShardingError, TokenizerError, TrainCheckpointError)
        return run(argv)
    except expected as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except runtime as e:  # a failed checkpoint or log write (a full disk, permissions): not the user's flags
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
