"""The agent: wires devices -> pipeline -> event store -> uplinks, and runs them.

Signals: SIGTERM/SIGINT stop cleanly (queued events are committed, durable uplinks say
goodbye); SIGHUP reloads the config file, applying it only if it validates.

The jobs live beside this module, one each: :mod:`~agent.runtime.pipeline` (classes, counters,
fan-out), :mod:`~agent.runtime.devices`, :mod:`~agent.runtime.uplinks`,
:mod:`~agent.runtime.status` (the one status model), :mod:`~agent.runtime.health`,
:mod:`~agent.runtime.liveness`, :mod:`~agent.runtime.inbound`, :mod:`~agent.runtime.service`
(systemd and the HTTP endpoints). This module holds the order of start, reload and stop.
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.model import AgentConfigBase, config_warnings, load_config
from agent.errors import AgentError, ConfigError
from agent.observability.logs import add_secret
from agent.runtime.devices import DeviceSet
from agent.runtime.health import HealthReporter
from agent.runtime.inbound import InboundRouter
from agent.runtime.liveness import Liveness
from agent.runtime.pipeline import Pipeline
from agent.runtime.service import Service
from agent.runtime.status import StatusModel
from agent.runtime.uplinks import Uplinks
from agent.store.event_store import EventStore
from agent.uplinks.api import Command, Reply

if TYPE_CHECKING:  # the fleet channel loads cryptography (7 MB): only when it is on
    from agent.fleet.bundles.runner import BundleRunner
    from agent.fleet.desired.apply import DesiredConfig
    from agent.fleet.desired.startup import Start
    from agent.fleet.identity.renewal import Renewer
    from agent.fleet.inventory import Inventory
    from agent.fleet.latest import LatestValues

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 4.0  # seconds; systemd and the issue allow 5


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
        """Prepare; :meth:`run` starts everything. ``own_process``: the agent is the process (GC tuning).

        With the fleet channel on, ``config`` is the local file's: the last good remote config (in
        the state directory) replaces its sections before anything is built from it.
        """
        desired_start = None
        if config.fleet.enabled and config_path is not None:
            from agent.fleet.desired.startup import at_start

            config, desired_start = at_start(config, config_path)
        self.config = config
        self.config_path = config_path
        self._own_process = own_process
        self._stop = asyncio.Event()
        self._stopping_at = ""  # the shutdown step under way (named if the shutdown runs over its budget)
        self._fatal: BaseException | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.load_file: Callable[[Path], AgentConfigBase] = load_config  # SIGHUP's: remote sections stay over it
        # Writes reach a device through the device set, built last: readings then go straight
        # to the pipeline's bound method, one call per reading on the hot path.
        self.inbound = InboundRouter(lambda device: self.devices.driver_of(device))
        self.renewer: Renewer | None = None  # with fleet.identity: keeps the client certificate valid
        identity = _identity(config)
        reports = self.inbound.reports if config.fleet.enabled else None
        self.uplinks = Uplinks(config, self.inbound, reports, identity)
        self.store = EventStore(
            self.uplinks.outboxes(config.buffer), gateway=config.gateway.id, on_dropped=self._dropped
        )
        self.pipeline = Pipeline(config, self.store)
        self.devices = DeviceSet(self.pipeline.emit, self._on_fatal)
        self.status = StatusModel(config, self.devices, self.uplinks, self.store)
        self.health = HealthReporter(self.status, self.pipeline.emit, self.store.main.name)
        self.liveness = Liveness(config, self.store, self.uplinks)
        self.service = Service(self)
        self.inbound.handle("status", self._status_command)
        self.inventory: Inventory | None = None  # with the fleet channel: the retained inventory event
        self.desired: DesiredConfig | None = None  # remote configuration, with the fleet channel
        self.bundles: BundleRunner | None = None  # update bundles, with remote configuration
        self.latest = _fleet_channel(self, desired_start) if config.fleet.enabled else None
        if identity is not None:
            self._renewal(identity)
        _register_secrets(config)

    def _renewal(self, identity: Any) -> None:
        from agent.fleet.identity.renewal_run import build_renewer, renewal_facts

        inventory = self.inventory
        changed = inventory.check_now if inventory is not None else (lambda: None)
        renewer = self.renewer = build_renewer(lambda: self.config, identity, self.pipeline.emit, changed)
        if inventory is not None:
            inventory.files.identity_cert = lambda: identity.current.cert_file
            inventory.renewal = lambda: renewal_facts(renewer)

    # Late-bound: the store reports drops before the health reporter exists.
    def _dropped(self, feed: str, dropped: list[Any]) -> None:
        self.health.dropped(feed, dropped)

    def _on_fatal(self, exc: BaseException) -> None:
        self._fatal = exc
        self._stop.set()

    def fleet_figures(self) -> dict[tuple[str, str], int]:
        """Requests and documents from the operations centre by (kind, outcome); empty with the fleet off."""
        figures: dict[tuple[str, str], int] = {}
        channel = self.inbound.channel
        if channel is not None:
            figures[("command", "accepted")] = channel.accepted
            figures.update({("command", code): n for code, n in list(channel.refused.items())})
        if self.desired is not None:
            figures.update({("config", outcome): n for outcome, n in list(self.desired.outcomes.items())})
        return figures

    async def _status_command(self, command: Command) -> Reply:
        """``status``: the health event's data, asked for from the operations centre."""
        return Reply("ok", data=await self.health.health())

    def _feed_sinks(self) -> None:
        """Every reading goes to the live uplinks and, with the fleet channel on, to its latest values."""
        self.pipeline.sinks = [*self.uplinks.live.values(), *([self.latest] if self.latest is not None else [])]

    # ---- reload -------------------------------------------------------------------
    async def reload(self, new: AgentConfigBase) -> list[str]:
        """Apply a validated config; unchanged devices and uplinks keep running. Returns what changed."""
        old = self.config
        changes: list[str] = []
        if new.gateway.id != old.gateway.id or new.buffer != old.buffer:
            raise ConfigError(["gateway.id and buffer changes need a restart; nothing was applied"])
        Uplinks.check_reload(old, new)
        if (new.fleet.enabled, new.fleet.root) != (old.fleet.enabled, old.fleet.root):
            raise ConfigError(["fleet.enabled and fleet.root changes need a restart; nothing was applied"])
        self.config = self.status.config = self.liveness.config = new
        if self.inbound.channel is not None:
            self.inbound.channel.configure(new.fleet)
            if new.fleet != old.fleet:
                changes.append("fleet")
        self.pipeline.reconfigure(new)
        changes += await self.uplinks.reload(old, new)
        self._feed_sinks()
        changes += await self.devices.apply(old.devices, new.devices)
        if new.priorities != old.priorities:
            changes.append("priorities")
        if new.observability != old.observability:
            changes.append("observability")
            await self.service.observability_changed(old)
        _register_secrets(new)
        if self.inventory is not None:  # what the inventory reports may have changed with the config
            self.inventory.check_now()
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
        self.service.reloading()
        try:
            # Validating a big site file takes a while (about 1 s for 500 devices on a small
            # board); the devices and the uplinks keep running meanwhile.
            new = await asyncio.to_thread(self.load_file, self.config_path)
            changes = await self.reload(new)
        except ConfigError as exc:
            log.error("reload refused, still running the previous config:\n  %s", "\n  ".join(exc.problems))
            return
        finally:
            self.service.ready()
        log.info("config reloaded from %s: %s", self.config_path, ", ".join(changes) or "no changes")
        for warning in config_warnings(new):  # as at start: the new file's weak spots are named
            log.warning("config: %s", warning)

    # ---- run ----------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """Whether the agent has begun to stop."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the agent to stop (signal-safe)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until stopped.

        Raises:
            DeviceFailedError: a device with ``startup_error_behavior: error`` did not start.
        """
        loop = self.status.loop = asyncio.get_running_loop()
        await self.service.start()
        try:
            await self.store.open()
            for feed in self.store.feeds.values():
                if feed.outbox.quarantined is not None:
                    log.error("buffer was corrupt and has been replaced; the old file is %s", feed.outbox.quarantined)
            await self.status.refresh()  # the baseline of the delivered counters
            self._tasks.append(loop.create_task(self.store.run_writer(), name="store-writer"))
            self.uplinks.start_durable(self.store.feeds)
            await self.uplinks.start_live()
            self._feed_sinks()
            interval = lambda: self.config.gateway.health_interval  # noqa: E731 - read at each turn
            self._tasks.append(loop.create_task(self.health.run(interval), name="health"))
            if self.inventory is not None:
                self._tasks.append(loop.create_task(self.inventory.run(), name="inventory"))
            if self.renewer is not None:
                self._tasks.append(loop.create_task(self.renewer.run(), name="renewal"))
            if self.bundles is not None:
                self._tasks.append(loop.create_task(self.bundles.run(), name="bundles"))
            for cfg in self.config.devices:
                if cfg.enabled:
                    self.devices.start(cfg)
            if self._own_process:
                _settle_gc()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self.status.running = self.liveness.running = True
            log.info(
                "agent %s running: %d devices, buffer %s, pid %d",
                self.config.gateway.id,
                len(self.devices.running),
                self.config.buffer.path,
                os.getpid(),
            )
            self.service.started()
            try:
                await self._stop.wait()
            finally:
                self.service.stopping()
                try:
                    await asyncio.wait_for(self._shutdown(), SHUTDOWN_BUDGET + 1)
                except TimeoutError:
                    # The buffer keeps what was not delivered; say where the time went.
                    raise AgentError(
                        f"shutdown took over {SHUTDOWN_BUDGET + 1:.0f} s (still at: {self._stopping_at})"
                    ) from None
        finally:
            await self.service.stop()
        if self._fatal is not None:
            raise self._fatal

    async def _shutdown(self) -> None:
        started = time.monotonic()
        self._stopping_at = "devices"
        await self.devices.stop_all()
        self._stopping_at = "buffer flush"
        await self.store.flush()  # everything read is now durable
        # Give the durable uplinks a moment to deliver what is already in flight, within budget.
        self._stopping_at = "delivery of what is in flight"
        deadline = started + SHUTDOWN_BUDGET / 2
        for name, runner in self.uplinks.durable.items():
            feed = self.store.feeds[name]
            while True:
                left = await feed.undelivered()
                connected = runner.uplink.status.connected
                if left <= 0 or not connected or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            if left > 0:
                why = "the uplink is not connected" if not connected else "delivery took longer than the stop allows"
                log.info("%s: %d event(s) kept in the buffer for the next start (%s)", name, left, why)
        self.pipeline.sinks = []
        self._stopping_at = "uplinks"
        await self.uplinks.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stopping_at = "buffer close"
        await self.store.close()
        self.status.running = self.liveness.running = False
        log.info("agent stopped in %.2fs", time.monotonic() - started)


def _fleet_channel(agent: Agent, desired_start: Start | None) -> LatestValues:
    """Turn the fleet channel on: signed requests checked, then run; the inventory; the desired
    config document, when the agent runs from a site file (docs/fleet.md)."""
    from agent.fleet.channel import FleetChannel
    from agent.fleet.commands import FleetCommands
    from agent.fleet.diagnostics import FleetDiagnostics
    from agent.fleet.inventory import Inventory
    from agent.fleet.latest import LatestValues

    config = agent.config
    latest = LatestValues()

    def enabled(device: str) -> bool | None:
        return next((d.enabled for d in agent.config.devices if d.id == device), None)

    commands = FleetCommands(
        config.gateway.id, latest, agent.inbound, lambda: agent.config.fleet, agent.devices, enabled
    )
    for name in ("ping", "read", "write", "restart"):
        agent.inbound.handle(name, getattr(commands, name))
    diagnostics = FleetDiagnostics(agent)
    agent.inbound.handle("doctor", diagnostics.doctor)
    agent.inbound.handle("diagnostics", diagnostics.diagnostics)
    agent.inbound.channel = FleetChannel(
        config.fleet, config.gateway.id, config.buffer.path.parent, agent.inbound.command
    )
    base = agent.config_path.parent if agent.config_path is not None else Path.cwd()
    agent.inventory = Inventory(agent.status, agent.inbound.reports, base)
    if desired_start is not None:
        from agent.fleet.desired.apply import DesiredConfig

        desired = DesiredConfig(agent, desired_start, agent.inbound.channel.nonces)
        agent.inbound.take_documents("config", desired.take)
        agent.load_file = desired.load_file
        agent.desired = desired
        from agent.fleet.bundles.runner import BundleRunner

        agent.bundles = BundleRunner(agent, desired)
        agent.inbound.take_documents("bundle_offer", agent.bundles.receiver.offer)
        agent.inbound.take_documents("bundle_chunk", agent.bundles.receiver.chunk)
        local = agent.inventory.config_state

        def config_state() -> dict[str, Any]:
            """The inventory names the remote version that runs, or the local file's hash."""
            running = desired.running
            return (
                {"version": running.version, "hash": running.hash, "origin": "remote"} if running.version else local()
            )

        agent.inventory.config_state = config_state
    return latest


def _identity(config: AgentConfigBase) -> Any:
    """The uplink's identity holder when the fleet identity is on (cryptography loads only then)."""
    if config.fleet.identity is None:
        return None
    from agent.fleet.identity.renewal_run import identity_holder

    return identity_holder(config)


def _register_secrets(config: AgentConfigBase) -> None:
    """Make the logs redact every uplink's secrets (read now, as the uplinks will at connect)."""
    for settings in config.uplink.present().values():
        for secret in settings.secrets():
            add_secret(secret)


async def run_agent(config: AgentConfigBase, *, config_path: Path | None = None) -> None:
    """Run an agent until SIGTERM/SIGINT."""
    if not faulthandler.is_enabled():
        # A watchdog kill (SIGABRT) or a crash leaves every thread's stack in the log.
        faulthandler.enable()
    if config.fleet.identity is not None:  # no identity yet: claim one before anything starts
        from agent.fleet.identity.startup import provision_at_start

        provisioned = await provision_at_start(config, config_path)
        if provisioned is None:
            return  # stopped while claiming
        config = provisioned
    agent = Agent(config, config_path=config_path, own_process=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()
