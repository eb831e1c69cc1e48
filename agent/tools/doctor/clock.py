"""The system clock: plausible, and synchronised to network time (timedatectl, else the kernel)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime

from agent.observability.clock import kernel_clock_sync
from agent.tools.doctor.report import Row

EARLIEST_YEAR = 2024  # a clock before this is certainly wrong (no RTC, no network time yet)


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
