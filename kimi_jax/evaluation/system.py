"""Run identity for evaluation results: code version, hardware, peak memory, timing helpers."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from typing import Any, Callable

__all__ = ["code_version", "device_peak_bytes", "hardware", "peak_memory", "timed", "utc_timestamp"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """{"git_commit", "git_dirty", "package_version"}: the commit of the checkout the code runs from (None outside
    a git checkout), whether tracked files differ from it, and the installed kimi-jax version."""
    import importlib.metadata

    try:
        package = importlib.metadata.version("kimi-jax")
    except importlib.metadata.PackageNotFoundError:
        package = None
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"git_commit": commit, "git_dirty": dirty, "package_version": package}


def hardware() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind if devices else None,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(), "host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "jax_version": jax.__version__}


def device_peak_bytes() -> int | None:
    """The largest `memory_stats()["peak_bytes_in_use"]` over the local devices, or None where the backend does not
    report it (CPU)."""
    import jax

    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def peak_memory() -> dict[str, Any]:
    """{"peak_bytes", "source"}: `device_peak_bytes()` where the backend reports it ("device_memory_stats"), else the
    process's peak RSS from getrusage ("host_peak_rss")."""
    peak = device_peak_bytes()
    if peak is not None:
        return {"peak_bytes": peak, "source": "device_memory_stats"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": int(rss) * (1 if sys.platform == "darwin" else 1024), "source": "host_peak_rss"}


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, wall seconds), waiting for every JAX array in the result."""
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0
