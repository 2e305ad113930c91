"""How failures of orbax reads and writes reach users: one line naming the folder and the array, no echoes.

orbax and tensorstore report a damaged or unwritable checkpoint with exceptions whose text is a dump of the
TensorStore spec, log the same failure again through absl from their own threads, and leave abandoned coroutines,
tasks and futures that report it once more when collected. `orbax_reading` turns a failed read into one error of the
caller's class (`describe_orbax_failure` says which array and what is wrong with it), `storage_os_error` turns a
failed write of the storage back into the OSError it is, and `drop_orbax_failure_echoes` / `HeldLogRecords` keep the
echoes off the terminal, so the caller's one line is all a user sees.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import warnings
from typing import Iterator, Mapping

import jax
import orbax.checkpoint as ocp

from kimi_jax.safe_io import storage_error


# tensorstore reports a failed write as ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28']").
_TS_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def storage_os_error(e: BaseException, directory: str) -> OSError | None:
    """The OSError (errno, its text, `directory`) behind tensorstore's wrapped report of a failed write of the storage,
    so that callers see an ordinary full disk; None for anything else (an OSError already, a cancel, a bug)."""
    if isinstance(e, OSError) or not isinstance(e, Exception) or not storage_error(e):
        return None
    match = _TS_OS_ERROR.search(str(e))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), os.path.abspath(directory))


# tensorstore's message for one array: 'OUT_OF_RANGE: Error reading "KEY/0.0" in OCDBT database at local file "DIR":
# DETAIL'. orbax wraps it in exceptions whose text is a dump of the TensorStore spec, useless to a user.
_TS_ARRAY = re.compile(r'Error (?:reading|writing) "([^"]+?)(?:/[\d.]+)?"')
_TS_DETAIL = re.compile(r'(?:local file|database at [^"]*) "[^"]*": (.*)$')
_TRUNCATED = re.compile(r"OUT_OF_RANGE|is not valid for value of size|unexpected end|truncated", re.IGNORECASE)
_CORRUPT = re.compile(r"DATA_LOSS|decompress|corrupt|checksum|frame descriptor|invalid|parse|malformed",
                      re.IGNORECASE)


def _causes(e: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def describe_orbax_failure(e: BaseException) -> str:
    """One line for a failed orbax read: the array and what is wrong with it where tensorstore says, else the
    innermost message (never orbax's TensorStore spec dumps)."""
    chain = _causes(e)
    for cause in chain:
        text = " ".join(str(cause).split())
        match = _TS_ARRAY.search(text)
        if match is None:
            continue
        detail = _TS_DETAIL.search(text)
        detail = detail.group(1) if detail else text
        kind = ("a failing or full storage" if storage_error(cause) else "truncated data" if _TRUNCATED.search(text)
                else "corrupt data" if _CORRUPT.search(text) else "unreadable data")
        return f"array '{match.group(1)}': {kind} ({detail[:200]})"
    inner = chain[-1]
    text = " ".join(f"{type(inner).__name__}: {inner}".split())
    return text if len(text) <= 300 else text[:300] + "..."


class HeldLogRecords(logging.Filter):
    """Holds back the WARNING+ records of one logger (orbax logs through absl) until `release(emit)`."""

    def __init__(self, name: str = "absl"):
        super().__init__()
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.records.append(record)
        return False

    def release(self, emit: bool) -> None:
        self.logger.removeFilter(self)
        records, self.records = self.records, []
        for record in records if emit else ():
            self.logger.handle(record)


def _from_orbax(exc: BaseException | None) -> bool:
    """Whether `exc` was raised in orbax's code (its traceback passes through an orbax module)."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


# tensorstore's errors start with an absl status code ("RESOURCE_EXHAUSTED: Error writing ...").
_TS_STATUS = re.compile(r"^(OUT_OF_RANGE|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|INVALID_ARGUMENT|NOT_FOUND|DATA_LOSS|"
                        r"UNKNOWN|INTERNAL|ABORTED|CANCELLED|UNAVAILABLE|PERMISSION_DENIED|ALREADY_EXISTS|"
                        r"DEADLINE_EXCEEDED|UNIMPLEMENTED): ")


class _DropAbandonedOrbaxTasks(logging.Filter):
    """asyncio's "Task/Future exception was never retrieved" for orbax's abandoned reads and writes: raised in
    orbax's code, or a tensorstore error handed to an asyncio future (which has no traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "never retrieved" not in record.getMessage():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (_from_orbax(exc) or (exc is not None and _TS_STATUS.match(str(exc))))


def drop_orbax_failure_echoes() -> None:
    """From now on, drop (only) the echoes of a failed orbax read or write.

    On the first failure orbax closes its event loop while tensorstore finishes the other reads/writes it had
    started; each one then reports "Event loop is closed" through sys.unraisablehook (hundreds of tracebacks for a
    large checkpoint, from background threads, some before and some after the caller learns of the failure), and
    orbax's abandoned coroutines, tasks and futures report their exceptions again when they are collected
    (sys.unraisablehook, the asyncio logger, unawaited-coroutine warnings), often at exit. The caller reports the failure itself in one line, so
    these are noise. Call it before a background write starts; a no-op while the filters are in place."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedOrbaxTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropAbandonedOrbaxTasks())
    # The coroutines a failed write abandons (e.g. its fragment writers) are collected unawaited, and Python warns
    # of each ("RuntimeWarning: coroutine '...' was never awaited", plus a tracemalloc hint), sometimes at exit.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    if getattr(sys.unraisablehook, "drops_orbax_failure_echoes", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        code = getattr(obj, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook.drops_orbax_failure_echoes = True
    sys.unraisablehook = hook


def quiet_abandoned_orbax_io() -> None:
    """After a failed orbax read or write: drop its echoes (`drop_orbax_failure_echoes`) and close the abandoned
    coroutines now, while the interpreter can still run their clean-up (at exit it cannot, and says so)."""
    drop_orbax_failure_echoes()
    gc.collect()


@contextlib.contextmanager
def orbax_reading(directory: str, error: type[Exception], what: str = "") -> Iterator[None]:
    """Run the orbax reads of `directory` in the block; a failure becomes one `error` naming the folder and the
    array, `what` leading the reason. orbax's log lines (e.g. "Metadata file does not exist") are dropped when the
    read fails (the error says it) and let through when it succeeds."""
    held = HeldLogRecords()
    drop_orbax_failure_echoes()  # a failed restore's other reads echo after the caller reports it
    try:
        yield
    except error:  # raised in the block, already one line (orbax may have failed and logged inside)
        held.release(emit=False)
        quiet_abandoned_orbax_io()
        raise
    except Exception as e:
        held.release(emit=False)
        quiet_abandoned_orbax_io()
        raise error(f"{directory}: {what}{describe_orbax_failure(e)}") from None
    except BaseException:
        held.release(emit=True)
        raise
    held.release(emit=True)


def read_array_metadata(directory: str, error: type[Exception],
                        what: str = "not a readable orbax checkpoint") -> dict[str, jax.ShapeDtypeStruct]:
    """{key: shape and stored dtype} of every array of the orbax PyTree checkpoint `directory`, from its metadata;
    an unreadable or empty one (a damaged or half-copied folder) is an `error` naming the folder, `what` first."""
    with orbax_reading(directory, error, f"{what}: "):
        meta = ocp.PyTreeCheckpointer().metadata(directory)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, Mapping) or not tree:
            raise error(f"{directory}: {what}: no array metadata (_METADATA or the OCDBT manifest is missing, empty "
                        f"or damaged: the folder is damaged or was not completely copied)")
        return {str(k): jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in tree.items()}
