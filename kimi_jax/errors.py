"""The one base class of expected failures.

Every failure a user can cause or meet (bad flags, paths, configs, data, damaged files, a full disk) raises a
subclass of `KimiJaxError`. A command line catches this one class, prints `error: <message>` on one line and exits
with the error's `exit_code`: 2 for what the user can fix in their input (the default), 1 for an output that could
not be written. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_WRITE = 1


class KimiJaxError(Exception):
    """An expected failure: one `error:` line, exit status `exit_code`."""

    exit_code = EXIT_USAGE


class UsageError(KimiJaxError, ValueError):
    """Bad flags, paths or settings of a command line."""


class WriteError(KimiJaxError, RuntimeError):
    """An output that could not be written (a full disk, permissions): not the user's input."""

    exit_code = EXIT_WRITE


def one_line(e: BaseException) -> str:
    """The message of `e` with its whitespace folded onto one line."""
    return " ".join(str(e).split())


def report(e: KimiJaxError) -> int:
    """Print `error: <message>` for an expected failure; -> its exit status."""
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return e.exit_code


__all__ = ["EXIT_USAGE", "EXIT_WRITE", "KimiJaxError", "UsageError", "WriteError", "one_line", "report"]
