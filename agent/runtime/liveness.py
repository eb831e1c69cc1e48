"""Liveness and readiness: is every loop of the agent progressing, is it ready to deliver.

The event loop beats a heartbeat; :meth:`Liveness.stalls` compares it, the commit thread and
each durable uplink's progress against ``observability.stall_after``. That one verdict feeds
``/healthz`` and the systemd watchdog, which run on threads of their own, so a stuck loop is
seen rather than hidden. Everything read here is a plain attribute (safe under the GIL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from agent.config.model import AgentConfigBase
from agent.runtime.uplinks import DurableRunner, Uplinks
from agent.store.event_store import EventStore

HEARTBEAT_INTERVAL = 0.25  # seconds between event loop heartbeats


class Liveness:
    """The heartbeat and the stall verdict."""

    def __init__(self, config: AgentConfigBase, store: EventStore, uplinks: Uplinks) -> None:
        """Watch the store's commit thread and every durable uplink."""
        self.config = config
        self.store = store
        self.uplinks = uplinks
        self.started = time.time()
        self.running = False
        self.beat = time.monotonic()
        self.lag = 0.0
        # Per durable uplink: (instance, connects, published, acked) last seen, when it last
        # changed, and how many commits its feed had made by then.
        self._marks: dict[str, tuple[int, int, int, int]] = {}
        self.progress_at: dict[str, float] = {}
        self.commits_at_progress: dict[str, int] = {}

    async def heartbeat(self, every_status: float, on_status: Callable[[], None]) -> None:
        """Beat every HEARTBEAT_INTERVAL (proof, for other threads, that the loop runs)."""
        next_status = time.monotonic() + every_status
        while True:
            expected = time.monotonic() + HEARTBEAT_INTERVAL
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            now = time.monotonic()
            self.lag = max(0.0, now - expected)
            self.beat = now
            self.sample(now)
            if self.running and now >= next_status:
                next_status = now + every_status
                on_status()

    def sample(self, now: float) -> None:
        """Note when each durable uplink last made progress (connected, published or acknowledged)."""
        for name, runner in self.uplinks.durable.items():
            status = runner.uplink.status
            mark = (id(runner.uplink), status.connects, status.published, status.acked)
            if mark != self._marks.get(name):
                self._marks[name] = mark
                self.progress_at[name] = now
                self.commits_at_progress[name] = self.store.feeds[name].commits

    def stalls(self) -> dict[str, str]:
        """What is stuck, part -> why (empty: every loop progresses). Thread-safe, cheap.

        - ``event_loop``: its heartbeat is older than ``stall_after`` (a driver blocking the
          loop, a CPU-bound callback, a deadlock);
        - ``buffer``: one operation on the commit thread has run longer than ``stall_after``
          (a disk that stopped answering);
        - ``uplink`` (``uplink.<name>`` for a durable uplink other than the main one): its task
          ended, or it is connected, events were committed since it last published or got an
          acknowledgement, and it has done neither for ``stall_after`` plus its own allowance.
        """
        now = time.monotonic()
        limit = self.config.observability.stall_after
        found: dict[str, str] = {}
        age = now - self.beat
        if age > limit:
            found["event_loop"] = f"no heartbeat for {age:.1f} s"
        db = self.store.db
        since = db.busy_since
        if since is not None and now - since > limit:
            found["buffer"] = f"{db.busy_op} running on the commit thread for {now - since:.1f} s"
        for index, (name, runner) in enumerate(self.uplinks.durable.items()):
            why = self._uplink_stall(name, runner, now, limit)
            if why:
                found["uplink" if index == 0 else f"uplink.{name}"] = why
        return found

    def _uplink_stall(self, name: str, runner: DurableRunner, now: float, limit: float) -> str | None:
        task = runner.task
        if task is not None and task.done() and not task.cancelled():
            return "the uplink task ended"
        commits = self.store.feeds[name].commits
        if runner.uplink.status.connected and commits > self.commits_at_progress.get(name, commits):
            quiet = now - self.progress_at.get(name, now)
            if quiet > limit + runner.uplink.quiet_allowance():
                return f"connected, events waiting, nothing published or acknowledged for {quiet:.0f} s"
        return None

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: live while nothing is stuck."""
        stalls = self.stalls()
        return not stalls, {
            "stalls": stalls,
            "loop_heartbeat_age_s": round(time.monotonic() - self.beat, 3),
            "stall_after_s": self.config.observability.stall_after,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: ready when started, the buffer takes commits and the main uplink is connected."""
        main = self.store.main
        status = self.uplinks.main.uplink.status
        limit = self.config.observability.stall_after
        db = self.store.db
        busy = db.busy_since
        stuck = busy is not None and time.monotonic() - busy > limit
        checks = {
            "config_loaded": True,  # a running agent always holds a validated config
            "started": self.running,
            "buffer_writable": main.last_commit_ok and not stuck,
            "uplink_connected": status.connected,
        }
        details: dict[str, Any] = {"checks": checks}
        if main.last_commit_error:
            details["buffer_error"] = main.last_commit_error
        if stuck:
            details["buffer_error"] = f"{db.busy_op} running for more than {limit:g} s"
        if not status.connected and status.last_error:
            details["uplink_error"] = status.last_error
        return all(checks.values()), details
