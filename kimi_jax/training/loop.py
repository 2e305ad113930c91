"""The training loop as a library function: steps, held-out evaluation, checkpoints, logs and stopping.

`train(trainer, state, batches, ...)` runs any `kimi_jax.training.trainer.Trainer` from `state.step` to
`settings.num_steps` and returns the exit status (0, or 128 + the signal after a stop request):

* steps: `trainer.step(state, batch, fold_in(train key, n))` for step n on `next(batches)` (this process's rows);
* held-out evaluation (`evaluate`) at step 0, every `eval_interval` steps and at the end (eval_interval 0: never);
* checkpoints (`kimi_jax.training.checkpoints.CheckpointWriter`) every `save_interval` steps (0: only at the end)
  and at the end: the model folder of `trainer.materialize(state)`, `trainer.state_arrays(state)` and the root RNG
  key, the data position and the run's settings; params/ is hard-linked while `trainer.keeps_params`;
* logs (process 0): metrics.jsonl and TensorBoard (`kimi_jax.training.logging.MetricsLog`) with the trainer's tags, and
  a tqdm bar; resuming (`state.step` > 0) drops the records after that step and hides TensorBoard's;
* SIGINT / SIGTERM (`StopRequest`): stop after the step in flight, save it, return 128 + the signal; a second Ctrl-C
  raises KeyboardInterrupt at once;
* a non-finite loss or gradient norm raises NonFiniteError (exit status 3) naming the step; that state is never
  saved, the checkpoint in flight (an earlier, good state) is finished first;
* a failed write (a full disk) raises the TrainWriteError with the last good checkpoint named.

Keys: the root key (saved in every checkpoint as "rng") splits into the train key and the eval key; held-out batch i
uses fold_in(eval key, i), so every evaluation sees the same keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.training.trainer import LM_TOTALS, Trainer, TrainState

EXIT_NONFINITE = 3
RNG_KEY = "rng"  # the root key's entry in a checkpoint's train_state/
MAX_LOG_PERPLEXITY = 700.0  # exp() of more overflows a float64: the perplexity is capped there


class NonFiniteError(KimiJaxError):
    """A non-finite loss or gradient norm: the run stops without saving that state (exit status 3)."""

    exit_code = EXIT_NONFINITE


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How the loop runs: `num_steps` in all (the learning-rate schedule's total), where it writes, how often it
    evaluates (`eval_interval`, 0 = never; at most `max_eval_batches` batches, None = every held-out row) and saves
    (`save_interval`, 0 = only at the end; `max_to_keep` newest checkpoints, 0 = all). `quiet`: no progress bars or
    summaries."""
    num_steps: int
    output_dir: str
    log_dir: str
    eval_interval: int = 0
    max_eval_batches: int | None = None
    save_interval: int = 0
    max_to_keep: int = 0
    quiet: bool = False


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What every checkpoint says about the run besides its state: the model folder it started from (`source`, never
    pruned), the settings that determine its trajectory (`run`, compared when resuming) and the files of the source
    folder copied into each checkpoint (`model_files`, {name: bytes}: the tokenizer; process 0's are written)."""
    source: str
    run: Mapping[str, Any]
    model_files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)


def is_main() -> bool:
    return jax.process_index() == 0


def notice(message: str) -> None:
    """A `notice:` line on stderr (process 0)."""
    if is_main():
        print(f"notice: {message}", file=sys.stderr, flush=True)


def sync(name: str) -> None:
    """Every process waits here for the others (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def split_root_key(root_key) -> tuple[np.ndarray, np.ndarray]:
    """(train key, eval key) of the run's root key."""
    train_key, eval_key = jax.random.split(jax.numpy.asarray(root_key))
    return np.asarray(train_key), np.asarray(eval_key)


def read_root_key(folder: str, like) -> np.ndarray:
    """The root RNG key saved in checkpoint `folder` (shaped like `like`)."""
    from kimi_jax.training.checkpoints import restore_trees

    return np.asarray(restore_trees(folder, {RNG_KEY: np.asarray(like)})[RNG_KEY], np.asarray(like).dtype)


