"""The system clock as the kernel sees it: is it disciplined by network time?

Read with ``adjtimex`` in read-only mode (one system call, no privilege): the health event and
``edge-agent doctor`` both say whether event times can be trusted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


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
