"""kimi_jax.tb_events: event files TensorBoard reads, written whole from the caller's thread."""

from __future__ import annotations

import errno
import os

import pytest

from kimi_jax import tb_events
from kimi_jax.tb_events import read_scalars


def test_event_file_round_trip_with_a_purge_marker(tmp_path):
    """A purge marker at step s hides the events written before it at steps >= s (a resumed run's view), as
    TensorBoard does; what is written after it stays."""
    events = tb_events.EventFile(str(tmp_path), flush_secs=1e9)
    events.scalar("a/b", 0.5, 1)
    events.scalar("a/b", 1.5, 3)
    events.purge_from(2)
    events.scalar("a/b", 2.5, 2)
    events.close()
    assert read_scalars(str(tmp_path)) == {"a/b": [(1, 0.5), (2, 2.5)]}
    path = tb_events.write_scalars(str(tmp_path / "x"), {"t": 2.0, "none": None, "nan": float("nan")}, step=7)
    assert os.path.dirname(path) == str(tmp_path / "x")
    assert read_scalars(str(tmp_path / "x")) == {"t": [(7, 2.0)]}


def test_a_failed_append_leaves_no_torn_record_and_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "log")
    log = tb_events.AppendOnlyFile(path)
    log.append(b"first\n")
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up in the middle of a record
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as e:
        log.append(b"second record\n")
    monkeypatch.undo()
    log.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == path
    assert open(path, "rb").read() == b"first\n"


def test_an_event_file_whose_header_does_not_fit_is_not_left_behind(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        tb_events.write_scalars(str(tmp_path), {"t": 1.0}, step=0)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
