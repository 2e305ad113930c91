"""Shared plumbing for the convert commands: one-line errors and exit codes, atomic output folders, notices, dtype
rules, files copied alongside.

Every failure is one `error:` line on stderr. Exit codes: 0 success; 1 a failed write or read of the storage (a full
disk, a quota, a read-only or failing file system); 2 bad flags or bad input (a missing folder, an output that
overlaps an input, a corrupt checkpoint, a config that does not match); 130 Ctrl-C; 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
from typing import Iterator

import ml_dtypes
import numpy as np

from kimi_jax.errors import KimiJaxError, UsageError, WriteError, report
from kimi_jax.safe_io import (atomic_folder, describe_write_error, interrupt_exit_code, interrupt_name,
                              sigterm_as_interrupt, storage_error, temporary_sibling)


# Copied next to converted weights so every output folder is self-contained.
SIDECAR_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one `error:` line (exit 2 through run_main) instead of a usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


def run_main(main, argv=None) -> int:
    """Run `main(argv)` with SIGTERM raised like Ctrl-C, turning expected failures into one line on stderr and the
    exit codes of the module docstring."""
    _OUTPUTS.clear()
    try:
        with sigterm_as_interrupt():
            return main(argv) or 0
    except KimiJaxError as e:
        return report(e)
    except KeyboardInterrupt as e:
        print(f"error: {interrupt_name(e)}; {_what_was_left()}", file=sys.stderr)
        return interrupt_exit_code(e)


def require_folder(path: str, flag: str) -> str:
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such folder")
    return path


# ------------------------------------------------------------------------------------------------ output folders
@dataclasses.dataclass
class _Output:
    flag: str
    path: str
    existed: bool
    tmp: str | None = None
    filled: bool = False  # the block finished: only the final renames were left


_OUTPUTS: list[_Output] = []  # this run's output folders: what an interrupt message reports, read from the disk


def _what_was_left() -> str:
    """What an interrupted run leaves on disk, said truthfully (checked on disk, not assumed)."""
    for out in _OUTPUTS:
        if out.filled and out.tmp is not None and not os.path.lexists(out.tmp) and os.path.lexists(out.path):
            return f"{out.flag} {out.path} had already been written completely"
        if out.tmp is not None and os.path.lexists(out.tmp):
            return f"the partial output {out.tmp} could not be removed; delete it"
    kept = [f"the existing {out.flag} {out.path} is untouched" for out in _OUTPUTS if out.existed]
    return "no output was left behind" + (f" ({'; '.join(kept)})" if kept else "")


@contextlib.contextmanager
def output_folder(output: str, overwrite: bool, flag: str = "--output") -> Iterator[str]:
    """Yield a hidden temporary sibling of `output` to fill; it replaces `output` in one rename when the block
    succeeds, and is removed on any failure, Ctrl-C or SIGTERM (kimi_jax.safe_io.atomic_folder). Temporaries left by
    killed runs are removed with a notice. A failed write or read of the storage becomes a WriteError naming the
    path; an existing `output` is untouched unless the block completes."""
    record = _Output(flag, os.path.abspath(output), os.path.lexists(output))
    _OUTPUTS.append(record)
    try:
        with atomic_folder(output, overwrite=overwrite, flag=flag, error=UsageError, notice=notice) as tmp:
            record.tmp = tmp
            yield tmp
            record.filled = True
    except BaseException as e:
        if not isinstance(e, OSError) and not (isinstance(e, Exception) and storage_error(e)):
            raise
        raise WriteError(_describe_failure(e, record)) from None


def _failed_os_path(e: BaseException) -> str | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename:
            return os.path.abspath(os.fsdecode(e.filename))
        e = e.__cause__ or e.__context__
    return None


def _describe_failure(e: BaseException, out: _Output) -> str:
    tmp = out.tmp or temporary_sibling(out.path)
    path = _failed_os_path(e)
    written = (tmp, out.path, temporary_sibling(out.path, "old"))
    if path is None or path in written or path.startswith(tmp + os.sep):
        what = describe_write_error(e, path or tmp)
    else:  # an input that failed to read mid-way (a failing disk, a file removed under the run)
        what = describe_write_error(e, path).replace(" writing ", " reading ", 1)
    kept = f"; the existing {out.flag} {out.path} is untouched" if out.existed else ""
    return f"{what}; nothing was written{kept}"


# ------------------------------------------------------------------------------------------------ dtypes
def holds_exactly(source, target) -> bool:
    """Whether every finite value of floating dtype `source` is also a value of `target` (no rounding, no overflow,
    subnormals included)."""
    s, t = ml_dtypes.finfo(np.dtype(source)), ml_dtypes.finfo(np.dtype(target))
    return t.nmant >= s.nmant and t.maxexp >= s.maxexp and t.minexp - t.nmant <= s.minexp - s.nmant


def relative_rounding(dtype) -> float:
    """The largest relative error of rounding to `dtype` (half its machine epsilon)."""
    return float(ml_dtypes.finfo(np.dtype(dtype)).eps) / 2


def listing(items: list[str], limit: int = 3) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ------------------------------------------------------------------------------------------------ misc
@contextlib.contextmanager
def progress_bar(**kwargs) -> Iterator:
    """A tqdm bar on stderr that is erased when the block fails, so the error is the one line left."""
    from tqdm import tqdm

    bar = tqdm(file=sys.stderr, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def copy_sidecar_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in SIDECAR_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
