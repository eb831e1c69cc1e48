"""The agent: wires devices -> event store -> uplink, reports health, reloads, shuts down.

Signals: SIGTERM/SIGINT stop cleanly (queued events are committed, ``offline`` is published);
SIGHUP reloads the config file, applying it only if it validates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent.buffer import Dropped, Outbox
from agent.config import AgentConfigBase, load_config
from agent.devices import DeviceFailedError, DeviceRunner
from agent.driver_api import DeviceConfig
from agent.errors import ConfigError
from agent.events import DEFAULT_PRIORITIES, GATEWAY_HEALTH, GATEWAY_STREAM, Priority, Reading
from agent.registry import load_plugins
from agent.store import EventStore
from agent.uplink.mqtt import MqttUplink

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 4.0  # seconds; systemd and the issue allow 5
DROP_REPORT_DELAY = 1.0
FIRST_HEALTH_DELAY = 2.0  # coalesce a burst of evictions into one health event


class Agent:
    """One gateway's agent, from a validated config."""

    def __init__(self, config: AgentConfigBase, *, config_path: Path | None = None) -> None:
        """Prepare; :meth:`run` starts everything."""
        self.config = config
        self.config_path = config_path
        self.started = time.time()
        self.store = EventStore(
            lambda: Outbox(config.buffer.path, config.buffer.max_bytes),
            gateway=config.gateway.id,
            topic_prefix=config.uplink.mqtt.topic_prefix,
            on_dropped=self._dropped,
        )
        self.uplink = MqttUplink(config.uplink.mqtt, self.store, gateway=config.gateway.id)
        self.devices: dict[str, tuple[DeviceRunner, asyncio.Task[None]]] = {}
        self._priority_cache: dict[tuple[str, str], int] = {}
        self._drops: Counter[tuple[str, str, str]] = Counter()
        self._drop_report: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._uplink_task: asyncio.Task[None] | None = None

    # ---- events ---------------------------------------------------------------------
    def priority_for(self, device: str, event_type: str) -> int:
        """Device override, then gateway override, then the type's default class."""
        key = (device, event_type)
        cached = self._priority_cache.get(key)
        if cached is not None:
            return cached
        runner = self.devices.get(device)
        names = dict(self.config.priorities)
        if runner is not None:
            names.update(runner[0].config.priorities)
        if event_type in names:
            value = int(Priority[names[event_type].upper()])
        else:
            value = int(DEFAULT_PRIORITIES.get(event_type, Priority.EVENT))
        self._priority_cache[key] = value
        return value

    def emit(self, device: str, reading: Reading) -> None:
        """Hand one reading to the store (never blocks)."""
        priority = int(reading.priority) if reading.priority is not None else self.priority_for(device, reading.type)
        self.store.submit(device, reading, priority)

    def _dropped(self, dropped: list[Dropped]) -> None:
        for d in dropped:
            self._drops[(d.device, d.type, d.reason)] += d.count
        # One log line and one health event per burst of evictions, not one per commit.
        if self._drop_report is None:
            loop = asyncio.get_running_loop()
            self._drop_report = loop.call_later(DROP_REPORT_DELAY, self._report_drops)

    def _report_drops(self) -> None:
        self._drop_report = None
        by_reason: Counter[str] = Counter()
        for (_device, _type, reason), count in self._drops.items():
            by_reason[reason] += count
        devices = sorted({device for device, _, _ in self._drops})
        log.warning(
            "buffer full: dropped the oldest events (%s) of %s",
            ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items())),
            ", ".join(devices),
        )
        asyncio.get_running_loop().create_task(self.emit_health(), name="health-after-drop")

    async def health(self) -> dict[str, Any]:
        """The ``city.gateway.health`` data (see docs/events.md)."""
        stats = await self.store.stats()
        statuses = Counter(runner.status for runner, _ in self.devices.values())
        drops = [
            {"device": dev, "type": typ, "reason": reason, "count": count}
            for (dev, typ, reason), count in sorted(self._drops.items())
        ]
        up = self.uplink.state
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "site": self.config.gateway.site,
            "buffer": {
                "events": stats.rows,
                "bytes": stats.bytes,
                "max_bytes": stats.max_bytes,
                "oldest_age_s": round(time.time() - stats.oldest_created, 1) if stats.oldest_created else None,
                "by_class": {
                    Priority(p).name.lower() if p in Priority._value2member_map_ else str(p): n
                    for p, n in sorted(stats.rows_by_priority.items())
                },
            },
            "accounting": {
                "accepted": stats.accepted,
                "delivered": stats.delivered,
                "buffered": stats.rows,
                "dropped": {"capacity": stats.dropped_capacity, "disk_full": stats.dropped_disk_full},
                "not_accepted": self.store.not_accepted,
            },
            "dropped_since_last_report": drops,
            "uplink": {
                "connected": up.connected,
                "connects": up.connects,
                "disconnects": up.disconnects,
                "last_error": up.last_error,
            },
            "devices": {
                "total": len(self.devices),
                "online": statuses.get("online", 0),
                "offline": sorted(d for d, (r, _) in self.devices.items() if r.status == "offline"),
            },
        }

    async def emit_health(self) -> None:
        """Publish one health event (drops reported in it are then cleared)."""
        data = await self.health()
        self._drops.clear()
        self.emit(GATEWAY_STREAM, Reading(GATEWAY_HEALTH, data))

    async def _health_loop(self) -> None:
        # The first report waits a moment so it can say whether the uplink came up.
        await asyncio.sleep(min(FIRST_HEALTH_DELAY, self.config.gateway.health_interval))
        while True:
            await self.emit_health()
            await asyncio.sleep(self.config.gateway.health_interval)

    # ---- devices ------------------------------------------------------------------
    def _start_device(self, cfg: DeviceConfig) -> None:
        plugin = load_plugins()[cfg.driver]
        runner = DeviceRunner(cfg, plugin, self.emit)
        task = asyncio.get_running_loop().create_task(self._guard(runner), name=f"device-{cfg.id}")
        self.devices[cfg.id] = (runner, task)

    async def _guard(self, runner: DeviceRunner) -> None:
        try:
            await runner.run()
        except DeviceFailedError as exc:
            log.error("%s (startup_error_behavior: error); stopping the agent", exc)
            self._fatal = exc
            self._stop.set()

    async def _stop_device(self, device_id: str) -> None:
        runner, task = self.devices.pop(device_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        del runner

    # ---- reload -------------------------------------------------------------------
    async def reload(self, new: AgentConfigBase) -> list[str]:
        """Apply a validated config; unchanged devices keep running. Returns what changed."""
        old = self.config
        if new.gateway.id != old.gateway.id or new.buffer != old.buffer:
            raise ConfigError(["gateway.id and buffer changes need a restart; nothing was applied"])
        changes: list[str] = []
        self.config = new
        self._priority_cache.clear()
        if new.uplink != old.uplink:
            changes.append("uplink")
            # New events take the new topic prefix; buffered ones keep the topic they were stored with.
            self.store.topic_prefix = new.uplink.mqtt.topic_prefix
            await self._restart_uplink()
        old_devices = {d.id: d for d in old.devices if d.enabled}
        new_devices = {d.id: d for d in new.devices if d.enabled}
        for device_id, cfg in old_devices.items():
            if new_devices.get(device_id) != cfg:
                await self._stop_device(device_id)
                changes.append(f"-{device_id}")
        for device_id, cfg in new_devices.items():
            if old_devices.get(device_id) != cfg:
                self._start_device(cfg)
                changes.append(f"+{device_id}")
        if new.priorities != old.priorities:
            changes.append("priorities")
        return changes

    async def _reload_from_file(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP ignored: the agent was not started from a config file")
            return
        try:
            new = load_config(self.config_path)
            changes = await self.reload(new)
        except ConfigError as exc:
            log.error("reload refused, still running the previous config:\n  %s", "\n  ".join(exc.problems))
            return
        log.info("config reloaded from %s: %s", self.config_path, ", ".join(changes) or "no changes")

    async def _restart_uplink(self) -> None:
        if self._uplink_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.uplink.say_offline(), 1.0)
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)
        self.uplink = MqttUplink(self.config.uplink.mqtt, self.store, gateway=self.config.gateway.id)
        self._uplink_task = asyncio.get_running_loop().create_task(self.uplink.run(), name="uplink")

    # ---- run ----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the agent to stop (signal-safe)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until stopped.

        Raises:
            DeviceFailedError: a device with ``startup_error_behavior: error`` did not start.
        """
        loop = asyncio.get_running_loop()
        await self.store.open()
        if self.store.outbox.quarantined is not None:
            log.error("buffer was corrupt and has been replaced; the old file is %s", self.store.outbox.quarantined)
        self._tasks.append(loop.create_task(self.store.run_writer(), name="store-writer"))
        await self._restart_uplink()
        self._tasks.append(loop.create_task(self._health_loop(), name="health"))
        for cfg in self.config.devices:
            if cfg.enabled:
                self._start_device(cfg)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_from_file(), name="reload"))
        log.info(
            "agent %s running: %d devices, buffer %s, pid %d",
            self.config.gateway.id,
            len(self.devices),
            self.config.buffer.path,
            os.getpid(),
        )
        try:
            await self._stop.wait()
        finally:
            await asyncio.wait_for(self._shutdown(), SHUTDOWN_BUDGET + 1)
        if self._fatal is not None:
            raise self._fatal

    async def _shutdown(self) -> None:
        started = time.monotonic()
        for _runner, task in self.devices.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.devices.values()), return_exceptions=True)
        self.devices.clear()
        await self.store.flush()  # everything read is now durable
        # Give the uplink a moment to deliver what is already in flight, within budget.
        deadline = started + SHUTDOWN_BUDGET / 2
        while self.uplink.state.connected and time.monotonic() < deadline:
            stats = await self.store.stats()
            if stats.rows == 0:
                break
            await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.uplink.say_offline(), 1.0)
        if self._uplink_task is not None:
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        log.info("agent stopped in %.2fs", time.monotonic() - started)


async def run_agent(config: AgentConfigBase, *, config_path: Path | None = None) -> None:
    """Run an agent until SIGTERM/SIGINT."""
    agent = Agent(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()
