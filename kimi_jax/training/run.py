"""A training run from its options: the settings' checks, the data, the output folder's lock, the resume decision, the
model and its trainer, then the training loop (`kimi_jax.training.loop.train`).

`run(TrainOptions(...))` returns the exit status (0, or 128 + signal after a stop request) and raises a
`kimi_jax.errors.KimiJaxError` (one `error:` line, its exit_code) for what the user can fix or a failed write.
`python -m experiments.train` parses its flags into a `TrainOptions` and calls it; that module's docstring is the
user's documentation of every rule here (defaults, the two stages' flags, resume, the lock, exit statuses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re

from kimi_jax.errors import UsageError

STAGES = ("vanilla", "recursive")
PHASES = ("a", "b", "c")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear")
DEFAULT_VANILLA_LR = 1e-5
MAX_DEFAULT_WARMUP = 100  # the default warmup: min(100, num_steps // 10)
DEFAULT_WARMUP_FRACTION = 10
# The settings that determine the trajectory: resuming with any of them changed would not continue the same run.
STRICT_RUN_FIELDS = ("stage", "phase", "dtype", "batch_size", "seq_len", "grad_accum", "seed", "lr", "warmup_steps",
                     "schedule", "weight_decay", "clip_norm", "train_groups", "chat", "data_fingerprint",
                     "recursive_config", "model_config")


@dataclasses.dataclass
class TrainOptions:
    """Every option of a run, with the command line's defaults (one field per flag of `python -m experiments.train`;
    None: the default that depends on other options, see that module's docstring)."""
    model_path: str | None = None
    model_name: str | None = None  # the same as model_path (the evaluation plan's name)
    stage: str | None = None
    use_recursive: bool = False
    phase: str | None = None
    recursive_config: str | None = None
    chunk_width: int | None = None
    max_inner_steps: int | None = None
    train_groups: str | None = None
    dtype: str | None = None
    remat: bool = True
    unroll_layers: bool = False
    kda_impl: str = "auto"
    mesh: str | None = None
    trust_remote_code: bool = False
    data: str = "demo"
    eval_data: str | None = None
    chat: bool = False
    seq_len: int = 2048
    batch_size: int = 4
    grad_accum: int = 1
    num_steps: int = 1000
    lr: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    clip_norm: float = 1.0
    seed: int = 0
    output_dir: str | None = None
    log_dir: str | None = None
    eval_interval: int = 1000
    max_eval_batches: int | None = None
    save_interval: int = 5000
    max_to_keep: int = 0
    resume: bool | None = None
    quiet: bool = False


# ------------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass
class Settings:
    """The options after defaults, aliases and consistency checks (no JAX needed)."""
    args: TrainOptions  # the options as given (or the command line's argparse namespace, which has the same fields)
    stage: str  # "vanilla" | "recursive"
    model_path: str  # absolute
    output_dir: str  # absolute
    log_dir: str  # absolute
    warmup_steps: int
    schedule: str
    notices: list[str]  # printed by process 0 once JAX's distributed runtime is up


