"""How kimi_jax's commands treat the files of their users: one place for each rule.

* An output never is, contains or lies inside one of the command's inputs (`refuse_overlap`), whatever the flags.
* Outputs appear whole or not at all: files are written to a temporary sibling and renamed (`write_text_atomic`,
  `write_json_atomic`), folders are built as a hidden sibling and renamed into place (`atomic_folder`).
* Temporaries carry the host and the process id in their names (`.NAME.tmp-HOST-PID`). They are removed on every
  exit path a process can see (errors, Ctrl-C, SIGTERM: `sigterm_as_interrupt`); what a SIGKILL leaves behind is
  found by the next run, which removes it only when that process is gone and says so (`remove_stale_temporaries`).
* A run that writes into a folder over a long time holds an exclusive lock on it (`FolderLock`); a lock left by a
  dead process is detected and reported, never silently taken over from a live one.
* A failed write (a full disk, a quota, a read-only file system) becomes one sentence naming the path
  (`describe_write_error`), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import Callable, Iterator, Mapping

from kimi_jax.errors import KimiJaxError

EXIT_SIGINT, EXIT_SIGTERM = 130, 143
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname() or "host")[:40]
# Errors of the storage rather than of the program: a full disk, a quota, a read-only or failing file system.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}
# The operating system's words first: tensorstore wraps "No space left on device" in a RESOURCE_EXHAUSTED status.
_STORAGE_PHRASES = ("no space left on device", "disk quota exceeded", "read-only file system", "file too large",
                    "input/output error", "resource_exhausted")


class OutputError(KimiJaxError, ValueError):
    """An output path that would overwrite or sit inside an input, or that cannot be written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs; commands exit with 143 for it."""


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT


def interrupt_name(e: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------ overlap
def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip(os.sep) + os.sep)


def refuse_overlap(output: str | os.PathLike, flag: str, inputs: Mapping[str, str | os.PathLike | None],
                   error: type[Exception] = OutputError) -> None:
    """Raise `error` when `output` is, contains or lies inside one of `inputs` ({flag: path}; None is skipped).

    Paths are compared after resolving symbolic links, so a link to an input is caught too."""
    out = _real(output)
    for in_flag, path in inputs.items():
        if path is None:
            continue
        inp = _real(path)
        if out == inp:
            how = "is"
        elif _inside(out, inp):
            how = "lies inside"
        elif _inside(inp, out):
            how = "contains"
        else:
            continue
        raise error(f"{flag} {os.fspath(output)} {how} the input {in_flag} {os.fspath(path)}; choose an output "
                    f"outside the inputs (nothing was written)")


def check_writable_location(folder: str, flag: str, error: type[Exception] = OutputError,
                            shown: str | None = None) -> None:
    """Files can be created in `folder` (the folder an output is written into: an output folder itself, or the
    parent of an output file), existing or to be created: the nearest existing folder at or above it is a folder
    this process may write into. Checked before any work, so a bad output fails at once; `shown` is the output the
    message names (default `folder`)."""
    shown = folder if shown is None else shown
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise error(f"{flag} {shown}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{flag} {shown}: {existing} is not writable")


# ------------------------------------------------------------------------------------------------ temporaries
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def temporary_sibling(final: str, kind: str = "tmp") -> str:
    """`.NAME.KIND-HOST-PID` next to `final` (KIND: tmp for what is being built, old for what is being replaced)."""
    final = os.path.abspath(final)
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{kind}-{_HOST}-{os.getpid()}")


def _stale_siblings(final: str) -> list[tuple[str, int]]:
    final = os.path.abspath(final)
    parent, name = os.path.dirname(final), os.path.basename(final)
    pattern = re.compile(r"^\." + re.escape(name) + r"\.(?:tmp|old)-" + re.escape(_HOST) + r"-(\d+)$")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for entry in sorted(names):
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            found.append((os.path.join(parent, entry), int(match.group(1))))
    return found


def remove_path(path: str) -> None:
    """Remove a file, a symbolic link (never what it points to) or a folder tree; missing is fine."""
    if os.path.islink(path) or os.path.isfile(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(final: str, notice: Callable[[str], None] | None = None) -> list[str]:
    """Remove the temporaries of `final` left by processes of this host that no longer run (a SIGKILL, a crash).
    Those of live processes (another run in progress) and of other hosts are left alone. Returns what was removed."""
    removed = []
    for path, pid in _stale_siblings(final):
        remove_path(path)
        removed.append(path)
        if notice is not None:
            notice(f"removed {path}, a temporary left by process {pid}, which no longer runs")
    return removed


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM are recorded and raised (`KeyboardInterrupt` / `Terminated`) only when it
    ends without an error of its own: steps that must not be cut in half (the renames that put a finished output in
    place) run whole. A no-op outside the main thread, which alone receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def atomic_folder(output: str, *, overwrite: bool, flag: str = "--output", error: type[Exception] = OutputError,
                  notice: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a temporary sibling folder; when the block succeeds it replaces `output` in one rename, otherwise (an
    error, Ctrl-C, SIGTERM under `sigterm_as_interrupt`) it is removed and `output` is untouched.

    An existing `output` is refused (`error`) unless `overwrite`; it is moved aside just before the final rename (both
    renames run with interrupts deferred, and it is moved back should the second fail) and deleted only once the new
    folder is in place. When `output` is a symbolic link, the link is replaced and what it points to is left
    untouched. Failures of the storage itself (a full disk) propagate as the OSError they are."""
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    exists = os.path.lexists(output)
    if exists and not overwrite:
        raise error(f"{flag} {output} already exists; pass --overwrite to replace it")
    if exists and not os.path.islink(output) and not os.path.isdir(output):
        raise error(f"{flag} {output} exists and is not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        if storage_error(e):
            raise
        raise error(f"{flag} {output}: cannot create its parent folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise error(f"{flag} {output}: parent folder {parent} is not writable")
    remove_stale_temporaries(output, notice)
    tmp = temporary_sibling(output, "tmp")
    remove_path(tmp)
    os.makedirs(tmp)
    old = None
    try:
        yield tmp
        with deferred_interrupts():
            if os.path.lexists(output):
                old = temporary_sibling(output, "old")
                remove_path(old)
                os.rename(output, old)
            try:
                os.rename(tmp, output)
            except BaseException:
                if old is not None:
                    os.rename(old, output)
                    old = None
                raise
    except BaseException:
        remove_path(tmp)
        raise
    finally:  # the replaced output goes once the new one is in place, also when an interrupt waited for the renames
        if old is not None:  # (cut short here, it is a stale temporary that the next run removes)
            if os.path.islink(old) and notice is not None:
                notice(f"replaced the symbolic link {output} (what it pointed to, {os.path.realpath(old)}, is "
                       f"untouched)")
            remove_path(old)


# ------------------------------------------------------------------------------------------------ files
def read_utf8(path: str, error: type[Exception], *, missing: str | None = None, advice: str = "") -> str:
    """The text of `path` (a leading byte-order mark dropped). A missing or unreadable file, or bytes that are not
    UTF-8, are one `error` naming the file (and the line and byte of the first bad byte), `advice` appended."""
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(missing or f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start})"
                    f"{advice}") from None
    return text[1:] if text.startswith("\ufeff") else text


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()  # what open() would give: mkstemp's files are private (0600)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Temp file in the same folder, fsync, os.replace: readers see the old or the new content, never a part; the
    temp file is removed on every exit path."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, data, *, allow_nan: bool = False) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=allow_nan) + "\n")


