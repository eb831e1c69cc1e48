"""The fleet benchmark's view of the broker: Mosquitto's log, tailed and time-stamped as it is written.

Mosquitto stamps its log lines in whole seconds only. Its log file is flushed line by line, so a
thread that reads the file every few milliseconds stamps each line with the bench's own clock
(``time.time()``) to within that period; the broker's own second is kept for a cross-check. The
CONNECT figures of the restart phase come from the ``New client connected from ... as <id>``
lines (``connection_messages true``): one per CONNECT the broker accepted. Refused TCP
connections while the broker is down never reach it and are not counted.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL = 0.005  # s between reads of the log file: the resolution of the bench's stamps
_CONNECTED = re.compile(r"^(\d+): New client connected from \S+ as (\S+) \(")
_RUNNING = re.compile(r"^(\d+): mosquitto version \S+ running")


@dataclass(frozen=True)
class Line:
    stamp: float  # the bench's clock when the line was read
    broker_second: int  # the broker's own stamp (whole seconds)
    text: str


class BrokerLog:
    """Reads ``path`` as the broker appends to it (across restarts: the file is opened for append)."""

    def __init__(self, path: Path) -> None:
        import time

        self._time = time.time
        self.path = path
        path.touch()
        self.lines: list[Line] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        with self.path.open("rb") as f:
            while not self._stop.is_set():
                data = f.read()
                if not data:
                    self._stop.wait(POLL)
                    continue
                now = self._time()
                pending += data
                *complete, pending = pending.split(b"\n")
                got = []
                for raw in complete:
                    text = raw.decode(errors="replace")
                    second, _, _ = text.partition(":")
                    got.append(Line(now, int(second) if second.isdigit() else 0, text))
                with self._lock:
                    self.lines.extend(got)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def snapshot(self) -> list[Line]:
        with self._lock:
            return list(self.lines)

    def connects(self, prefix: str, since: float = 0.0) -> list[tuple[float, str]]:
        """(stamp, client id) of every accepted CONNECT of a client whose id starts with ``prefix``."""
        found = []
        for line in self.snapshot():
            if line.stamp < since:
                continue
            m = _CONNECTED.match(line.text)
            if m and m.group(2).startswith(prefix):
                found.append((line.stamp, m.group(2)))
        return found

    def started(self, since: float) -> float | None:
        """The stamp of the first ``running`` line at or after ``since`` (the broker accepts from then)."""
        for line in self.snapshot():
            if line.stamp >= since and _RUNNING.match(line.text):
                return line.stamp
        return None

    def lines_matching(self, since: float, *words: str) -> Counter[str]:
        """How many lines after ``since`` contain each of ``words`` (disconnect reasons and the like)."""
        counts: Counter[str] = Counter()
        for line in self.snapshot():
            if line.stamp >= since:
                for w in words:
                    if w in line.text:
                        counts[w] += 1
        return counts


def max_in_window(stamps: list[float], width: float) -> int:
    """The most stamps inside any window ``width`` seconds long (closed at both ends)."""
    s = sorted(stamps)
    best, lo = 0, 0
    for hi, t in enumerate(s):
        while t - s[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def storm(connects: list[tuple[float, str]], t0: float, fleet: int) -> dict[str, Any]:
    """The shape of the reconnection after a broker started at ``t0``: per second, busiest, all back.

    ``connects`` are every agent CONNECT since ``t0``; a client counts as back at its first one.
    """
    first: dict[str, float] = {}
    for t, cid in connects:
        first.setdefault(cid, t)
    per_second = Counter(int(t - t0) for t, _ in connects)
    seconds = max(per_second) + 1 if per_second else 0
    histogram = [per_second.get(i, 0) for i in range(seconds)]
    delays = sorted(t - t0 for t in first.values())
    return {
        "back": len(first),
        "all_back_s": delays[-1] if len(first) >= fleet and delays else None,
        "last_back_s": delays[-1] if delays else None,
        "median_back_s": delays[len(delays) // 2] if delays else None,
        "histogram": histogram,
        "busiest_second": max(histogram) if histogram else 0,
        "busiest_1s_window": max_in_window([t for t, _ in connects], 1.0),
        "connects": len(connects),
        "again": sum(1 for n in Counter(cid for _, cid in connects).values() if n > 1),
    }


def per_client(connects: list[tuple[float, str]]) -> dict[str, Any]:
    """Per client id over the whole run: the most CONNECTs in any 1 s and any 60 s window."""
    by_client: dict[str, list[float]] = {}
    for t, cid in connects:
        by_client.setdefault(cid, []).append(t)
    in_1s = {cid: max_in_window(ts, 1.0) for cid, ts in by_client.items()}
    in_60s = {cid: max_in_window(ts, 60.0) for cid, ts in by_client.items()}
    return {
        "clients": len(by_client),
        "max_1s": max(in_1s.values(), default=0),
        "over_1_per_s": sorted(cid for cid, n in in_1s.items() if n > 1),
        "max_60s": max(in_60s.values(), default=0),
        "over_15_per_min": sorted(cid for cid, n in in_60s.items() if n > 15),
        "most_connects": max((len(ts) for ts in by_client.values()), default=0),
    }
