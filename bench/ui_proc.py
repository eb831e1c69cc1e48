"""What a process costs, read from /proc: RSS, CPU time, and RSS sampled over a run (peak, slope).

Helpers for bench/ui.py; no psutil, so the figures mean exactly what the kernel reports.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS (has it exited?)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of all the process's threads, in seconds."""
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute; 0 for fewer than 2 points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 60


class CpuWindow:
    """CPU used by some processes between start() and stop(), as % of one core."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start: tuple[float, list[float]] = (0.0, [])
        self.percent: list[float] = []

    def start(self) -> None:
        self._start = (time.monotonic(), [cpu_seconds(p) for p in self.pids])

    def stop(self) -> list[float]:
        began, used = self._start
        wall = time.monotonic() - began
        self.percent = [(cpu_seconds(p) - u) / wall * 100 for p, u in zip(self.pids, used, strict=True)]
        return self.percent


class RssSampler(threading.Thread):
    """Samples the RSS of some processes every ``every`` seconds until stopped."""

    def __init__(self, pids: list[int], every: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.every = every
        self.samples: list[tuple[float, list[int]]] = []  # (seconds since start, KiB per pid)
        self._stop_event = threading.Event()
        self._began = time.monotonic()

    def run(self) -> None:
        self._began = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - self._began, [rss_kib(p) for p in self.pids]))
            if self._stop_event.wait(self.every):
                return

    def finish(self) -> None:
        """Stop, taking one last sample."""
        self._stop_event.set()
        self.join(10)
        self.samples.append((time.monotonic() - self._began, [rss_kib(p) for p in self.pids]))

    def series(self, index: int) -> list[tuple[float, float]]:
        """(seconds, KiB) of one process."""
        return [(t, float(kib[index])) for t, kib in self.samples]

    def difference(self, a: int, b: int) -> list[tuple[float, float]]:
        """(seconds, KiB of process a minus process b) at each sample."""
        return [(t, float(kib[a] - kib[b])) for t, kib in self.samples]
