"""Runs one device: starts its driver, feeds its readings on, tracks and reports its status.

A misbehaving device is isolated here: its exceptions end in a status event and a restart
with backoff, never in the agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime

from agent.contract.data import device_status
from agent.contract.events import DEVICE_STATUS, Reading
from agent.devices.api import DeviceConfig, Driver, DriverContext, DriverPlugin
from agent.errors import AgentError, DriverFatalError, DriverStartupError
from agent.observability.logs import bind
from agent.observability.metrics import DeviceTelemetry

log = logging.getLogger(__name__)

RESTART_MIN = 1.0
RESTART_MAX = 60.0
STOP_TIMEOUT = 2.0
YIELD_EVERY = 32  # readings handed on before a device lets other tasks run


class DeviceFailedError(AgentError):
    """A device with ``startup_error_behavior: error`` could not start: the agent stops."""


class DeviceRunner(DriverContext):
    """Owns one device's driver for as long as the device is configured."""

    def __init__(
        self,
        config: DeviceConfig,
        plugin: DriverPlugin,
        emit: Callable[[str, Reading], None],
        telemetry: DeviceTelemetry | None = None,
    ) -> None:
        """Prepare; :meth:`run` does the work.

        ``telemetry`` collects poll timings and failure reasons for the metrics; the runtime
        keeps it per device id so the figures outlive a restart of the device.
        """
        self.config = config
        self.device_id = config.id
        self.plugin = plugin
        self._emit = emit
        self.status = "starting"
        self.reason: str | None = None
        self.failures = 0
        self.polls_ok = 0
        self.polls_failed = 0
        self._started_once = False
        self.driver: Driver | None = None  # the running instance (writes go to it)
        self.telemetry = telemetry if telemetry is not None else DeviceTelemetry(config.id, config.driver)

    # ---- DriverContext ----------------------------------------------------------
    def poll_ok(self) -> None:
        """The device answered."""
        self.polls_ok += 1
        self.failures = 0
        if self.status != "online":
            self._set_status("online", None)

    def poll_failed(self, reason: str) -> None:
        """The device did not answer; offline after ``offline_after`` in a row."""
        self.polls_failed += 1
        self.failures += 1
        self.reason = reason
        self.telemetry.poll_failed(reason)
        if self.failures >= self.config.offline_after and self.status != "offline":
            self._set_status("offline", reason)

    def count_failure(self, reason: str) -> None:
        """A failure counted by reason that leaves the device's status alone."""
        self.telemetry.poll_failed(reason)

    def observe_poll(self, seconds: float) -> None:
        """How long one poll took (into the device's poll latency histogram)."""
        self.telemetry.observe_poll(seconds)

    def observe_inference(self, model: str, seconds: float) -> None:
        """How long one inference of ``model`` took (into the inference histogram)."""
        self.telemetry.observe_inference(model, seconds)

    def _set_status(self, status: str, reason: str | None) -> None:
        self.status, self.reason = status, reason
        if status == "offline":
            log.warning(
                "device %s offline: %s",
                self.device_id,
                reason,
                extra={"subject": f"device {self.device_id}", "state": "offline"},
            )
        else:
            log.info(
                "device %s %s", self.device_id, status, extra={"subject": f"device {self.device_id}", "state": status}
            )
        data = device_status(status, reason, self.config.driver, self.failures, datetime.now(UTC))
        self._emit(self.device_id, Reading(DEVICE_STATUS, data))

    # ---- lifecycle ----------------------------------------------------------------
    async def run(self) -> None:
        """Start, stream, and restart the driver after faults, until cancelled."""
        # This task's log lines (the driver's too) carry the device: see agent/observability/logs.py.
        bind(device=self.device_id, driver=self.config.driver)
        attempt = 0
        while True:
            driver = self.driver = self.plugin.factory()(self.config, self)
            try:
                await self._start(driver)
                attempt = 0
                async for batch in driver.stream():
                    for n, reading in enumerate(batch, 1):
                        self._emit(self.device_id, reading)
                        if n % YIELD_EVERY == 0:
                            # A big batch must not hold the loop: the uplink and the other
                            # devices get their turn between slices of it.
                            await asyncio.sleep(0)
                return  # a finite stream (rare) ends the device
            except DriverFatalError as exc:
                self.poll_failed(str(exc))
                self._force_offline(f"driver gave up: {exc}")
                return
            except DeviceFailedError:
                raise
            except _Ignored:
                return
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.poll_failed(reason)
            finally:
                await self._stop(driver)
            attempt += 1
            await asyncio.sleep(random.uniform(RESTART_MIN, min(RESTART_MAX, RESTART_MIN * 2**attempt)))

    async def _start(self, driver: Driver) -> None:
        try:
            await driver.start()
        except DriverStartupError as exc:
            # The policy is about boot; a device that ran once is always retried.
            behavior = self.config.startup_error_behavior if not self._started_once else "retry"
            if behavior == "error" or not exc.retry:
                raise DeviceFailedError(f"device {self.device_id} could not start: {exc}") from exc
            if behavior == "ignore":
                self._force_offline(f"not started (startup_error_behavior: ignore): {exc}")
                raise _Ignored from exc
            raise
        self._started_once = True

    def _force_offline(self, reason: str) -> None:
        if self.status != "offline":
            self.failures = max(self.failures, self.config.offline_after)
            self._set_status("offline", reason)

    async def _stop(self, driver: Driver) -> None:
        try:
            await asyncio.wait_for(driver.stop(), STOP_TIMEOUT)
        except Exception:
            log.warning("device %s: driver did not stop cleanly", self.device_id, exc_info=True)


class _Ignored(Exception):
    """A device that failed to start under ``startup_error_behavior: ignore``."""
