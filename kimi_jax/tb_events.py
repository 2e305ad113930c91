"""TensorBoard event files written from the caller's thread, whole records only.

tensorboardX's SummaryWriter writes from a background thread: on a write error (a full disk) that thread dies with a
traceback, the caller hears nothing, and the writer's bounded queue can then block it. Here every write happens in
the caller's thread (tensorboardX's record format and protobufs, so TensorBoard and tensorboardX read the files), a
failed append is cut off again so no file ends in a torn record, and the failure is an ordinary OSError naming the
file for the caller to report in one line.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import math
import os
import socket
import struct
import time
import uuid
from typing import Iterable, Mapping

EVENT_FILE_PREFIX = "events.out.tfevents."


class AppendOnlyFile:
    """An append-only file whose every `append` lands whole or not at all (a failed write is cut off again); failures
    are OSErrors naming the file."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def _failed(self, e: OSError) -> OSError:
        return OSError(e.errno, e.strerror, self.path)

    def append(self, data: bytes) -> None:
        if not data:
            return
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise self._failed(e) from None

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            if e.errno != errno.EINVAL:  # a file that cannot be synced (a pipe, /dev/...)
                raise self._failed(e) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class EventFile:
    """A TensorBoard event file in `log_dir` (tensorboardX's name, plus `suffix`): events are framed in memory and
    appended every `flush_secs` and on `flush()`, from the caller's thread."""

    def __init__(self, log_dir: str, flush_secs: float = 10, suffix: str = ""):
        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
        name = f"{EVENT_FILE_PREFIX}{str(time.time())[:10]}.{socket.gethostname()}{suffix}"
        self._file = AppendOnlyFile(os.path.join(log_dir, name))
        self._pending = bytearray()
        self._flush_secs = flush_secs
        self._next_flush = 0.0  # the first events go out at once
        try:
            self.write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        except OSError:  # not even the header fits: leave no empty event file behind
            self._file.close()
            with contextlib.suppress(OSError):
                os.remove(self._file.path)
            raise

    @property
    def path(self) -> str:
        return self._file.path

    def write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._pending += header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack(
            "<I", masked_crc32c(data))
        if time.time() >= self._next_flush:
            self.flush()

    def purge_from(self, step: int) -> None:
        """TensorBoard hides the events of earlier files at steps >= `step` (a resumed run's killed tail)."""
        pb = self._event_pb2
        self.write(pb.Event(wall_time=time.time(), step=step, session_log=pb.SessionLog(status=pb.SessionLog.START)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self.write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=scalar(tag, value)))

    def flush(self) -> None:
        pending, self._pending = bytes(self._pending), bytearray()
        self._file.append(pending)
        self._next_flush = time.time() + self._flush_secs

    def close(self, flush: bool = True) -> None:
        try:
            if flush:
                self.flush()
                self._file.sync()
        finally:
            self._file.close()


def write_scalars(log_dir: str, scalars: Mapping[str, float | None], step: int) -> str:
    """Every finite scalar at global step `step`, into a new event file of its own under `log_dir` (a unique suffix:
    tensorboardX's names only go to the second and the host); returns the file's path."""
    os.makedirs(log_dir, exist_ok=True)
    events = EventFile(log_dir, suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        for tag, value in scalars.items():
            if value is not None and math.isfinite(float(value)):
                events.scalar(tag, float(value), int(step))
        events.close()
    except BaseException:
        events.close(flush=False)
        raise
    return events.path


# ------------------------------------------------------------------------------------------------------ reading
def iter_records(path: str) -> Iterable[bytes]:
    """The payloads of a TFRecord file (length, masked CRC, data, masked CRC); a torn tail ends the iteration."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            yield data


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files directly in `log_dir` (one TensorBoard run), in the order
    they were written (by event wall time, then file, then position: file names order files only to the second),
    honouring purge markers as TensorBoard does: a SessionLog START at step s (a resumed run's first event) hides
    the events written before it at steps >= s."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for index, data in enumerate(iter_records(path)):
            event = event_pb2.Event.FromString(data)
            events.append((event.wall_time, path, index, event))
    out: dict[str, list[tuple[int, float]]] = {}
    for *_, event in sorted(events, key=lambda e: e[:3]):
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            for tag in out:
                out[tag] = [(s, v) for s, v in out[tag] if s < event.step]
            continue
        if event.HasField("summary"):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


__all__ = ["AppendOnlyFile", "EventFile", "iter_records", "read_scalars", "write_scalars"]
