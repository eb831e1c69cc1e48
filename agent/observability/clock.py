"""The system clock as the kernel sees it: is it disciplined by network time?

Read with ``adjtimex`` in read-only mode (one system call, no privilege): the health event and
``edge-agent doctor`` both say whether event times can be trusted, and :class:`ClockWatch` stamps
each event's ``timequality`` with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any

from agent.contract.events import TIME_SYNCED, TIME_UNKNOWN, TIME_UNSYNCED, TimeQuality

log = logging.getLogger(__name__)


class _Timex(ctypes.Structure):
    """Linux ``struct timex`` (enough of it, with the kernel's trailing padding)."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 16),
    ]  # fmt: skip


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


@cache
def _adjtimex() -> Any:
    """libc's adjtimex, looked up once (find_library runs ldconfig: milliseconds, not for every call)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None


def kernel_clock_sync() -> tuple[bool, str] | None:
    """The kernel's NTP status (adjtimex, read only): synchronised?, detail; None if unavailable."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    timex = _Timex()  # modes 0: only read
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    synced = state != _TIME_ERROR and not timex.status & _STA_UNSYNC
    detail = (
        f"kernel adjtimex: {'synchronised' if synced else 'not synchronised'}, max error {timex.maxerror / 1e6:g} s"
    )
    return synced, detail


def kernel_time_quality() -> TimeQuality:
    """The kernel's NTP state as an event's ``timequality``."""
    kernel = kernel_clock_sync()
    if kernel is None:
        return TIME_UNKNOWN
    return TIME_SYNCED if kernel[0] else TIME_UNSYNCED


RESAMPLE_S = 1.0  # seconds an observed sync state is used for: adjtimex costs a system call
MAX_SLEW = 0.0005  # the kernel slews the clock by at most 500 ppm
STEP_S = 0.5  # a wall clock that moved this much against the monotonic clock between looks was stepped


class ClockWatch:
    """The wall clock events are stamped with, and the ``timequality`` of a stamp.

    The sync state is read at most once a second (the store stamps tens of thousands of events
    a second), and at once when the wall clock steps: the step that sets a board's clock from
    1970 is usually NTP's first answer, so the events right after it are the first ``synced``
    ones, not a second later. A step is seen as the wall clock moving against the monotonic one
    (which no one sets), so it needs no privilege and is seen in either direction.

    Every source is injectable so the tests can step a fake clock: ``wall`` (seconds since the
    epoch), ``monotonic``, ``sync`` (the state now). ``trusted`` (``fleet.clock: trusted``: a
    clock the kernel does not discipline, such as GPS or PTP) makes every stamp ``synced``.
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sync: Callable[[], TimeQuality] = kernel_time_quality,
    ) -> None:
        """Read the state once now."""
        self.wall = wall
        self._monotonic = monotonic
        self._sync = sync
        self.trusted = False
        self.steps = 0  # steps seen, and the last one's size in seconds (+ forwards)
        self.last_step_s = 0.0
        self._quality: TimeQuality = TIME_UNKNOWN
        self._offset = 0.0
        self._read_at = 0.0
        self._sample(wall(), monotonic())

    def quality(self, stamp: float) -> TimeQuality:
        """The ``timequality`` of ``stamp``, a value of :attr:`wall` just read."""
        if self.trusted:
            return TIME_SYNCED
        now = self._monotonic()
        elapsed = now - self._read_at
        stepped = stamp - now - self._offset
        # NTP slews at most 500 ppm: over a long quiet spell that alone is no step.
        if abs(stepped) >= STEP_S + MAX_SLEW * elapsed:
            self.steps += 1
            self.last_step_s = stepped
            log.warning(
                "the wall clock stepped %+.3f s (now %s): reading its sync state again",
                stepped,
                datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds"),
            )
            self._sample(stamp, now)
        elif elapsed >= RESAMPLE_S:
            self._sample(stamp, now)
        return self._quality

    def _sample(self, stamp: float, now: float) -> None:
        before = self._quality
        self._quality = self._sync()
        self._read_at = now
        self._offset = stamp - now
        if self._quality != before:
            log.info("the clock's state for event times is now %s (timequality)", self._quality)
