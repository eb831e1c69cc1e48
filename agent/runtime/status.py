"""One status model of the whole agent, read by every view of it.

The health event, ``/metrics``, ``/readyz``, the systemd status line (and later the
technician page) all read the figures here, so they never disagree: devices, uplinks with
their own buffers and accounting, the host, versions. Buffer figures come from the commit
thread and are cached briefly; everything else is plain attributes read where they live.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.config.model import AgentConfigBase
from agent.contract.events import Priority
from agent.observability.clock import kernel_clock_sync
from agent.observability.metrics import CpuMeter, host_health
from agent.runtime.devices import DeviceSet
from agent.runtime.uplinks import DurableRunner, Uplinks
from agent.store.event_store import EventStore
from agent.store.outbox import BufferStats

STATS_MAX_AGE = 1.0  # seconds a scrape reuses the previous buffer figures
STATS_TIMEOUT = 2.0  # seconds a scrape waits for buffer figures before using the last ones


def class_name(priority: int) -> str:
    """A delivery class's name (``alarm``...), or its number if it has none."""
    return Priority(priority).name.lower() if priority in Priority._value2member_map_ else str(priority)


class StatusModel:
    """Figures of the agent, gathered in one place."""

    def __init__(self, config: AgentConfigBase, devices: DeviceSet, uplinks: Uplinks, store: EventStore) -> None:
        """Read-only views over the agent's parts."""
        self.config = config
        self.devices = devices
        self.uplinks = uplinks
        self.store = store
        self.started = time.time()
        self.cpu = CpuMeter()
        self.running = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stats: dict[str, tuple[float, BufferStats]] = {}
        # Delivered events keep counting up when a damaged file is replaced (its counters restart).
        self._delivered_seen: dict[str, int] = {}
        self._delivered: dict[str, int] = {}

    # ---- buffers ---------------------------------------------------------------------
    async def refresh(self) -> dict[str, BufferStats]:
        """Fresh figures of every feed (on the loop; the commit thread answers)."""
        now = time.monotonic()
        for name, feed in self.store.feeds.items():
            stats = await feed.stats()
            seen = self._delivered_seen.get(name)
            if seen is not None:
                grew = stats.delivered - seen if stats.delivered >= seen else stats.delivered
                self._delivered[name] = self._delivered.get(name, 0) + grew
            self._delivered_seen[name] = stats.delivered
            self._stats[name] = (now, stats)
        return {name: cached[1] for name, cached in self._stats.items()}

    def cached(self, name: str | None = None) -> BufferStats | None:
        """The last figures of a feed (the main one by default), however old."""
        entry = self._stats.get(name or self.store.main.name)
        return entry[1] if entry is not None else None

    def delivered(self, name: str | None = None) -> int | None:
        """Events delivered through a feed since the agent started (None before the first figures)."""
        name = name or self.store.main.name
        return self._delivered.get(name, 0) if name in self._delivered_seen else None

    def stats_threadsafe(self) -> BufferStats | None:
        """For another thread: recent main-buffer figures, asked of the loop with a timeout."""
        entry = self._stats.get(self.store.main.name)
        if entry is not None and time.monotonic() - entry[0] < STATS_MAX_AGE:
            return entry[1]
        loop = self.loop
        if loop is None or loop.is_closed() or not self.running:
            return entry[1] if entry is not None else None
        try:
            return asyncio.run_coroutine_threadsafe(self.refresh(), loop).result(STATS_TIMEOUT)[self.store.main.name]
        except Exception:
            return entry[1] if entry is not None else None  # a stuck loop: /healthz says why

    # ---- uplinks ---------------------------------------------------------------------
    @staticmethod
    def uplink_figures(runner: DurableRunner) -> dict[str, Any]:
        """Counters of one durable uplink (one status across the instances reloads replaced)."""
        status = runner.uplink.status
        return {
            "connected": status.connected,
            "connects": status.connects,
            "disconnects": status.disconnects,
            "last_error": status.last_error,
            "published": status.published,
            "errors": dict(status.errors),
        }

    # ---- the health event ------------------------------------------------------------
    async def health(self, drops: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
        """The ``city.gateway.health`` data (see docs/events.md).

        ``drops`` is read after the buffer figures: reading them may reveal a replaced file,
        whose losses must be in this very report.
        """
        all_stats = await self.refresh()
        main = self.uplinks.main
        stats = all_stats[main.name]
        process, host = host_health(self.config.buffer.path, self.cpu)
        devices = self.devices.statuses()
        statuses = Counter(devices.values())
        up = main.uplink.status
        data: dict[str, Any] = {
            "uptime_s": round(time.time() - self.started, 1),
            "site": self.config.gateway.site,
            "buffer": _buffer(stats),
            "accounting": _accounting(stats, self.store.feeds[main.name].not_accepted),
            "dropped_since_last_report": drops(),
            "uplink": {
                "connected": up.connected,
                "connects": up.connects,
                "disconnects": up.disconnects,
                "last_error": up.last_error,
            },
            "devices": {
                "total": sum(statuses.values()),
                "online": statuses.get("online", 0),
                "offline": sorted(d for d, s in devices.items() if s == "offline"),
            },
            "process": process,
            "host": host,
            "clock": self.clock(),
            "version": __version__,
        }
        links = self.devices.links()
        if links:
            data["links"] = {name: {"driver": driver, **state} for name, (driver, state) in sorted(links.items())}
        if len(self.uplinks.durable) > 1:  # each durable uplink's own buffer and accounting
            data["uplinks"] = {
                name: {
                    "connected": runner.uplink.status.connected,
                    "last_error": runner.uplink.status.last_error,
                    "buffer": _buffer(all_stats[name]),
                    "accounting": _accounting(all_stats[name], self.store.feeds[name].not_accepted),
                }
                for name, runner in self.uplinks.durable.items()
            }
        return data

    def status_line(self) -> str:
        """The systemd STATUS= line."""
        statuses = list(self.devices.statuses().values())
        stats = self.cached()
        buffered = f", {stats.rows} events buffered" if stats is not None else ""
        connected = self.uplinks.main.uplink.status.connected
        return (
            f"{statuses.count('online')}/{len(statuses)} devices online, "
            f"uplink {'connected' if connected else 'down'}{buffered}"
        )

    @staticmethod
    def clock() -> dict[str, Any]:
        """Whether the system clock (every event's ``time``) is disciplined by network time."""
        kernel = kernel_clock_sync()
        return {"synchronised": kernel[0] if kernel is not None else None}


def _buffer(stats: BufferStats) -> dict[str, Any]:
    return {
        "events": stats.rows,
        "bytes": stats.bytes,
        "max_bytes": stats.max_bytes,
        "oldest_age_s": round(time.time() - stats.oldest_created, 1) if stats.oldest_created else None,
        "by_class": {class_name(p): n for p, n in sorted(stats.rows_by_priority.items())},
    }


def _accounting(stats: BufferStats, not_accepted: int) -> dict[str, Any]:
    return {
        "accepted": stats.accepted,
        "delivered": stats.delivered,
        "buffered": stats.rows,
        "dropped": {
            "capacity": stats.dropped_capacity,
            "disk_full": stats.dropped_disk_full,
            "media_quota": stats.dropped_media_quota,
            "corrupt": stats.dropped_corrupt,
        },
        "not_accepted": not_accepted,
    }
