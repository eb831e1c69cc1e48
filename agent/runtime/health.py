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
        # (feed, device, type, reason) -> count since the last report, and the seq ranges of
        # events lost with a damaged file.
        self._drops: Counter[tuple[str, str, str, str]] = Counter()
        self._drop_seqs: dict[tuple[str, str, str, str], str] = {}
        self._report: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Every feed's drops since start, for the metrics: (feed, device, type, reason) -> count.
        self.dropped_total: Counter[tuple[str, str, str, str]] = Counter()

    def dropped(self, feed: str, dropped: list[Dropped]) -> None:
        """A feed evicted or lost events (called on the loop after a commit)."""
        for d in dropped:
            key = (feed, d.device, d.type, d.reason)
            self.dropped_total[key] += d.count
            self._drops[key] += d.count
            if d.seqs:
                self._drop_seqs[key] = d.seqs
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(DROP_REPORT_DELAY, self._report_drops)

    def _report_drops(self) -> None:
        self._report = None
        if not self._drops:  # a health event in between already reported (and cleared) them
            return
        for feed in sorted({key[0] for key in self._drops}):
            by_reason: Counter[str] = Counter()
            for (_feed, _device, _type, reason), count in self._drops.items():
                if _feed == feed:
                    by_reason[reason] += count
            devices = sorted({key[1] for key in self._drops if key[0] == feed})
            log.warning(
                "%sbuffer full: dropped the oldest events (%s) of %s",
                "" if feed == self._main else f"uplink {feed}: ",
                ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items())),
                ", ".join(devices),
            )
        task = asyncio.get_running_loop().create_task(self.emit_health(), name="health-after-drop")
        self._background.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._background.discard)

    def _drop_list(self) -> list[dict[str, Any]]:
        out = []
        for key, count in sorted(self._drops.items()):
            feed, device, type_, reason = key
            item: dict[str, Any] = {"device": device, "type": type_, "reason": reason, "count": count}
            if key in self._drop_seqs:
                item["seqs"] = self._drop_seqs[key]
            if feed != self._main:
                item["uplink"] = feed
            out.append(item)
        return out

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
