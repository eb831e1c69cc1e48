"""The set of sequence numbers a stream delivered, kept as ranges: a day of events is a few intervals."""

from __future__ import annotations

import bisect


class SeqSet:
    """Sorted, disjoint, inclusive ranges ``[lo, hi]`` of the seqs received."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self._lo, seq) - 1
        return i >= 0 and seq <= self._hi[i]

    def add(self, seq: int) -> bool:
        """Record ``seq``; False if it was already there."""
        if self._hi and seq == self._hi[-1] + 1:  # the usual case: the next one
            self._hi[-1] = seq
            self._join(len(self._hi) - 1)
            return True
        i = bisect.bisect_right(self._lo, seq) - 1
        if i >= 0 and seq <= self._hi[i]:
            return False
        if i >= 0 and seq == self._hi[i] + 1:
            self._hi[i] = seq
            self._join(i)
        elif i + 1 < len(self._lo) and seq == self._lo[i + 1] - 1:
            self._lo[i + 1] = seq
        else:
            self._lo.insert(i + 1, seq)
            self._hi.insert(i + 1, seq)
        return True

    def _join(self, i: int) -> None:
        if i + 1 < len(self._lo) and self._hi[i] + 1 == self._lo[i + 1]:
            self._hi[i] = self._hi.pop(i + 1)
            del self._lo[i + 1]

    @property
    def first(self) -> int | None:
        return self._lo[0] if self._lo else None

    @property
    def last(self) -> int | None:
        return self._hi[-1] if self._hi else None

    def holes(self) -> list[tuple[int, int]]:
        """The missing ranges between the first and the last seq received."""
        return [(self._hi[i] + 1, self._lo[i + 1] - 1) for i in range(len(self._lo) - 1)]

    def missing(self) -> int:
        """How many seqs the holes hold."""
        return sum(b - a + 1 for a, b in self.holes())


def ranges_text(ranges: list[tuple[int, int]], limit: int = 10) -> str:
    """``3-5, 9`` (at most ``limit`` ranges, then ``... (+N more)``)."""
    shown = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        shown.append(f"... (+{len(ranges) - limit} more)")
    return ", ".join(shown)
