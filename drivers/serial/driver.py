"""The ``serial`` driver: frames streamed by a sensor on a serial port become city events.

Push-style: the sensor talks when it wants, so ``stream()`` is overridden and yields a batch
whenever bytes complete frames. Health follows the frames, not the port: each ``interval``
without a valid frame is a failed poll (port gone, line silent or only garbage), so the
device goes offline after ``interval x offline_after`` and online again with the next good
frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import serial

from agent.contract.events import Reading
from agent.devices.api import Driver, DriverContext
from agent.errors import DriverStartupError
from drivers.serial.config import SerialConfig
from drivers.serial.faults import FaultLog
from drivers.serial.framing import FAULT_REASONS, BadFrame, BinaryParser, FrameParser, LineParser
from drivers.serial.mapping import BadValueError, EventMapper
from drivers.serial.port import Chunk, PortEvent, PortLost, PortOpened, PortReader, port_problem

log = logging.getLogger(__name__)


def make_parser(config: SerialConfig) -> FrameParser:
    """The parser for the device's framing."""
    if config.framing.kind == "line":
        return LineParser(config.framing)
    return BinaryParser(config.framing)


class SerialDriver(Driver):
    """One sensor on one serial port."""

    config: SerialConfig

    def __init__(self, config: SerialConfig, context: DriverContext) -> None:
        """Build parser and mapper; no I/O (the port is opened by start())."""
        super().__init__(config, context)
        self._parser = make_parser(config)
        self._mapper = EventMapper(config)
        self._faults = FaultLog(config.id, log)
        self._reader = PortReader(config, self._deliver)
        self._queue: asyncio.Queue[PortEvent] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._frames = 0
        self._bytes = 0
        self._port_lost = 0
        self._reopened = 0
        self._lost: str | None = None
        self._bad_since_good: Counter[str] = Counter()
        self._bytes_since_good = 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: good frames, bad frames (total and by reason), bytes, port losses."""
        totals = self._faults.totals
        return {
            "frames": self._frames,
            "bad_frames": self._faults.total,
            **{reason: totals.get(reason, 0) for reason in FAULT_REASONS},
            "bytes": self._bytes,
            "port_lost": self._port_lost,
            "reopened": self._reopened,
        }

    async def start(self) -> None:
        """Open the port; a port that is missing or busy is a startup error (retried)."""
        try:
            await asyncio.to_thread(self._reader.open)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DriverStartupError(f"cannot open {self.config.port}: {exc}{port_problem(self.config.port)}") from exc
        c = self.config
        log.info("device %s: %s open (%d %d%s%d)", c.id, c.port, c.baudrate, c.bytesize, c.parity, c.stopbits)

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Yield a batch per chunk of bytes that completes good frames; report health per interval."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._reader.start()
        interval = self.config.interval
        last_good = time.monotonic()
        deadline = last_good + interval
        try:
            while True:
                event: PortEvent | None = None
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        event = await self._queue.get()
                except TimeoutError:
                    pass  # the watchdog below decides
                now = time.monotonic()
                if isinstance(event, Chunk):
                    batch = self._on_chunk(event, now)
                    if batch:
                        last_good, deadline = now, now + interval
                        self._bad_since_good.clear()
                        self._bytes_since_good = 0
                        self.context.poll_ok()
                        yield batch
                elif isinstance(event, PortLost):
                    self._on_lost(event)
                elif isinstance(event, PortOpened):
                    self._on_reopened(event)
                now = time.monotonic()
                if now >= deadline:
                    self.context.poll_failed(self._silence_reason(now - last_good))
                    deadline = max(deadline + interval, now)
                self._faults.flush(now)
        finally:
            # The runtime also calls stop(); this covers a stream closed on its own.
            self._reader.request_stop()

    async def stop(self) -> None:
        """Stop the reader thread and close the port; log what the line did. Never raises."""
        try:
            await asyncio.to_thread(self._reader.stop)
        except Exception:
            log.warning("device %s: stopping the serial reader failed", self.config.id, exc_info=True)
        s = self.stats
        log.info(
            "device %s: closed %s after %d frames, %d bad (%s), %d port losses",
            self.config.id,
            self.config.port,
            s["frames"],
            s["bad_frames"],
            ", ".join(f"{r} {s[r]}" for r in FAULT_REASONS if s[r]) or "none",
            s["port_lost"],
        )

    # ---- called from the reader thread ------------------------------------------------
    def _deliver(self, event: PortEvent) -> None:
        loop, queue = self._loop, self._queue
        if loop is not None and queue is not None:
            loop.call_soon_threadsafe(queue.put_nowait, event)  # RuntimeError once the loop closed

    # ---- on the loop ----------------------------------------------------------------------
    def _on_chunk(self, chunk: Chunk, now: float) -> list[Reading]:
        self._bytes += len(chunk.data)
        self._bytes_since_good += len(chunk.data)
        batch: list[Reading] = []
        for result in self._parser.feed(chunk.data):
            if isinstance(result, BadFrame):
                self._fault(result.reason, result.detail, now)
                continue
            try:
                batch.append(self._mapper.reading(result, chunk.at))
            except BadValueError as exc:
                self._fault("undecodable", str(exc), now)
            else:
                self._frames += 1
        return batch

    def _fault(self, reason: str, detail: str, now: float) -> None:
        self._bad_since_good[reason] += 1
        self._faults.record(reason, detail, now)

    def _on_lost(self, event: PortLost) -> None:
        self._port_lost += 1
        self._lost = event.reason
        # Bytes of a frame cut by the loss would be glued to the first frame after reopening.
        self._parser.reset()
        log.warning(
            "device %s: port %s lost (%s); reopening with backoff up to %gs",
            self.config.id,
            self.config.port,
            event.reason,
            self.config.reconnect_max,
        )

    def _on_reopened(self, event: PortOpened) -> None:
        self._reopened += 1
        self._lost = None
        log.info("device %s: port %s open again after %.1fs", self.config.id, self.config.port, event.after)

    def _silence_reason(self, silent_for: float) -> str:
        if self._lost is not None:
            return f"port {self.config.port} gone: {self._lost}"
        if self._bad_since_good:
            counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self._bad_since_good.items()))
            return f"no valid frame for {silent_for:.1f}s, only bad ones ({counts})"
        if self._bytes_since_good:
            return f"no complete frame for {silent_for:.1f}s ({self._bytes_since_good} bytes received)"
        return f"no data on {self.config.port} for {silent_for:.1f}s"
