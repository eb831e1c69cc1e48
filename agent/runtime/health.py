"""Health reporting: the periodic ``city.gateway.health`` event, and drops coalesced into it.

A burst of evictions is one log line and one health event, not one per commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.contract.events import GATEWAY_HEALTH, GATEWAY_STREAM, Reading
from agent.runtime.status import StatusModel
from agent.store.outbox import Dropped

log = logging.getLogger(__name__)

DROP_REPORT_DELAY = 1.0
FIRST_HEALTH_DELAY = 2.0  # the first report waits a moment so it can say whether the uplink came up


class HealthReporter:
    """Counts drops per feed, reports them once per burst, emits the health event."""

    def __init__(self, status: StatusModel, emit: Callable[[str, Reading], None], main_feed: str) -> None:
        """``emit`` sends the health event down the same path as every reading."""
        self._status = status
        self._emit = emit
        self._main = main_feed
        self._drops: Counter[tuple[str, str, str]] = Counter()  # of the main feed, since the last report
        self._drop_seqs: dict[tuple[str, str, str], str] = {}  # seq ranges of events lost with a damaged file
        self._report: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Every feed's drops since start, for the metrics: (feed, device, type, reason) -> count.
        self.dropped_total: Counter[tuple[str, str, str, str]] = Counter()

    def dropped(self, feed: str, dropped: list[Dropped]) -> None:
        """A feed evicted or lost events (called on the loop after a commit)."""
        for d in dropped:
            self.dropped_total[(feed, d.device, d.type, d.reason)] += d.count
            if feed != self._main:
                continue  # other feeds report through their own accounting
            self._drops[(d.device, d.type, d.reason)] += d.count
            if d.seqs:
                self._drop_seqs[(d.device, d.type, d.reason)] = d.seqs
        if self._report is None and feed == self._main:
            self._report = asyncio.get_running_loop().call_later(DROP_REPORT_DELAY, self._report_drops)

    def _report_drops(self) -> None:
        self._report = None
        if not self._drops:  # a health event in between already reported (and cleared) them
            return
        by_reason: Counter[str] = Counter()
        for (_device, _type, reason), count in self._drops.items():
            by_reason[reason] += count
        devices = sorted({device for device, _, _ in self._drops})
        log.warning(
            "buffer full: dropped the oldest events (%s) of %s",
            ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items())),
            ", ".join(devices),
        )
        task = asyncio.get_running_loop().create_task(self.emit_health(), name="health-after-drop")
        self._background.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._background.discard)

    def _drop_list(self) -> list[dict[str, Any]]:
        return [
            {"device": dev, "type": typ, "reason": reason, "count": count}
            | ({"seqs": self._drop_seqs[dev, typ, reason]} if (dev, typ, reason) in self._drop_seqs else {})
            for (dev, typ, reason), count in sorted(self._drops.items())
        ]

    async def health(self) -> dict[str, Any]:
        """The health event's data now (drops since the last report included, not cleared)."""
        return await self._status.health(self._drop_list)

    async def emit_health(self) -> None:
        """Publish one health event (drops reported in it are then cleared)."""
        data = await self.health()
        self._drops.clear()
        self._drop_seqs.clear()
        self._emit(GATEWAY_STREAM, Reading(GATEWAY_HEALTH, data))

    async def run(self, interval: Callable[[], float]) -> None:
        """Emit every ``interval()`` seconds (read each time: a reload may change it)."""
        await asyncio.sleep(min(FIRST_HEALTH_DELAY, interval()))
        while True:
            await self.emit_health()
            await asyncio.sleep(interval())
