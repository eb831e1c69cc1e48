"""The system clock: plausible, and synchronised to network time (timedatectl, else the kernel)."""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from datetime import UTC, datetime

from agent.tools.doctor.report import Row

EARLIEST_YEAR = 2024  # a clock before this is certainly wrong (no RTC, no network time yet)


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


def kernel_clock_sync() -> tuple[bool, str] | None:
    """The kernel's NTP status (adjtimex, read only): synchronised?, detail; None if unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        adjtimex = libc.adjtimex
    except (OSError, AttributeError):
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


def clock_sync_status(timeout: float) -> tuple[bool | None, str]:
    """(synchronised or None if unknown, how it was found): timedatectl, else the kernel."""
    tried = []
    timedatectl = shutil.which("timedatectl")
    if timedatectl is not None:
        try:
            done = subprocess.run(  # noqa: S603 - a fixed command
                [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            answer = done.stdout.strip()
            if done.returncode == 0 and answer in ("yes", "no"):
                return answer == "yes", f"timedatectl: NTPSynchronized={answer}"
            tried.append("timedatectl gave no answer (no systemd?)")
        except (OSError, subprocess.TimeoutExpired):
            tried.append("timedatectl did not answer")
    kernel = kernel_clock_sync()
    if kernel is not None:
        return kernel
    tried.append("adjtimex unavailable")
    return None, "; ".join(tried)


def clock_row(now: datetime, synced: bool | None, how: str) -> Row:
    """Verdict on the clock: FAIL if obviously wrong, warn if not (known to be) synchronised."""
    shown = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    enable = (
        "enable network time: timedatectl set-ntp true (systemd-timesyncd) or install chrony, "
        "and let the gateway reach an NTP server (UDP 123)"
    )
    if now.year < EARLIEST_YEAR:
        return Row(
            "clock",
            "system clock",
            "FAIL",
            f"clock says {shown}: obviously wrong ({how})",
            f"set the time (timedatectl set-time 'YYYY-MM-DD HH:MM:SS' or date -s), then {enable}",
        )
    if synced is True:
        return Row("clock", "system clock", "ok", f"{shown}, synchronised ({how})")
    if synced is False:
        return Row("clock", "system clock", "warn", f"{shown}, not synchronised ({how})", enable)
    return Row(
        "clock",
        "system clock",
        "warn",
        f"{shown}, cannot tell whether it is synchronised ({how})",
        f"check the time source by hand (chronyc tracking, ntpq -p); {enable}",
    )


def check_clock(timeout: float) -> Row:
    """Is the clock synchronised and plausible?"""
    synced, how = clock_sync_status(timeout)
    return clock_row(datetime.now(UTC), synced, how)