def _storage_phrase(text: str) -> str | None:
    text = text.lower()
    return next((phrase for phrase in _STORAGE_PHRASES if phrase in text), None)


def storage_error(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a failure of the storage: full, over quota, read-only, failing."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return True
        if _storage_phrase(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def describe_write_error(e: BaseException, path: str) -> str:
    """One sentence for a failed write to `path`."""
    seen = set()
    cur = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return f"{os.strerror(cur.errno).lower()} writing {path}"
        phrase = _storage_phrase(str(cur))
        if phrase:
            return f"{phrase} writing {path}"
        cur = cur.__cause__ or cur.__context__
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return f"cannot write {path} ({text[:300]})"


class Writes:
    """What a run has put on disk, so that an interrupt or a failed write is reported truthfully: `done` (files and
    folders complete) and the one being written (`begin` ... `finish`). An interrupt can land between a file's
    atomic replace and `finish`, so `describe` asks the disk whether the file in progress was replaced."""

    def __init__(self):
        self.done: list[str] = []
        self.current: tuple[str, str] | None = None  # (path, kind): kind "json" (atomic) or "tensorboard"
        self._before: tuple[int, int] | None = None

    def begin(self, path: str, kind: str) -> None:
        self.current, self._before = (path, kind), _identity(path)

    def finish(self) -> None:
        if self.current is not None:
            self.done.append(self.current[0])
        self.current = self._before = None

    def describe(self, nothing: str = "no output file was written") -> str:
        done, parts = list(self.done), []
        if self.current is not None:
            path, kind = self.current
            if kind == "json" and _identity(path) not in (None, self._before):  # the replace happened
                done.append(path)
            elif kind == "json":
                parts.append(f"{path} was not written (an earlier file there is unchanged)")
            else:
                parts.append(f"TensorBoard scalars in {path} may be incomplete")
        if done:
            parts.insert(0, "wrote " + ", ".join(done))
        return "; ".join(parts) if parts else nothing


def run_command(run, argv, writes: "Writes", nothing: str = "no output file was written") -> int:
    """A command's main(): `run(argv, writes)` with SIGTERM raised like Ctrl-C; an expected failure (a KimiJaxError)
    becomes one `error:` line and its exit code; Ctrl-C (130) and SIGTERM (143) one line saying which of the
    command's files were written before they came."""
    from kimi_jax.errors import KimiJaxError, report

    try:
        with sigterm_as_interrupt():
            return run(argv, writes)
    except KimiJaxError as e:
        return report(e)
    except KeyboardInterrupt as e:
        print(f"error: {interrupt_name(e)}; {writes.describe(nothing)}", file=sys.stderr)
        return interrupt_exit_code(e)


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none: an atomic replace gives it a new inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ------------------------------------------------------------------------------------------------ locks
class FolderLock:
    """An exclusive lock on a folder for the life of a process: `{folder}/.lock`, held with `fcntl.flock` (the
    kernel releases it when the process dies, however it dies) and holding "host pid" of the holder.

    `acquire()` raises `error` when another live process holds it. A lock file whose holder is gone (a crash or a
    SIGKILL) is reported through `notice` and taken over."""

    NAME = ".lock"

    def __init__(self, folder: str, *, flag: str = "--output_dir", error: type[Exception] = OutputError,
                 notice: Callable[[str], None] | None = None):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, self.NAME)
        self.flag, self.error, self.notice = flag, error, notice
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(self.ATTEMPTS):
            fd = self._lock_file()
            if fd is not None:
                break
        else:
            raise self.error(f"{self.flag} {self.folder}: {self.path} keeps being replaced while it is locked")
        previous = _read_holder(fd)
        if previous and self.notice is not None:
            self.notice(f"{self.path} was left by {previous}, which no longer runs: taking it over")
        try:  # who holds it, for the message of a run refused; the lock itself holds without it (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        except OSError as e:
            if not storage_error(e):
                os.close(fd)
                raise
        self._fd = fd
        return self

    ATTEMPTS = 10

    def _lock_file(self) -> int | None:
        """Open and lock the lock file; None when it was unlinked or replaced between the open and the lock (a run
        that removes the lock file of a folder it is abandoning unlinks it while holding it): try again."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise self.error(f"{self.flag} {self.folder} is in use by another run ({holder or 'unknown process'}"
                                 f" holds {self.path}); wait for it to finish or choose another {self.flag}") from None
            raise self.error(f"{self.flag} {self.folder}: cannot lock {self.path} ({e.strerror})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an empty lock file means "released cleanly"
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


__all__ = ["EXIT_SIGINT", "EXIT_SIGTERM", "FolderLock", "OutputError", "Terminated", "Writes", "atomic_folder",
           "check_writable_location", "deferred_interrupts", "describe_write_error", "interrupt_exit_code",
           "interrupt_name", "pid_alive", "read_utf8", "refuse_overlap", "remove_path", "remove_stale_temporaries",
           "run_command", "sigterm_as_interrupt", "storage_error", "temporary_sibling", "write_json_atomic",
           "write_text_atomic"]
