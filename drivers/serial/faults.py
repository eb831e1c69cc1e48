"""Bad-frame bookkeeping: exact counters, and a log that cannot flood.

A noisy line can damage hundreds of frames a second; one log line per frame would bury the
journal (and wear an SD card). Each distinct fault reason is logged at once the first time,
then at most once per period with how many happened since, so the count stays exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

LOG_PERIOD = 60.0


@dataclass
class _Pending:
    count: int = 0
    detail: str = ""
    logged_at: float | None = None


@dataclass
class FaultLog:
    """Counts faults by reason and logs them at most once per ``period`` seconds per reason."""

    device_id: str
    log: logging.Logger
    period: float = LOG_PERIOD
    totals: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, _Pending] = field(default_factory=dict)

    def record(self, reason: str, detail: str, now: float) -> None:
        """Count one fault; log it if this reason was quiet for a period."""
        self.totals[reason] = self.totals.get(reason, 0) + 1
        pending = self._pending.setdefault(reason, _Pending())
        pending.count += 1
        pending.detail = detail
        if pending.logged_at is None or now - pending.logged_at >= self.period:
            self._emit(reason, pending, now)

    def flush(self, now: float) -> None:
        """Log counts held back for a full period (call it regularly, e.g. on every wake-up)."""
        for reason, pending in self._pending.items():
            if pending.count and pending.logged_at is not None and now - pending.logged_at >= self.period:
                self._emit(reason, pending, now)

    @property
    def total(self) -> int:
        """Bad frames of every reason since the driver started."""
        return sum(self.totals.values())

    def _emit(self, reason: str, pending: _Pending, now: float) -> None:
        since = "" if pending.logged_at is None else f" in the last {now - pending.logged_at:.0f}s"
        self.log.warning(
            "device %s: %d bad frame(s) (%s)%s, %d of this kind and %d bad in total; last: %s",
            self.device_id,
            pending.count,
            reason,
            since,
            self.totals[reason],
            self.total,
            pending.detail,
        )
        pending.count = 0
        pending.logged_at = now
