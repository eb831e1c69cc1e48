"""The running devices: one task per device, started, stopped and replaced by config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

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

    async def stop_all(self) -> None:
        """Stop every device at once."""
        for _runner, task in self.running.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.running.values()), return_exceptions=True)
        self.running.clear()

    async def apply(self, old: list[DeviceConfig], new: list[DeviceConfig]) -> list[str]:
        """Replace the devices whose config changed; unchanged ones keep running. Returns ``-id``/``+id``."""
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

    def statuses(self) -> dict[str, str]:
        """Device id -> online / offline / starting..."""
        return {device_id: runner.status for device_id, (runner, _) in list(self.running.items())}

    def drivers(self) -> list[tuple[str, str, str]]:
        """(device, driver, status) of every running device, for the metrics."""
        return [(d, r.config.driver, r.status) for d, (r, _) in list(self.running.items())]
