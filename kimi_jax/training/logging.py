"""Training logs: the per-step JSONL file, TensorBoard scalars and the memory figure.

* `MetricsLog` (process 0 only) appends one JSON object per line to `{output_dir}/metrics.jsonl`: train records
  `{"type": "train", "step", "loss", <every metric of the step>, "lr", "tokens_per_sec", "steps_per_sec",
  "memory_mb", "step_time_s", "time"}` and evaluation records `{"type": "eval", "step", ...}`. Non-finite values are
  written as null (JSON has no NaN). On resume `truncate_jsonl` drops the records after the checkpoint's step, so
  the file reads as one uninterrupted run. Scalars go to a TensorBoard event file (tensorboardX's format), with a
  purge marker on resume so TensorBoard hides the killed run's events after the checkpoint. Both files are written
  from the training loop's thread in whole records: a failed write (a full disk) is one LogWriteError naming the
  file, and leaves no torn record behind.
  (`kimi_jax.tb_events.read_scalars` reads the scalars back.)
* `memory_mb()`: the peak device memory (`memory_stats()["peak_bytes_in_use"]`, the largest over local devices) where
  the backend reports it (GPU, TPU), else the host's resident set size (CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from kimi_jax.tb_events import AppendOnlyFile, EventFile
from kimi_jax.training.checkpoints import TrainWriteError

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------------- values
def to_python(value: Any) -> Any:
    """JSON-ready: numpy/jax scalars -> float/int, arrays -> lists, non-finite floats -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    array = np.asarray(value)
    if array.ndim > 0:
        return [to_python(v) for v in array.tolist()]
    item = array.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


def memory_mb() -> float:
    """Peak device memory in MB where the backend reports it, else the host's resident set size in MB."""
    from kimi_jax.evaluation.system import device_peak_bytes

    peak = device_peak_bytes()
    return (peak if peak is not None else host_rss_bytes()) / 2**20


def host_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------------------------------- JSONL
def read_jsonl(path: str) -> list[dict]:
    """Every complete JSON object line of `path` (a torn last line from a killed writer is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                records.append(obj)
    return records


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keep only the records with step <= last_step. Returns how many were dropped.

    A killed run's records after its last checkpoint (and a torn last line) are the file's tail: the file is cut
    there in place, which needs no free space. Anything else (a torn line between good ones) rewrites the file
    atomically. A file with nothing to drop is left untouched."""
    from kimi_jax.training.checkpoints import write_text_atomic

    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    kept, dropped, cut, offset = [], 0, None, 0  # cut: the offset of the first line not kept
    for line in lines:
        record = _parse_line(line)
        keep = record is not None and isinstance(record.get("step"), int) and record["step"] <= last_step
        if keep and line.endswith(b"\n"):
            kept.append(line)
            if cut is not None:
                cut = -1  # a kept line after a dropped one: not a tail
        else:
            dropped += record is not None
            if cut is None:
                cut = offset
        offset += len(line)
    if cut is None:
        return 0
    try:
        if cut >= 0:
            os.truncate(path, cut)
        else:
            write_text_atomic(path, b"".join(kept).decode("utf-8"))
    except OSError as e:
        raise LogWriteError(_write_failure(e, path)) from None
    return dropped


def _parse_line(line: bytes) -> dict | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


class LogWriteError(TrainWriteError):
    """metrics.jsonl or a TensorBoard event file could not be written (a full disk, a quota, permissions)."""


def _write_failure(e: OSError, path: str) -> str:
    from kimi_jax.safe_io import describe_write_error

    return f"cannot write the training log: {describe_write_error(e, path)}"


@contextlib.contextmanager
def _log_writes(path: str):
    """A failed write of a log file becomes one LogWriteError naming it."""
    try:
        yield
    except OSError as e:
        raise LogWriteError(_write_failure(e, e.filename or path)) from None


class MetricsLog:
    """JSONL + TensorBoard writer for one run; every method is a no-op where `enabled` is False (processes > 0).

    Both files are appended from the training loop's thread, whole records only: a failed write (a full disk) is a
    LogWriteError naming the file, with nothing of the failed record left in it."""

    def __init__(self, output_dir: str, log_dir: str, *, enabled: bool = True, purge_step: int | None = None,
                 flush_secs: float = 10):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.log_dir = log_dir
        self._file = None
        self._events = None
        if not enabled:
            return
        with _log_writes(output_dir):
            for folder in (output_dir, log_dir):
                os.makedirs(folder, exist_ok=True)
            self._file = AppendOnlyFile(self.path)
            try:
                self._events = EventFile(log_dir, flush_secs)
                if purge_step is not None:
                    self._events.purge_from(purge_step)
            except BaseException:
                self._file.close()
                raise

    def record(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with _log_writes(self.path):
            self._file.append((json.dumps(to_python(dict(record)), allow_nan=False) + "\n").encode())

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """TensorBoard scalars {tag: value}; None and non-finite values are skipped."""
        if not self.enabled:
            return
        for tag, value in values.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                with _log_writes(self.log_dir):
                    self._events.scalar(tag, value, step)

    def flush(self) -> None:
        if self.enabled:
            with _log_writes(self.log_dir):
                self._events.flush()

    def close(self, flush: bool = True) -> None:
        """Write what is pending and close both files (`flush=False`: after a failure, only close them)."""
        if not self.enabled:
            return
        self.enabled = False
        with _log_writes(self.log_dir):
            try:
                if flush:
                    self._file.sync()
            finally:
                self._file.close()
                self._events.close(flush)


__all__ = ["METRICS_FILE", "LogWriteError", "MetricsLog", "host_rss_bytes", "memory_mb", "read_jsonl",
           "to_python", "truncate_jsonl"]
