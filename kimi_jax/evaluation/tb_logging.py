"""TensorBoard scalars of an evaluation (written by kimi_jax.tb_events), and a reader for the event files (tests,
comparisons)."""

from __future__ import annotations

import glob
import os
import struct

from kimi_jax.tb_events import write_scalars

__all__ = ["read_scalars", "write_scalars"]


def _records(path: str):
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            (length,) = struct.unpack("<Q", header)
            f.read(4)  # length crc
            data = f.read(length)
            f.read(4)  # data crc
            if len(data) < length:
                return
            yield data


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file directly in ``logdir``, in the order they were written
    (by event wall time; file names only order events to the second)."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for index, data in enumerate(_records(path)):
            event = event_pb2.Event.FromString(data)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    found.append((event.wall_time, path, index, value.tag, int(event.step), float(value.simple_value)))
    out: dict[str, list[tuple[int, float]]] = {}
    for _, _, _, tag, step, value in sorted(found, key=lambda f: f[:3]):
        out.setdefault(tag, []).append((step, value))
    return out
