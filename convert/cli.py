"""Shared plumbing for the convert commands: one-line errors, atomic output folders, files copied alongside."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

# Copied next to converted weights so every output folder is self-contained.
SIDECAR_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json")


class UsageError(Exception):
    """Bad flags or paths: reported as one line, exit status 2."""


def run_main(main, argv=None) -> int:
    """Run `main(argv)`, turning expected failures into one line on stderr and a non-zero exit."""
    from convert.safetensors_io import CheckpointError
    from kimi_jax.checkpoint import CheckpointFormatError
    from kimi_jax.config import ConfigError

    try:
        return main(argv) or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was left behind", file=sys.stderr)
        return 130


def require_folder(path: str, flag: str) -> str:
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such folder")
    return path


@contextlib.contextmanager
def atomic_output(output: str, overwrite: bool, flag: str = "--output"):
    """Yield a temporary sibling folder; on success it replaces `output` in one rename, on failure it is removed.

    An existing `output` is refused unless `overwrite`; it is only deleted after the new folder is complete.
    """
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    if os.path.exists(output) and not overwrite:
        raise UsageError(f"{flag} {output} already exists; pass --overwrite to replace it")
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"{flag} {output} exists and is not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {output}: cannot create its parent folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {output}: parent folder {parent} is not writable")
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(output):
        old = os.path.join(parent, f".{os.path.basename(output)}.old-{os.getpid()}")
        os.rename(output, old)
    os.rename(tmp, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


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
