"""The agent: wires devices -> event store -> uplink, reports health, reloads, shuts down.

Signals: SIGTERM/SIGINT stop cleanly (queued events are committed, ``offline`` is published);
SIGHUP reloads the config file, applying it only if it validates.

Observability (docs/observability.md): the event loop beats a heartbeat; :meth:`Agent.stalls`
compares it, the buffer's commit thread and the uplink's progress against
``observability.stall_after``. That one verdict feeds ``/healthz`` and the systemd watchdog,
both of which run on threads of their own, so a stuck loop is seen rather than hidden.
Metrics are plain counters here, exported at scrape time (agent/observability/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config.model import AgentConfigBase, config_warnings, load_config
from agent.contract.events import DEFAULT_PRIORITIES, GATEWAY_HEALTH, GATEWAY_STREAM, Priority, Reading
from agent.devices.api import DeviceConfig
from agent.devices.registry import load_plugins
from agent.devices.runner import DeviceFailedError, DeviceRunner
from agent.errors import ConfigError, DriverWriteError
from agent.observability.logs import add_secret
from agent.observability.metrics import (
    MAX_REASONS,
    CpuMeter,
    DeviceTelemetry,
    Snapshot,
    disk_space,
    host_health,
    load_average,
    memory,
    normalise_reason,
    temperature_c,
)
from agent.runtime.systemd import Notifier, Watchdog
from agent.store.event_store import EventStore
from agent.store.outbox import AppendResult, BufferStats, Dropped, Outbox, Record
from agent.uplinks.mqtt.uplink import MqttUplink, UplinkState

if TYPE_CHECKING:
    from agent.observability.http import HealthServer
    from agent.uplinks.opcua_server.server import OpcUaServer

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 4.0  # seconds; systemd and the issue allow 5
DROP_REPORT_DELAY = 1.0
FIRST_HEALTH_DELAY = 2.0  # coalesce a burst of evictions into one health event
HEARTBEAT_INTERVAL = 0.25  # seconds between event loop heartbeats
STATUS_INTERVAL = 10.0  # seconds between systemd STATUS= updates (sent only when changed)
STATS_MAX_AGE = 1.0  # seconds a scrape reuses the previous buffer figures
STATS_TIMEOUT = 2.0  # seconds a scrape waits for buffer figures before using the last ones


def _class_name(priority: int) -> str:
    return Priority(priority).name.lower() if priority in Priority._value2member_map_ else str(priority)


class _WatchedOutbox(Outbox):
    """The outbox, telling the health checks what runs on the commit thread and how commits go.

    Plain attributes written on the store's thread and read from others (single values, safe
    under the GIL): which operation runs since when, and whether the last commit succeeded.
    """

    busy_op = ""
    busy_since: float | None = None
    commits = 0
    last_commit_ok = True
    last_commit_error: str | None = None

    def append(self, records: Sequence[Record]) -> AppendResult:
        self.busy_op, self.busy_since = "commit", time.monotonic()
        try:
            result = super().append(records)
        except BaseException as exc:
            self.last_commit_ok, self.last_commit_error = False, f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.busy_since = None
        self.last_commit_ok, self.last_commit_error = True, None
        self.commits += 1
        return result

    def ack(self, ids: Sequence[int]) -> int:
        self.busy_op, self.busy_since = "ack", time.monotonic()
        try:
            return super().ack(ids)
        finally:
            self.busy_since = None

    def stats(self) -> BufferStats:
        self.busy_op, self.busy_since = "stats", time.monotonic()
        try:
            return super().stats()
        finally:
            self.busy_since = None


class _CountedUplinkState(UplinkState):
    """The uplink's state, also counting the errors it records, by normalised reason.

    The uplink sets ``last_error`` once per failed connection attempt or lost connection (and
    None once connected); each non-None assignment is counted here for the metrics.
    """

    _last_error: str | None = None

    def __init__(self, errors: dict[str, int]) -> None:
        self._errors = errors
        super().__init__()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self._last_error = value
        if value is not None:
            key = normalise_reason(value)
            if key not in self._errors and len(self._errors) >= MAX_REASONS:
                key = "other"
            self._errors[key] = self._errors.get(key, 0) + 1


def _settle_gc() -> None:
    """Keep the cycle collector off the hot path once everything long-lived exists.

    What exists after start-up (modules, config, drivers) lives until exit: frozen, full
    collections stop walking it (about 300,000 objects with 500 devices, 100-150 ms each).
    Readings are freed by reference counting; the few cycles (futures, exceptions) can wait for
    a larger first generation than the default 700 allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


