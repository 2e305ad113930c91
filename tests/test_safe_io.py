"""kimi_jax.safe_io: overlap refusal, atomic folders and files, stale temporaries, folder locks, write errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from kimi_jax import safe_io


# ------------------------------------------------------------------------------------------------ overlap
@pytest.mark.parametrize("rel,how", [("src", "is"), ("src/sub", "lies inside"), (".", "contains")])
def test_refuse_overlap(tmp_path, rel, how):
    (tmp_path / "src").mkdir()
    with pytest.raises(safe_io.OutputError, match=f"--output .* {how} the input --hf_path"):
        safe_io.refuse_overlap(tmp_path / rel, "--output", {"--hf_path": tmp_path / "src"})


def test_refuse_overlap_through_a_link_and_allows_siblings(tmp_path):
    (tmp_path / "src").mkdir()
    os.symlink(tmp_path / "src", tmp_path / "link")
    with pytest.raises(safe_io.OutputError, match="is the input"):
        safe_io.refuse_overlap(tmp_path / "link", "--output", {"--ckpt": tmp_path / "src"})
    # A sibling whose name starts with the input's is not inside it.
    safe_io.refuse_overlap(tmp_path / "src2", "--output", {"--ckpt": tmp_path / "src", "--other": None})


# ------------------------------------------------------------------------------------------------ atomic folder
def test_atomic_folder_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with safe_io.atomic_folder(str(out), overwrite=False) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(safe_io.OutputError, match="already exists"):
        with safe_io.atomic_folder(str(out), overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with safe_io.atomic_folder(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "b"), "w").write("2")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["a"]


def test_atomic_folder_over_a_symlink_replaces_the_link_only(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    os.symlink(target, tmp_path / "out")
    notes = []
    with safe_io.atomic_folder(str(tmp_path / "out"), overwrite=True, notice=notes.append) as tmp:
        open(os.path.join(tmp, "new"), "w").write("y")
    assert not os.path.islink(tmp_path / "out") and os.listdir(tmp_path / "out") == ["new"]
    assert (target / "keep").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["out", "target"]  # no .out.old-* link left behind
    assert any("symbolic link" in n for n in notes)


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = safe_io.temporary_sibling(str(out)).rsplit("-", 2)[-2]
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}"
    stale.mkdir()
    live = tmp_path / f".out.tmp-{host}-1"  # pid 1 always runs
    live.mkdir()
    other_host = tmp_path / f".out.tmp-otherhost-{dead.pid}"
    other_host.mkdir()
    notes = []
    with safe_io.atomic_folder(str(out), overwrite=False, notice=notes.append):
        pass
    assert not stale.exists() and live.exists() and other_host.exists()
    assert len(notes) == 1 and str(dead.pid) in notes[0]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    code = f"""
import os, sys, time
from kimi_jax import safe_io
try:
    with safe_io.sigterm_as_interrupt():
        with safe_io.atomic_folder({str(tmp_path / 'out')!r}, overwrite=False) as tmp:
            open(os.path.join(tmp, 'x'), 'w').write('x')
            print('ready', flush=True)
            time.sleep(60)
except KeyboardInterrupt as e:
    sys.exit(safe_io.interrupt_exit_code(e))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ files
def test_write_json_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "r.json")
    safe_io.write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        safe_io.write_json_atomic(path, {"a": float("nan")})
    assert open(path).read() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["r.json"]


def test_describe_write_error():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert safe_io.storage_error(full)
    assert safe_io.describe_write_error(full, "/x/y") == "no space left on device writing /x/y"
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = ValueError("tensorstore: ... No space left on device [OS error 28]")
    assert safe_io.storage_error(wrapped)
    assert safe_io.describe_write_error(wrapped, "/x") == "no space left on device writing /x"
    assert not safe_io.storage_error(ValueError("shape mismatch"))


# ------------------------------------------------------------------------------------------------ locks
def test_folder_lock_is_exclusive_and_reports_a_dead_holder(tmp_path):
    folder = str(tmp_path / "run")
    code = f"""
import sys, time
from kimi_jax import safe_io
safe_io.FolderLock({folder!r}).acquire()
print('locked', flush=True)
time.sleep(60)
"""
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(safe_io.OutputError, match=f"in use by another run .*pid {holder.pid}"):
            safe_io.FolderLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    notes = []
    with safe_io.FolderLock(folder, notice=notes.append):
        assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer runs" in notes[0]
    notes.clear()
    with safe_io.FolderLock(folder, notice=notes.append):  # a clean release leaves nothing to report
        pass
    assert notes == []


def test_a_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("keep")
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".out.tmp-"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        with safe_io.atomic_folder(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").write("x")
    assert os.listdir(tmp_path) == ["out"] and (out / "old").read_text() == "keep"


def test_interrupts_during_the_final_renames_are_deferred(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_rename = os.rename

    def rename(src, dst):  # Ctrl-C arrives between the two renames
        real_rename(src, dst)
        if os.path.basename(str(dst)).startswith(".out.old-"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with safe_io.atomic_folder(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").write("x")
    assert os.listdir(out) == ["new"]  # the new output is in place, the interrupt came after
    assert os.listdir(tmp_path) == ["out"]  # and the replaced one is gone
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_describe_write_error_prefers_the_os_words():
    e = ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [OS error 28]")
    assert safe_io.describe_write_error(e, "/d") == "no space left on device writing /d"
