"""Real parts for the serial driver's tests: a simulator feeding a pty, the driver in a real runner."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from agent.contract.events import DEVICE_STATUS, Reading
from agent.devices.runner import DeviceRunner
from drivers.serial import PLUGIN
from drivers.serial.config import SerialConfig
from drivers.serial.driver import SerialDriver
from drivers.serial.framing import BadFrame, Frame, FrameParser, Result
from drivers.serial.simulator import PtySink, Simulator


def feed_chunked(parser: FrameParser, data: bytes, sizes: list[int]) -> list[Result]:
    """Feed ``data`` in chunks of the given sizes (cycled), as a serial port would deliver it."""
    out: list[Result] = []
    at, i = 0, 0
    while at < len(data):
        size = max(1, sizes[i % len(sizes)]) if sizes else len(data)
        out += parser.feed(data[at : at + size])
        at += size
        i += 1
    return out


def summary(results: list[Result]) -> tuple[list[Any], dict[str, int]]:
    """Frames' values in order, and bad frames by reason."""
    frames = [r.values for r in results if isinstance(r, Frame)]
    faults: dict[str, int] = {}
    for r in results:
        if isinstance(r, BadFrame):
            faults[r.reason] = faults.get(r.reason, 0) + 1
    return frames, faults


def device_lines(sim: Simulator, device_id: str, port: str, **extra: Any) -> str:
    """The simulator's device config as lines under ``devices:`` for ``write_config``."""
    return "".join(f"  {line}\n" for line in sim.device_yaml(device_id, port, **extra).splitlines())


def config_for(sim: Simulator, port: str, **extra: Any) -> SerialConfig:
    """A validated device config that reads ``sim`` on ``port``."""
    return SerialConfig.model_validate(sim.device_config("sensor-1", port, **extra))


class Feeder:
    """Writes the simulator's frame slots to a pty at a rate, in a thread, until stopped."""

    def __init__(self, sim: Simulator, sink: PtySink, rate: float, slots: int | None = None) -> None:
        self.sim, self.sink, self.rate, self.slots = sim, sink, rate, slots
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set() and (self.slots is None or self.sent < self.slots):
            assert self.sink.write(self.sim.slot()), "nobody drained the pty"
            self.sent += 1
            next_at += 1 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class RunningDriver:
    """The serial driver, streaming in an event loop thread, with the agent's real DeviceRunner as context."""

    def __init__(self, config: SerialConfig) -> None:
        self.readings: list[Reading] = []
        self.statuses: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.runner = DeviceRunner(config, PLUGIN, self._emit)
        self.driver = SerialDriver(config, self.runner)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        assert self._started.wait(5), "the driver did not start"
        if self.error is not None:
            raise self.error

    def _emit(self, _device: str, reading: Reading) -> None:
        with self.lock:
            if reading.type == DEVICE_STATUS:
                self.statuses.append(reading.data)
            else:
                self.readings.append(reading)

    async def _run(self) -> None:
        try:
            await self.driver.start()
        except BaseException as exc:
            self.error = exc
            self._started.set()
            raise
        self._started.set()
        async for batch in self.driver.stream():
            for reading in batch:
                self._emit("", reading)

    def snapshot(self) -> list[Reading]:
        with self.lock:
            return list(self.readings)

    def status_list(self) -> list[str]:
        with self.lock:
            return [s["status"] for s in self.statuses]

    def close(self) -> None:
        async def stop() -> None:
            self._task.cancel()
            await self.driver.stop()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