# ---------------------------------------------------------------------------------------------- stop requests
class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the step in flight (and save it); a second Ctrl-C aborts at once
    (KeyboardInterrupt). Used as a context manager around the loop: the handlers are installed on entry (from the
    main thread; elsewhere only `request` stops the loop) and the previous ones put back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def request(self, signum: int) -> None:
        """Ask for a stop as signal `signum` would."""
        self.signum = int(signum)
        if is_main():
            print(f"\nnotice: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  f"(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers need the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def requested(self) -> bool:
        """Whether any process was asked to stop (every process calls this at the same step)."""
        if jax.process_count() == 1:
            return self.signum is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        hits = [int(f) for f in np.asarray(flags).reshape(-1) if int(f)]
        if hits and self.signum is None:
            self.signum = hits[0]
        return bool(hits)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(trainer: Trainer, state: TrainState, dataset, eval_key, *, max_batches: int | None = None,
             show: bool = False) -> dict:
    """The held-out record of `state` over `dataset` (a PackedDataset: every row once, or the first `max_batches`
    batches of `trainer.eval_batch_size` rows): token-weighted NLL, perplexity, token accuracy and the trainer's
    own fields (`eval_result`)."""
    from tqdm.auto import tqdm

    from kimi_jax.data import eval_batches, num_eval_batches

    total = num_eval_batches(dataset, trainer.eval_batch_size)
    if max_batches:
        total = min(total, max_batches)
    batches = itertools.islice(eval_batches(dataset, trainer.eval_batch_size, process_index=jax.process_index(),
                                            process_count=jax.process_count()), total)
    sums: dict[str, Any] = dict.fromkeys(LM_TOTALS, 0.0)
    for i, local in enumerate(tqdm(batches, total=total, desc=f"eval @ {state.step}", leave=False, unit="batch",
                                   dynamic_ncols=True, disable=not show)):
        key = np.asarray(jax.random.fold_in(eval_key, i))
        for name, value in trainer.eval_stats(state, local, key).items():
            sums[name] = sums.get(name, 0.0) + value
    tokens = max(sums["tokens"], 1.0)
    nll = sums["nll"] / tokens
    result = {"type": "eval", "step": state.step, "nll": nll, "perplexity": math.exp(min(nll, MAX_LOG_PERPLEXITY)),
              "token_accuracy": sums["correct"] / tokens, "tokens": int(sums["tokens"]), "batches": total}
    result.update(trainer.eval_result(sums))
    return result


def train_record(step: int, metrics: Mapping[str, Any], loss_metric: str, lr: float, dt: float, tokens: int) -> dict:
    """The metrics.jsonl record of a step: its loss, every metric, the learning rate, speed and memory."""
    from kimi_jax.training.logging import memory_mb, to_python

    record = {"type": "train", "step": step, "loss": to_python(metrics[loss_metric])}
    for k, v in metrics.items():
        record[k] = to_python(v)
    record.update(lr=lr, tokens_per_sec=tokens / dt if dt > 0 else None, steps_per_sec=1.0 / dt if dt > 0 else None,
                  memory_mb=memory_mb(), step_time_s=dt, time=time.time())
    return record


# ---------------------------------------------------------------------------------------------- the loop
def train(trainer: Trainer, state: TrainState, batches, *, settings: LoopSettings, root_key, record: RunRecord,
          eval_data=None, resumed_from: str | None = None, stop: StopRequest | None = None) -> int:
    """Train from `state` (at step `state.step`; > 0 when resuming from checkpoint `resumed_from`) to
    `settings.num_steps`; -> 0, or 128 + signal after a stop request (see the module docstring). `batches` yields
    this process's rows of each global batch and has `state()` (the data position saved in checkpoints, e.g. a
    `kimi_jax.data.BatchIterator` restored to the checkpoint's position); `eval_data`: a PackedDataset or None."""
    return _Loop(trainer, batches, settings, root_key, record, eval_data, resumed_from,
                 stop or StopRequest()).run(state)


class _Loop:
    """One call of `train`: the writer, the logs and what the messages need."""

    def __init__(self, trainer: Trainer, batches, settings: LoopSettings, root_key, record: RunRecord, eval_data,
                 resumed_from: str | None, stop: StopRequest):
        self.trainer, self.batches, self.s, self.record = trainer, batches, settings, record
        self.resumed_from, self.stop = resumed_from, stop
        self.eval_data = eval_data if settings.eval_interval > 0 else None  # eval_interval 0: never
        self.root_key = np.asarray(root_key)
        self.train_key, self.eval_key = split_root_key(self.root_key)
        self.main = is_main()
        self.show = self.main and not settings.quiet
        self.writer = self.log = self.last_eval = None
        self.saved_step = None

    # ------------------------------------------------------------------------------------------------ outputs
    def run(self, state: TrainState) -> int:
        from kimi_jax.training import checkpoints as ck
        from kimi_jax.training.logging import MetricsLog

        s, start = self.s, state.step
        self.saved_step, self.num_params = start, self.trainer.num_params(state)
        if self.main and start:
            self._drop_records_after(start)
        sync("kimi_jax_train_outputs_ready")
        self.writer = ck.CheckpointWriter(s.output_dir, max_to_keep=s.max_to_keep,
                                          model_files=self.record.model_files if self.main else {},
                                          protect=(self.record.source,))
        if self.resumed_from is not None and self.trainer.keeps_params:
            self.writer.last_params_folder = self.resumed_from  # the same parameters: its params/ may be linked
        try:
            with self.stop:
                self.log = MetricsLog(s.output_dir, s.log_dir, enabled=self.main, purge_step=start + 1 if start else 0)
                status = self._steps(state)
        except NonFiniteError as e:
            self._close(quiet=True)  # a save in flight holds an earlier, good state: it is finished first
            raise NonFiniteError(f"{e}; stopped without saving this state; {self._last_good()}") from None
        except ck.TrainWriteError as e:  # a full disk: one line, and what is still on disk
            self._close(quiet=True)
            raise type(e)(f"{e}; {self._last_good()}") from None
        except BaseException:
            self._close(quiet=True)
            raise
        self._close(quiet=False)
        return status

    def _drop_records_after(self, step: int) -> None:
        from kimi_jax.training.logging import METRICS_FILE, truncate_jsonl

        dropped = truncate_jsonl(os.path.join(self.s.output_dir, METRICS_FILE), step)
        if dropped:
            notice(f"dropped {dropped} records after step {step} from {METRICS_FILE} (the interrupted run went past "
                   f"its last checkpoint)")

    def _close(self, quiet: bool) -> None:
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
        last = self.writer.last_saved[1] if self.writer.last_saved else self.resumed_from
        return f"the last good checkpoint is {last}" if last else "no checkpoint was written"

    # ------------------------------------------------------------------------------------------------ steps
    def _steps(self, state: TrainState) -> int:
        from tqdm.auto import tqdm

        from kimi_jax.training.logging import memory_mb

        trainer, s, N, start = self.trainer, self.s, self.s.num_steps, state.step
        if start == 0 and self.eval_data is not None:
            self._evaluate(state)
        if start >= N:
            notice(f"the checkpoint is already at step {start} of --num_steps {N}; nothing to train")
            return 0
        bar = tqdm(total=N, initial=start, desc=f"train {trainer.stage}", unit="step", dynamic_ncols=True,
                   disable=not self.show)
        t_last = time.perf_counter()
        timed = [0, 0.0]  # tokens and seconds of the steps after this run's first (which includes compilation)
        last_record = None
        try:
            while state.step < N:
                local = next(self.batches)
                step = state.step + 1
                state, metrics = trainer.step(state, local, np.asarray(jax.random.fold_in(self.train_key, step)))
                metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                tokens = int(np.size(local["input_ids"])) * jax.process_count()
                bad = [k for k in (trainer.loss_metric, "grad_norm")
                       if k in metrics and not np.all(np.isfinite(metrics[k]))]
                record = train_record(step, metrics, trainer.loss_metric, trainer.learning_rate(step), dt, tokens)
                self.log.record(record)
                if bad:
                    raise NonFiniteError(f"non-finite {' and '.join(bad)} at step {step} ("
                                         + ", ".join(f"{k} {float(metrics[k])}" for k in bad) + ")")
                self.log.scalars(trainer.train_tags(record), step)
                if step > start + 1:
                    timed[0] += tokens
                    timed[1] += dt
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                last_record = record
                if self.eval_data is not None and (step % s.eval_interval == 0 or step == N):
                    self._evaluate(state)
                    t_last = time.perf_counter()  # evaluation time is not step time
                if (s.save_interval and step % s.save_interval == 0) or step == N:
                    self._save(state, last_record)
                    t_last = time.perf_counter()
                if step < N and self.stop.requested():
                    if self.saved_step != step:
                        self._save(state, last_record)
                    self.writer.wait()
                    bar.close()
                    notice(f"stopped by {signal.Signals(self.stop.signum).name} at step {step}; checkpoint "
                           f"{self.writer.last_saved[1]}; run the same command to resume")
                    return 128 + self.stop.signum
        finally:
            bar.close()
        saved = self.writer.wait()
        summary = f"done: step {state.step}, loss {last_record['loss']:.4f}"
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

    def _evaluate(self, state: TrainState) -> None:
        result = evaluate(self.trainer, state, self.eval_data, self.eval_key, max_batches=self.s.max_eval_batches,
                          show=self.show)
        self.log.scalars(self.trainer.eval_tags(result), result["step"])
        self.log.record(dict(result, time=time.time()))
        self.last_eval = result

    # ------------------------------------------------------------------------------------------------ saving
    def _save(self, state: TrainState, last_record: dict | None) -> None:
        from kimi_jax.orbax_model import model_param_arrays
        from kimi_jax.training.logging import to_python

        trainer, step = self.trainer, state.step
        self.writer.wait()  # the previous save is finished (and its folder usable as a link source)
        self.log.flush()  # the logs up to this step are on disk before the checkpoint can appear
        model, sidecar = trainer.materialize(state)
        link = (trainer.params_source or self.writer.last_params_folder) if trainer.keeps_params else None
        meta = {"dtype": trainer.dtype_name, "num_params": self.num_params, "source": self.record.source,
                "training": {"stage": trainer.stage, "phase": trainer.phase, "step": step,
                             "num_steps": self.s.num_steps, "output_dir": self.s.output_dir}}
        state_json = {"data_state": self.batches.state(), "run": dict(self.record.run),
                      "metrics": to_python(last_record) if last_record else None,
                      "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()}, "devices": jax.device_count(),
                      "processes": jax.process_count()}
        self.writer.save(step, config=model.config.to_hf_dict(), meta=meta, params=model_param_arrays(model),
                         state_arrays={**trainer.state_arrays(state), RNG_KEY: self.root_key},
                         state_json=state_json, sidecar=sidecar, rcfg=trainer.sidecar_config, link_params_from=link)
        self.saved_step = step


__all__ = ["EXIT_NONFINITE", "LoopSettings", "NonFiniteError", "RNG_KEY", "RunRecord", "StopRequest", "evaluate",
           "notice", "read_root_key", "split_root_key", "sync", "train", "train_record"]
