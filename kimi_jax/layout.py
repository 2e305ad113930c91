"""How the decoder layers are grouped into scanned runs, derived from the config's layer schedule alone.

A *segment* is `repeats` back-to-back copies of a *cycle* of `period` consecutive layers; its parameters are stacked
over the repeats and applied with one `jax.lax.scan`, so compile time grows with the number of distinct segments,
not with depth. The planner is greedy: at each layer it takes the (period, repeats) that covers the most layers
(ties: the shorter period). For Kimi-Linear-48B (MLA at 3, 7, 11, 15, 19, 23, 26; dense FFN at 0) this gives
[layer 0] + 6 x [KDA, KDA, MLA, KDA] (layers 1-24) + [layer 25] + [layer 26]; an irregular schedule simply yields
more, shorter segments.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first layer index
    period: int  # layers per cycle
    repeats: int  # cycles, stacked on the leading parameter axis

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    def layer(self, position: int, repeat: int) -> int:
        return self.start + repeat * self.period + position


def plan_segments(kinds: Sequence, max_period: int = 8) -> tuple[Segment, ...]:
    kinds = list(kinds)
    n = len(kinds)
    segments = []
    i = 0
    while i < n:
        best = (1, 1)  # (period, repeats)
        for period in range(1, min(max_period, n - i) + 1):
            cycle = kinds[i:i + period]
            repeats = 1
            while kinds[i + repeats * period:i + (repeats + 1) * period] == cycle:
                repeats += 1
            if repeats > 1 and period * repeats > best[0] * best[1]:
                best = (period, repeats)
        segments.append(Segment(i, *best))
        i += best[0] * best[1]
    return tuple(segments)


def locate(segments: Sequence[Segment], layer: int) -> tuple[int, int, int]:
    """Layer index -> (segment index, position in the cycle, repeat index)."""
    for s, seg in enumerate(segments):
        if seg.start <= layer < seg.stop:
            offset = layer - seg.start
            return s, offset % seg.period, offset // seg.period
    raise IndexError(f"layer {layer} is outside the plan")
