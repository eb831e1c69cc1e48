"""The running devices: one task per device, started, stopped and replaced by config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from agent.contract.events import Reading
from agent.devices.api import DeviceConfig, Driver
from agent.devices.registry import load_plugins
from agent.devices.runner import DeviceFailedError, DeviceRunner
from agent.observability.metrics import DeviceTelemetry

log = logging.getLogger(__name__)


class DeviceSet:
    """Device runners by id, with telemetry that survives a device's restart."""

    def __init__(self, emit: Callable[[str, Reading], None], on_fatal: Callable[[BaseException], None]) -> None:
        """``emit`` takes every reading; ``on_fatal`` is told when a device must stop the agent."""
        self._emit = emit
        self._on_fatal = on_fatal
        self.running: dict[str, tuple[DeviceRunner, asyncio.Task[None]]] = {}
        self.telemetry: dict[str, DeviceTelemetry] = {}
        # A reload and a remote restart both stop and start devices: one at a time, or a device
        # could end up with two runners (the restart starting the config the reload replaced).
        self._changing = asyncio.Lock()
        self._closed = False

    def start(self, cfg: DeviceConfig) -> None:
        """Run one device."""
        plugin = load_plugins()[cfg.driver]
        telemetry = self.telemetry.get(cfg.id)
        if telemetry is None or telemetry.driver != cfg.driver:
            telemetry = self.telemetry[cfg.id] = DeviceTelemetry(cfg.id, cfg.driver)
        runner = DeviceRunner(cfg, plugin, self._emit, telemetry)
        task = asyncio.get_running_loop().create_task(self._guard(runner), name=f"device-{cfg.id}")
        self.running[cfg.id] = (runner, task)

    async def _guard(self, runner: DeviceRunner) -> None:
        try:
            await runner.run()
        except DeviceFailedError as exc:
            log.error("%s (startup_error_behavior: error); stopping the agent", exc)
            self._on_fatal(exc)

    async def stop(self, device_id: str) -> None:
        """Stop one device (nothing if it is not running)."""
        entry = self.running.pop(device_id, None)
        if entry is None:  # already stopped (a shutdown during a reload)
            return
        _runner, task = entry
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def restart(self, device_id: str, settle: float = 0.0) -> DeviceRunner | None:
        """Stop one running device and start it again with its config; None if it is not running.

        Its telemetry carries on and its events' seq continues (the store numbers each device's
        events, not the runner). ``settle``: seconds to wait for its first poll, so the caller
        can say whether it came back.
        """
        async with self._changing:
            entry = self.running.get(device_id)
            if entry is None or self._closed:
                return None
            config = entry[0].config
            if config.startup_error_behavior == "error":
                # That policy is about boot: a device that will not come back after a remote
                # restart must not stop the agent (and every other device) with it.
                config = config.model_copy(update={"startup_error_behavior": "retry"})
            await self.stop(device_id)
            self.start(config)
            runner = self.running[device_id][0]
        log.info("device %s restarted on request", device_id)
        deadline = asyncio.get_running_loop().time() + settle
        while runner.status == "starting" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return runner

    async def stop_all(self) -> None:
        """Stop every device at once."""
        self._closed = True
        for _runner, task in self.running.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.running.values()), return_exceptions=True)
        self.running.clear()

    async def apply(self, old: list[DeviceConfig], new: list[DeviceConfig]) -> list[str]:
        """Replace the devices whose config changed; unchanged ones keep running. Returns ``-id``/``+id``."""
        async with self._changing:
            return await self._apply(old, new)

    async def _apply(self, old: list[DeviceConfig], new: list[DeviceConfig]) -> list[str]:
        old_devices = {d.id: d for d in old if d.enabled}
        new_devices = {d.id: d for d in new if d.enabled}
        leaving = [device_id for device_id, cfg in old_devices.items() if new_devices.get(device_id) != cfg]
        # All at once: one by one, 500 devices cost 500 turns of a busy loop (seconds).
        await asyncio.gather(*(self.stop(device_id) for device_id in leaving))
        changes = [f"-{device_id}" for device_id in leaving]
        for device_id, cfg in new_devices.items():
            if old_devices.get(device_id) != cfg:
                self.start(cfg)
                changes.append(f"+{device_id}")
        for device_id in list(self.telemetry):
            if device_id not in new_devices:
                del self.telemetry[device_id]  # removed devices leave the metrics
        return changes

    def driver_of(self, device_id: str) -> Driver | None:
        """The running driver of a device, for writes."""
        entry = self.running.get(device_id)
        return entry[0].driver if entry is not None else None

    def links(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """The running drivers' shared upstream connections: name -> (driver, its state and counters)."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        plugins = load_plugins()
        for driver in sorted({runner.config.driver for runner, _ in list(self.running.values())}):
            links = plugins[driver].links if driver in plugins else None
            if links is not None:
                out.update({name: (driver, up) for name, up in links().items()})
        return out

    def statuses(self) -> dict[str, str]:
        """Device id -> online / offline / starting..."""
        return {device_id: runner.status for device_id, (runner, _) in list(self.running.items())}

    def reasons(self) -> dict[str, str | None]:
        """Device id -> why its last poll failed (None if it did not)."""
        return {device_id: runner.reason for device_id, (runner, _) in list(self.running.items())}

    def drivers(self) -> list[tuple[str, str, str]]:
        """(device, driver, status) of every running device, for the metrics."""
        return [(d, r.config.driver, r.status) for d, (r, _) in list(self.running.items())]