def resolve_settings(args) -> Settings:
    """Check `args` (a TrainOptions, or anything with its fields) and fill in the defaults that depend on others; a
    UsageError names the first problem."""
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
    warmup = (args.warmup_steps if args.warmup_steps is not None
              else min(MAX_DEFAULT_WARMUP, args.num_steps // DEFAULT_WARMUP_FRACTION))
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


def run(options) -> int:
    """Train as `options` (a TrainOptions, or the command line's namespace) say; -> the exit status."""
    return _Run(resolve_settings(options)).execute()


# ------------------------------------------------------------------------------------------------------ the run
class _Run:
    """One training run: everything between the settings and the loop."""

    def __init__(self, s: Settings):
        self.s, self.args = s, s.args

    def say(self, message: str) -> None:
        from kimi_jax.training.loop import is_main

        if is_main() and not self.args.quiet:
            print(message, flush=True)

    def execute(self) -> int:
        s, args = self.s, self.args
        import jax

        from kimi_jax import distributed
        from kimi_jax.training.loop import is_main, notice

        distributed.maybe_initialize()
        self.main = is_main()
        for message in s.notices:
            notice(message)
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
            trainer, state, root_key = self._build_trainer()
            return self._train(trainer, state, root_key)
        finally:
            self._unlock_output_dir()

    # ------------------------------------------------------------------------------------------- the lock
    def _lock_output_dir(self) -> None:
        """Process 0 locks --output_dir before anything in it is read for the resume decision or changed, for the
        rest of the run (one run per output folder). Every process stops when it fails."""
        from kimi_jax.safe_io import FolderLock, describe_write_error
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.loop import notice

        out = self.s.output_dir
        self.lock, failure = None, None
        if self.main:
            self.created_output_dir = not os.path.exists(out)
            try:
                self.lock = FolderLock(out, flag="--output_dir", error=UsageError, notice=notice).acquire()
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

    # ------------------------------------------------------------------------------------------- model files
    def _load_config_and_tokenizer(self) -> None:
        s, args = self.s, self.args
        from kimi_jax import model_folder
        from kimi_jax import tokenizer as tokenizer_mod
        from kimi_jax.config import KimiLinearConfig

        self.format = model_folder.model_format(s.model_path)
        self.cfg = KimiLinearConfig.from_pretrained(s.model_path)
        self._check_model_files()
        self.tok = tokenizer_mod.load(s.model_path)
        model_folder.check_tokenizer(f"--model_path {s.model_path}", self.tok, self.cfg, UsageError)
        self.stored_dtype = model_folder.stored_dtype(s.model_path)
        self.dtype_name = args.dtype or self.stored_dtype
        if self.dtype_name not in DTYPES:
            raise UsageError(f"--model_path {s.model_path}: stored dtype {self.dtype_name!r}; pass --dtype")
        self.rcfg, self.phase, self.lr_scale, self.train_groups = None, None, 1.0, None
        if s.stage == "recursive":
            self._resolve_recursive_config()
        elif args.train_groups is not None:
            self.train_groups = parse_train_groups(args.train_groups)

    def _check_model_files(self) -> None:
        """Damaged or mismatched weights are refused before the data is loaded, from headers and metadata alone:
        an HF folder's safetensors (every tensor's name, shape, dtype and extent against config.json, every shard
        present), an orbax folder's array metadata (readable, every parameter with its shape). What only reading
        the arrays shows (a truncated or corrupt orbax data file) is caught where they are read."""
        from kimi_jax import model_folder

        path = self.s.model_path
        if self.format == model_folder.HF:
            from kimi_jax.hf.loading import validate_checkpoint
            from kimi_jax.hf.safetensors_io import SafetensorsReader

            validate_checkpoint(self.cfg, SafetensorsReader(path), path)
        else:
            from kimi_jax.orbax_model import check_stored_params

            check_stored_params(path, self.cfg)

    def _resolve_recursive_config(self) -> None:
        args = self.args
        from kimi_jax.recursive.config import RecursiveConfigError, resolve
        from kimi_jax.recursive.objective import num_windows
        from kimi_jax.training.loop import notice

        spec = args.recursive_config or f"phase_{args.phase or 'a'}"
        rcfg = resolve(spec)
        phase = args.phase or rcfg.phase or "a"
        if args.phase is not None and rcfg.phase is not None and rcfg.phase != args.phase:
            raise UsageError(f"--phase {args.phase} contradicts the recursive config {spec} (phase {rcfg.phase!r})")
        if not rcfg.recursive_enabled:
            notice(f"the recursive config {spec} has recursive_enabled false; training turns it on")
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
            num_windows(args.seq_len, rcfg.chunk_width, cfg.kda_chunk_size)
        except ValueError:
            need = 2 * rcfg.chunk_width - cfg.kda_chunk_size + 1
            raise UsageError(f"--seq_len {args.seq_len} is too short for one recursive window of chunk_width "
                             f"{rcfg.chunk_width} (every window offset must fit: need --seq_len >= {need})") from None
        self.rcfg, self.phase = rcfg, phase
        self.lr_scale = 1.0 if args.lr is None else args.lr / rcfg.lr_sidecar

    # ------------------------------------------------------------------------------------------- data
    def _build_data(self) -> None:
        args = self.args
        import jax

        from kimi_jax import data as data_lib

        show = self.main and not args.quiet
        records = data_lib.load_documents(args.data, split="train", progress=show)
        self.train_ds = data_lib.PackedDataset(self.tok, records, args.seq_len, chat=args.chat, progress=show)
        self.iterator = data_lib.BatchIterator(self.train_ds, args.batch_size, seed=args.seed,
                                               process_index=jax.process_index(), process_count=self.process_count)
        self.eval_ds = None
        if args.eval_interval > 0:
            eval_spec = args.eval_data or args.data
            try:
                eval_records = data_lib.load_documents(eval_spec, split="validation", progress=show)
                self.eval_ds = data_lib.PackedDataset(self.tok, eval_records, args.seq_len, chat=args.chat,
                                                      progress=show)
            except data_lib.DataError as e:
                raise UsageError(f"held-out data: {e} (pass --eval_data SPEC, or --eval_interval 0 to train without "
                                 f"evaluation)") from None

    # ------------------------------------------------------------------------------------------- resume
    def effective_lr(self):
        """The run's learning-rate setting as recorded: vanilla's peak, or the recursive scale and sidecar rate."""
        if self.s.stage == "vanilla":
            return self.args.lr if self.args.lr is not None else DEFAULT_VANILLA_LR
        return {"lr_scale": self.lr_scale, "lr_sidecar": self.rcfg.lr_sidecar * self.lr_scale}

    def _run_info(self) -> dict:
        s, args, vanilla = self.s, self.args, self.s.stage == "vanilla"
        return {"stage": s.stage, "phase": self.phase, "dtype": self.dtype_name, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "grad_accum": args.grad_accum, "seed": args.seed, "lr": self.effective_lr(),
                "warmup_steps": s.warmup_steps, "schedule": s.schedule if vanilla else "cosine",
                "weight_decay": (args.weight_decay or 0.0) if vanilla else self.rcfg.weight_decay,
                "clip_norm": args.clip_norm, "chat": args.chat,
                "train_groups": None if self.train_groups is None else list(self.train_groups),
                "data": args.data, "data_fingerprint": self.train_ds.fingerprint,
                "eval_data": args.eval_data or args.data,
                "eval_fingerprint": None if self.eval_ds is None else self.eval_ds.fingerprint,
                "recursive_config": None if self.rcfg is None else self.rcfg.to_dict(),
                "model_config": self.cfg.to_hf_dict(), "model_path": s.model_path, "num_steps": args.num_steps}

    def _decide_resume(self) -> None:
        s, args = self.s, self.args
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import METRICS_FILE
        from kimi_jax.training.loop import notice

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
        with reading_resume_checkpoint(folder):
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
            notice(f"--num_steps {args.num_steps} differs from the checkpoint's run ({saved.get('num_steps')}): the "
                   f"learning-rate schedule is recomputed for the new total")
        if saved.get("model_path") != s.model_path:
            notice(f"resuming a run started from {saved.get('model_path')} with --model_path {s.model_path} (same "
                   f"config.json)")
        if step > args.num_steps:
            raise UsageError(f"--num_steps {args.num_steps}: the checkpoint in {s.output_dir} is already at step "
                             f"{step}")
        self.iterator.restore(state["data_state"])
        self.resume_from = (step, folder)

    def _event_files(self) -> list[str]:
        """TensorBoard files an earlier run left in --log_dir (as paths relative to --output_dir where inside)."""
        s = self.s
        found = sorted(glob.glob(os.path.join(s.log_dir, "events.out.tfevents.*")))
        return [os.path.relpath(p, s.output_dir) if p.startswith(s.output_dir + os.sep) else p for p in found]

    def _refuse_later_step_folders(self, step: int) -> None:
        """A `step_M` after the checkpoint this run resumes from is not a complete checkpoint (or it would be the
        newest); this run would have to write step_M again, and a checkpoint is never replaced: refused now rather
        than when step M is saved (e.g. a model folder kept from a checkpoint whose train_state was deleted)."""
        from kimi_jax.model_folder import STEP_PREFIX

        later = []
        for name in os.listdir(self.s.output_dir):
            match = re.fullmatch(re.escape(STEP_PREFIX) + r"(\d+)", name)
            if match and step < int(match.group(1)) <= self.args.num_steps:
                later.append((int(match.group(1)), name))
        if later:
            name = min(later)[1]
            raise UsageError(f"--output_dir {self.s.output_dir} holds {name}, which is not a complete checkpoint, "
                             f"after step_{step}, the checkpoint this run resumes from; training would write {name} "
                             f"again: move it away, or pass --no-resume to start over")

    # ------------------------------------------------------------------------------------------- the trainer
    def _build_trainer(self):
        """(trainer, state, root key): the stage's trainer over the mesh, at step 0 or the checkpoint's state."""
        s, args = self.s, self.args
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from kimi_jax import model_folder, sharding
        from kimi_jax.model import KimiLinearForCausalLM, RunOptions
        from kimi_jax.training.loop import read_root_key

        mesh = sharding.make_mesh(args.mesh)
        self.mesh = mesh
        opts = RunOptions(remat=args.remat, unroll_layers=args.unroll_layers, kda_impl=args.kda_impl)
        dtype = jnp.dtype(self.dtype_name)
        root_key = np.asarray(jax.random.PRNGKey(args.seed), np.uint32)
        if self.resume_from is not None:
            with reading_resume_checkpoint(self.resume_from[1]):
                root_key = read_root_key(self.resume_from[1], root_key)
        common = dict(dtype_name=self.dtype_name, batch_size=args.batch_size, eval_batch_size=self.micro_batch,
                      opts=opts, num_steps=args.num_steps, warmup_steps=s.warmup_steps)
        if s.stage == "vanilla":
            from kimi_jax.training.vanilla import build_vanilla_trainer

            cfg = self.cfg
            model = (nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
                     if self.resume_from is not None  # its parameters come from the checkpoint
                     else model_folder.load_model(s.model_path, dtype, mesh=mesh))
            trainer, state = build_vanilla_trainer(
                model, mesh, lr=self.effective_lr(), schedule=s.schedule, weight_decay=args.weight_decay or 0.0,
                clip_norm=args.clip_norm or None, grad_accum=args.grad_accum, trainable_groups=self.train_groups,
                **common)
        else:
            from kimi_jax.recursive.sidecar import build_sidecar
            from kimi_jax.training.recursive import build_recursive

            model = model_folder.load_model(s.model_path, dtype, mesh=mesh)
            same_arrays = self.format == model_folder.ORBAX and self.stored_dtype == self.dtype_name
            trainer, state = build_recursive(model, build_sidecar(self.cfg, self.rcfg), self.rcfg, mesh,
                                             seq_len=args.seq_len, clip_norm=args.clip_norm, lr_scale=self.lr_scale,
                                             params_source=s.model_path if same_arrays else None, **common)
        del model
        if self.resume_from is not None:
            step, folder = self.resume_from
            with reading_resume_checkpoint(folder):
                state = trainer.restore(folder, state, step)
        check_process_rows(trainer.batch_sharding, args.batch_size, args.seq_len, "--batch_size")
        if self.eval_ds is not None:
            check_process_rows(trainer.eval_sharding, self.micro_batch, args.seq_len, "--batch_size / --grad_accum")
        return trainer, state, root_key

    # ------------------------------------------------------------------------------------------- training
    def _prepare_output_dir(self) -> None:
        """Process 0, holding the lock: --no-resume's deletions and a killed run's half-written leftovers."""
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import METRICS_FILE
        from kimi_jax.training.loop import notice

        out = self.s.output_dir
        if self.clear_outputs:
            removed = ck.remove_run_outputs(out, extra_files=(METRICS_FILE,))
            if removed:
                notice(f"--no-resume: deleted {', '.join(removed)} in {out}")
        stale = ck.remove_stale(out)
        if stale:
            notice(f"removed {', '.join(stale)} in {out}: half-written by an earlier run that was stopped before it "
                   f"finished")

    def _train(self, trainer, state, root_key) -> int:
        s, args = self.s, self.args
        import jax

        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.loop import LoopSettings, RunRecord, notice, train

        model_files = {}
        if self.main:
            self._prepare_output_dir()
            model_files = ck.read_model_files(s.model_path)
        B, T, N = args.batch_size, args.seq_len, args.num_steps
        mesh_desc = ",".join(f"{k}={v}" for k, v in self.mesh.shape.items() if v > 1) or "single device"
        self.say(f"train: {trainer.describe()}; model {s.model_path} ({self.format}, {self.dtype_name}, "
                 f"{trainer.num_params(state):,} params); data {args.data}: {len(self.train_ds)} rows x {T} tokens"
                 + (f", eval {len(self.eval_ds)} rows" if self.eval_ds is not None else "")
                 + f"; batch {B}{' in ' + str(args.grad_accum) + ' micro-batches' if args.grad_accum > 1 else ''}; "
                 f"mesh {mesh_desc} ({jax.device_count()} devices, {self.process_count} processes); steps "
                 f"{state.step} -> {N}; output {s.output_dir}")
        resumed_from = None
        if self.resume_from is not None:
            resumed_from = self.resume_from[1]
            notice(f"resuming from {resumed_from} (step {state.step} of {N})")
        settings = LoopSettings(num_steps=N, output_dir=s.output_dir, log_dir=s.log_dir,
                                eval_interval=args.eval_interval, max_eval_batches=args.max_eval_batches,
                                save_interval=args.save_interval, max_to_keep=args.max_to_keep, quiet=args.quiet)
        return train(trainer, state, self.iterator, settings=settings, root_key=root_key,
                     record=RunRecord(source=s.model_path, run=self.run_info, model_files=model_files),
                     eval_data=self.eval_ds, resumed_from=resumed_from)


def parse_train_groups(text: str) -> tuple[str, ...] | None:
    """--train_groups "G1,G2" -> the groups (None: all); an unknown name is a UsageError."""
    from kimi_jax.training.vanilla import PARAM_GROUPS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return None
    unknown = [n for n in names if n not in PARAM_GROUPS]
    if unknown or not names:
        what = f"unknown group {unknown[0]!r}" if unknown else "no group named"
        raise UsageError(f"--train_groups {text!r}: {what}; choose from {', '.join(PARAM_GROUPS)} (comma-separated) "
                         f"or all")
    return tuple(dict.fromkeys(names))


@contextlib.contextmanager
def reading_resume_checkpoint(folder: str):
    """A damaged checkpoint to resume from: one line naming the file or array, and what the user can do."""
    from kimi_jax.model_folder import ModelFolderError
    from kimi_jax.orbax_model import CheckpointFormatError
    from kimi_jax.training.checkpoints import TrainCheckpointError

    try:
        yield
    except (CheckpointFormatError, ModelFolderError, TrainCheckpointError) as e:
        raise TrainCheckpointError(f"cannot resume from {folder}: {e}; move it out of --output_dir to resume from "
                                   f"the checkpoint before it, or pass --no-resume to start over") from None


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["DEFAULT_VANILLA_LR", "DTYPES", "PHASES", "SCHEDULES", "STAGES", "STRICT_RUN_FIELDS", "Settings",
           "TrainOptions", "check_process_rows", "parse_train_groups", "refuse_inside_model", "resolve_settings",
           "run"]