class Agent:
    """One gateway's agent, from a validated config."""

    def __init__(self, config: AgentConfigBase, *, config_path: Path | None = None, own_process: bool = False) -> None:
        """Prepare; :meth:`run` starts everything. ``own_process``: the agent is the process (GC tuning)."""
        self.config = config
        self.config_path = config_path
        self._own_process = own_process
        self.started = time.time()
        self._outbox: _WatchedOutbox | None = None
        self.store = EventStore(
            self._open_outbox,
            gateway=config.gateway.id,
            topic_prefix=config.uplink.mqtt.topic_prefix,
            on_dropped=self._dropped,
        )
        # Uplink figures: errors by reason, and the counters of uplinks replaced by a reload.
        self._uplink_errors: dict[str, int] = {}
        self._uplink_retired = UplinkState()
        self.uplink = self._new_uplink()
        self.devices: dict[str, tuple[DeviceRunner, asyncio.Task[None]]] = {}
        self._priority_cache: dict[tuple[str, str], int] = {}
        # (device, type) -> (class, produced counter cell); cleared with the priority cache.
        self._emit_slots: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self._drops: Counter[tuple[str, str, str]] = Counter()
        self._drop_seqs: dict[tuple[str, str, str], str] = {}  # seq ranges of events lost with a damaged file
        self._drop_report: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._uplink_task: asyncio.Task[None] | None = None
        self.opcua: OpcUaServer | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Metrics: plain counters on the loop, read at scrape time (see metrics_snapshot).
        self._produced: dict[tuple[str, str], list[int]] = {}  # cells survive reloads
        self._dropped_total: Counter[tuple[str, str, str]] = Counter()
        self._telemetry: dict[str, DeviceTelemetry] = {}
        self._delivered_seen: int | None = None
        self._delivered = 0
        self._stats: tuple[float, BufferStats] | None = None
        self._cpu = CpuMeter()
        # Liveness: the loop's heartbeat and the uplink's last progress (monotonic seconds).
        self._beat = time.monotonic()
        self._lag = 0.0
        self._uplink_mark: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._uplink_progress_at = time.monotonic()
        self._uplink_commits_at_progress = 0
        self._running = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier: Notifier | None = None
        self._watchdog: Watchdog | None = None
        self._http: HealthServer | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        _register_secrets(config)

    def _open_outbox(self) -> Outbox:
        """On the store's thread: the outbox, watched by the health checks."""
        self._outbox = _WatchedOutbox(
            self.config.buffer.path, self.config.buffer.max_bytes, media_max_bytes=self.config.buffer.media_quota
        )
        return self._outbox

    def _new_uplink(self) -> MqttUplink:
        uplink = MqttUplink(self.config.uplink.mqtt, self.store, gateway=self.config.gateway.id)
        uplink.state = _CountedUplinkState(self._uplink_errors)
        return uplink

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
        """Hand one reading to the store (never blocks).

        The hot path (10,000+ readings/s): one dict lookup gives both the class and the
        produced-events counter cell of (device, type).
        """
        key = (device, reading.type)
        slot = self._emit_slots.get(key)
        if slot is None:
            slot = self._emit_slot(key)
        slot[1][0] += 1
        self.store.submit(device, reading, slot[0] if reading.priority is None else int(reading.priority))
        if self.opcua is not None:
            self.opcua.update(device, reading.type, reading.data, reading.time or datetime.now(UTC))

    def _emit_slot(self, key: tuple[str, str]) -> tuple[int, list[int]]:
        cell = self._produced.get(key)
        if cell is None:
            cell = self._produced[key] = [0]
        slot = self._emit_slots[key] = (self.priority_for(*key), cell)
        return slot

    def _dropped(self, dropped: list[Dropped]) -> None:
        for d in dropped:
            self._drops[(d.device, d.type, d.reason)] += d.count
            self._dropped_total[(d.device, d.type, d.reason)] += d.count
            if d.seqs:
                self._drop_seqs[(d.device, d.type, d.reason)] = d.seqs
        # One log line and one health event per burst of evictions, not one per commit.
        if self._drop_report is None:
            loop = asyncio.get_running_loop()
            self._drop_report = loop.call_later(DROP_REPORT_DELAY, self._report_drops)

    def _report_drops(self) -> None:
        self._drop_report = None
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
        self._background.add(task)  # a strong reference until it is done (see _on_sighup)
        task.add_done_callback(self._background.discard)

    async def health(self) -> dict[str, Any]:
        """The ``city.gateway.health`` data (see docs/events.md)."""
        stats = await self._fresh_stats()
        process, host = host_health(self.config.buffer.path, self._cpu)
        statuses = Counter(runner.status for runner, _ in self.devices.values())
        drops = [
            {"device": dev, "type": typ, "reason": reason, "count": count}
            | ({"seqs": self._drop_seqs[dev, typ, reason]} if (dev, typ, reason) in self._drop_seqs else {})
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
                "by_class": {_class_name(p): n for p, n in sorted(stats.rows_by_priority.items())},
            },
            "accounting": {
                "accepted": stats.accepted,
                "delivered": stats.delivered,
                "buffered": stats.rows,
                "dropped": {
                    "capacity": stats.dropped_capacity,
                    "disk_full": stats.dropped_disk_full,
                    "media_quota": stats.dropped_media_quota,
                    "corrupt": stats.dropped_corrupt,
                },
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
            "process": process,
            "host": host,
        }

    async def emit_health(self) -> None:
        """Publish one health event (drops reported in it are then cleared)."""
        data = await self.health()
        self._drops.clear()
        self._drop_seqs.clear()
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
        telemetry = self._telemetry.get(cfg.id)
        if telemetry is None or telemetry.driver != cfg.driver:
            telemetry = self._telemetry[cfg.id] = DeviceTelemetry(cfg.id, cfg.driver)
        runner = DeviceRunner(cfg, plugin, self.emit, telemetry)
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
        entry = self.devices.pop(device_id, None)
        if entry is None:  # already stopped (a shutdown during a reload)
            return
        runner, task = entry
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
        self._emit_slots.clear()
        if new.uplink.opcua != old.uplink.opcua:
            changes.append("uplink.opcua")
            await self._stop_opcua()
            await self._start_opcua()
        if new.uplink.mqtt != old.uplink.mqtt:
            changes.append("uplink")
            # New events take the new topic prefix; buffered ones keep the topic they were stored with.
            self.store.topic_prefix = new.uplink.mqtt.topic_prefix
            await self._restart_uplink()
        old_devices = {d.id: d for d in old.devices if d.enabled}
        new_devices = {d.id: d for d in new.devices if d.enabled}
        leaving = [device_id for device_id, cfg in old_devices.items() if new_devices.get(device_id) != cfg]
        # All at once: one by one, 500 devices cost 500 turns of a busy loop (seconds).
        await asyncio.gather(*(self._stop_device(device_id) for device_id in leaving))
        changes += [f"-{device_id}" for device_id in leaving]
        for device_id, cfg in new_devices.items():
            if old_devices.get(device_id) != cfg:
                self._start_device(cfg)
                changes.append(f"+{device_id}")
        for device_id in list(self._telemetry):
            if device_id not in new_devices:
                del self._telemetry[device_id]  # removed devices leave the metrics
        if new.priorities != old.priorities:
            changes.append("priorities")
        if new.observability != old.observability:
            changes.append("observability")
            if (new.observability.listen, new.observability.allow_remote) != (
                old.observability.listen,
                old.observability.allow_remote,
            ):
                await self._restart_http()
        _register_secrets(new)
        return changes

    def _on_sighup(self) -> None:
        # The loop keeps only a weak reference to a task: an unreferenced reload can be garbage
        # collected half-way (seen with 300 devices: the reload never finished, nothing logged).
        task = asyncio.get_running_loop().create_task(self._reload_from_file(), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_from_file(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP ignored: the agent was not started from a config file")
            return
        if self._notifier is not None:
            self._notifier.reloading()
        try:
            # Validating a big site file takes a while (about 1 s for 500 devices on a small
            # board); the devices and the uplink keep running meanwhile.
            new = await asyncio.to_thread(load_config, self.config_path)
            changes = await self.reload(new)
        except ConfigError as exc:
            log.error("reload refused, still running the previous config:\n  %s", "\n  ".join(exc.problems))
            return
        finally:
            if self._notifier is not None:
                self._notifier.ready(self._status_line())
        log.info("config reloaded from %s: %s", self.config_path, ", ".join(changes) or "no changes")
        for warning in config_warnings(new):  # as at start: the new file's weak spots are named
            log.warning("config: %s", warning)

    async def _restart_uplink(self) -> None:
        if self._uplink_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.uplink.say_offline(), 1.0)
            self._uplink_task.cancel()
            await asyncio.gather(self._uplink_task, return_exceptions=True)
            old, retired = self.uplink.state, self._uplink_retired
            retired.published += old.published
            retired.acked += old.acked
            retired.connects += old.connects
            retired.disconnects += old.disconnects
            self.uplink = self._new_uplink()
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
        loop = self._loop = asyncio.get_running_loop()
        self._beat = time.monotonic()
        self._heartbeat_task = loop.create_task(self._heartbeat(), name="heartbeat")
        self._notifier = Notifier.from_env()
        try:
            await self._start_http()
            await self.store.open()
            if self.store.outbox.quarantined is not None:
                log.error("buffer was corrupt and has been replaced; the old file is %s", self.store.outbox.quarantined)
            await self._fresh_stats()  # the baseline of the delivered counter
            self._tasks.append(loop.create_task(self.store.run_writer(), name="store-writer"))
            await self._restart_uplink()
            await self._start_opcua()
            self._tasks.append(loop.create_task(self._health_loop(), name="health"))
            for cfg in self.config.devices:
                if cfg.enabled:
                    self._start_device(cfg)
            if self._own_process:
                _settle_gc()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._running = True
            log.info(
                "agent %s running: %d devices, buffer %s, pid %d",
                self.config.gateway.id,
                len(self.devices),
                self.config.buffer.path,
                os.getpid(),
            )
            self._tell_systemd_ready()
            try:
                await self._stop.wait()
            finally:
                self._stopping = True
                if self._notifier is not None:
                    self._notifier.stopping()
                await asyncio.wait_for(self._shutdown(), SHUTDOWN_BUDGET + 1)
        finally:
            await self._stop_observability()
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
        await self._stop_opcua()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        self._running = False
        log.info("agent stopped in %.2fs", time.monotonic() - started)

    # ---- OPC UA server ----------------------------------------------------------------
    async def _start_opcua(self) -> None:
        """Serve the devices' values over OPC UA if configured; a failure leaves MQTT running."""
        settings = self.config.uplink.opcua
        if not settings.enabled:
            return
        from agent.uplinks.opcua_server.server import OpcUaServer

        server = OpcUaServer(settings, on_write=self._write_point, name=self.config.gateway.id)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            log.error("OPC UA server not started (%s); MQTT delivery is not affected", exc)
            return
        self.opcua = server
        log.info("OPC UA server on %s (certificate thumbprint %s)", settings.listen, server.thumbprint or "none")

    async def _stop_opcua(self) -> None:
        server, self.opcua = self.opcua, None
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.stop(), 2.0)

    async def _write_point(self, device: str, point: str, value: Any) -> None:
        """An allowed OPC UA write: handed to the device's driver, and logged either way."""
        entry = self.devices.get(device)
        driver = entry[0].driver if entry is not None else None
        if driver is None:
            raise DriverWriteError(f"device {device} is not running", "unavailable")
        try:
            await driver.write(point, value)
        except Exception as exc:
            log.warning("OPC UA write %s.%s = %r refused: %s", device, point, value, exc)
            raise
        log.info("OPC UA write %s.%s = %r done", device, point, value)

    # ---- observability ------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Beat every HEARTBEAT_INTERVAL: proof, for other threads, that the loop runs."""
        next_status = time.monotonic() + STATUS_INTERVAL
        last_status = ""
        while True:
            expected = time.monotonic() + HEARTBEAT_INTERVAL
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            now = time.monotonic()
            self._lag = max(0.0, now - expected)
            self._beat = now
            self._sample_uplink(now)
            if self._notifier is not None and self._running and now >= next_status:
                next_status = now + STATUS_INTERVAL
                line = self._status_line()
                if line != last_status:
                    self._notifier.status(line)
                    last_status = line

    def _sample_uplink(self, now: float) -> None:
        """Note when the uplink last made progress (connected, published or acknowledged)."""
        state = self.uplink.state
        mark = (id(self.uplink), state.connects, state.published, state.acked)
        if mark != self._uplink_mark:
            self._uplink_mark = mark
            self._uplink_progress_at = now
            self._uplink_commits_at_progress = self._outbox.commits if self._outbox is not None else 0

    def stalls(self) -> dict[str, str]:
        """What is stuck, part -> why (empty: every loop progresses). Thread-safe, cheap.

        - ``event_loop``: its heartbeat is older than ``stall_after`` (a driver blocking the
          loop, a CPU-bound callback, a deadlock);
        - ``buffer``: one operation on the commit thread has run longer than ``stall_after``
          (a disk that stopped answering);
        - ``uplink``: its task ended, or it is connected, events were committed since it last
          published or got an acknowledgement, and it has done neither for ``stall_after``
          plus twice the keepalive (its own dead-link check fires within one keepalive).
        """
        now = time.monotonic()
        limit = self.config.observability.stall_after
        found: dict[str, str] = {}
        age = now - self._beat
        if age > limit:
            found["event_loop"] = f"no heartbeat for {age:.1f} s"
        box = self._outbox
        if box is not None:
            since = box.busy_since
            if since is not None and now - since > limit:
                found["buffer"] = f"{box.busy_op} running on the commit thread for {now - since:.1f} s"
        task = self._uplink_task
        if task is not None and task.done() and not task.cancelled():
            found["uplink"] = "the uplink task ended"
        elif self.uplink.state.connected and box is not None and box.commits > self._uplink_commits_at_progress:
            quiet = now - self._uplink_progress_at
            if quiet > limit + 2 * self.config.uplink.mqtt.keepalive:
                found["uplink"] = f"connected, events waiting, nothing published or acknowledged for {quiet:.0f} s"
        return found

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: live while nothing is stuck."""
        stalls = self.stalls()
        return not stalls, {
            "stalls": stalls,
            "loop_heartbeat_age_s": round(time.monotonic() - self._beat, 3),
            "stall_after_s": self.config.observability.stall_after,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: ready when started, the buffer takes commits and the uplink is connected."""
        box = self._outbox
        state = self.uplink.state
        limit = self.config.observability.stall_after
        busy = box.busy_since if box is not None else None
        stuck = busy is not None and time.monotonic() - busy > limit
        checks = {
            "config_loaded": True,  # a running agent always holds a validated config
            "started": self._running,
            "buffer_writable": box is not None and box.last_commit_ok and not stuck,
            "uplink_connected": state.connected,
        }
        details: dict[str, Any] = {"checks": checks}
        if box is not None and box.last_commit_error:
            details["buffer_error"] = box.last_commit_error
        if stuck:
            details["buffer_error"] = f"{box.busy_op if box else ''} running for more than {limit:g} s"
        if not state.connected and state.last_error:
            details["uplink_error"] = state.last_error
        return all(checks.values()), details

    def _status_line(self) -> str:
        statuses = [runner.status for runner, _ in list(self.devices.values())]
        cached = self._stats
        buffered = f", {cached[1].rows} events buffered" if cached is not None else ""
        return (
            f"{statuses.count('online')}/{len(statuses)} devices online, "
            f"uplink {'connected' if self.uplink.state.connected else 'down'}{buffered}"
        )

    def _tell_systemd_ready(self) -> None:
        notifier = self._notifier
        if notifier is None:
            return
        notifier.ready(self._status_line())
        interval = notifier.watchdog_interval
        if interval is not None:
            self._watchdog = Watchdog(notifier, interval, self.stalls)
            self._watchdog.start()
            log.info("systemd watchdog: pinging every %.1f s while every loop progresses", interval)

    async def _start_http(self) -> None:
        listen = self.config.observability.listen
        if listen is None:
            return
        from agent.observability.http import HealthServer, build_registry  # prometheus_client: only when on

        server = HealthServer(listen, build_registry(self.metrics_snapshot), live=self.liveness, ready=self.readiness)
        try:
            server.start()
        except OSError as exc:
            # Monitoring must not stop data collection: say so loudly and run without it.
            log.error("observability: cannot listen on %s: %s; running without /metrics and /healthz", listen, exc)
            return
        self._http = server
        host, port = server.address
        log.info("observability: http://%s:%d/metrics, /healthz, /readyz", host, port)

    async def _restart_http(self) -> None:
        if self._http is not None:
            server, self._http = self._http, None
            await asyncio.to_thread(server.stop)
        await self._start_http()

    async def _stop_observability(self) -> None:
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.stop)
            self._watchdog = None
        if self._http is not None:
            server, self._http = self._http, None
            await asyncio.to_thread(server.stop)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        if self._notifier is not None:
            self._notifier.close()

    async def _fresh_stats(self) -> BufferStats:
        """Buffer figures from the store's thread; keeps the delivered counter monotonic."""
        stats = await self.store.stats()
        seen = self._delivered_seen
        if seen is not None:
            # A replaced (quarantined) buffer restarts its counters: count from zero again.
            self._delivered += stats.delivered - seen if stats.delivered >= seen else stats.delivered
        self._delivered_seen = stats.delivered
        self._stats = (time.monotonic(), stats)
        return stats

    def _stats_threadsafe(self) -> BufferStats | None:
        """For the scrape thread: recent buffer figures, asked of the loop with a timeout."""
        cached = self._stats
        if cached is not None and time.monotonic() - cached[0] < STATS_MAX_AGE:
            return cached[1]
        loop = self._loop
        if loop is None or loop.is_closed() or not self._running:
            return cached[1] if cached is not None else None
        try:
            return asyncio.run_coroutine_threadsafe(self._fresh_stats(), loop).result(STATS_TIMEOUT)
        except Exception:
            return cached[1] if cached is not None else None  # a stuck loop: /healthz says why

    def metrics_snapshot(self) -> Snapshot:
        """Everything /metrics exports, read from the scrape thread (see agent/observability/metrics.py)."""
        stats = self._stats_threadsafe()
        state, retired = self.uplink.state, self._uplink_retired
        connects = retired.connects + state.connects
        total, available = memory()
        load = load_average()
        live, _ = self.liveness()
        ready, _ = self.readiness()
        now = time.time()
        return Snapshot(
            gateway=self.config.gateway.id,
            site=self.config.gateway.site,
            version=__version__,
            produced={key: cell[0] for key, cell in list(self._produced.items())},
            dropped=dict(self._dropped_total),
            not_accepted=self.store.not_accepted,
            published=retired.published + state.published,
            delivered=self._delivered if self._delivered_seen is not None else None,
            buffer_events=(
                {_class_name(p): n for p, n in stats.rows_by_priority.items()} if stats is not None else None
            ),
            buffer_bytes=stats.bytes if stats is not None else None,
            buffer_max_bytes=self.config.buffer.max_bytes,
            buffer_oldest_age=(
                (max(0.0, now - stats.oldest_created) if stats.oldest_created else 0.0) if stats is not None else None
            ),
            disk_free=disk_space(self.config.buffer.path.parent)[0],
            uplink_connected=state.connected,
            uplink_reconnects=max(0, connects - 1),
            uplink_disconnects=retired.disconnects + state.disconnects,
            uplink_errors=dict(self._uplink_errors),
            devices=[(d, r.config.driver, r.status) for d, (r, _) in list(self.devices.items())],
            telemetry=list(self._telemetry.values()),
            loop_heartbeat_age=max(0.0, time.monotonic() - self._beat),
            loop_lag=self._lag,
            live=live,
            ready=ready,
            temperature=temperature_c(),
            mem_available=available if total is not None else None,
            load1=load[0] if load else None,
        )


def _register_secrets(config: AgentConfigBase) -> None:
    """Make the logs redact the broker password (read now, as the uplink will at connect)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        add_secret(config.uplink.mqtt.password())


async def run_agent(config: AgentConfigBase, *, config_path: Path | None = None) -> None:
    """Run an agent until SIGTERM/SIGINT."""
    if not faulthandler.is_enabled():
        # A watchdog kill (SIGABRT) or a crash leaves every thread's stack in the log.
        faulthandler.enable()
    agent = Agent(config, config_path=config_path, own_process=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()
