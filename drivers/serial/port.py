"""The serial port, owned by one thread: blocking reads, loss detection, reopening with backoff.

pyserial's reads block; running them on the asyncio loop would stall every other device
and the uplink. One thread per port does all the blocking work (open, read, close) and hands
what happens to the loop through a callback, so the port is never touched from two threads.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import serial

from drivers.serial.config import SerialConfig

log = logging.getLogger(__name__)

# Bounds how long stop() may wait for a read in progress (cancel_read usually ends it at once).
READ_TIMEOUT = 0.2
REOPEN_MIN = 0.25
READ_MAX = 4096


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes read from the port and when they arrived."""

    data: bytes
    at: datetime


@dataclass(frozen=True, slots=True)
class PortLost:
    """The port failed (adapter unplugged, cable cut on a USB-RS485 converter...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class PortOpened:
    """The port was opened again after a loss."""

    after: float


PortEvent = Chunk | PortLost | PortOpened


def port_problem(path: str) -> str:
    """An actionable hint why ``path`` cannot be opened ('' if none is obvious)."""
    if not os.path.exists(path):
        by_id_dir = Path("/dev/serial/by-id")
        by_id = sorted(str(p) for p in by_id_dir.glob("*")) if by_id_dir.is_dir() else []
        return f"; adapters present: {', '.join(by_id)}" if by_id else "; is the adapter plugged in?"
    if not os.access(path, os.R_OK | os.W_OK):
        try:
            group = grp.getgrgid(os.stat(path).st_gid).gr_name
        except (KeyError, OSError):
            group = "the port's group"
        return f"; no permission: add the agent's user to {group}"
    return ""


def open_port(config: SerialConfig) -> serial.Serial:
    """Open the configured port (blocking).

    Raises:
        serial.SerialException | OSError: with pyserial's reason.
    """
    port = serial.Serial(
        port=None,
        baudrate=config.baudrate,
        bytesize=config.bytesize,
        parity=config.parity,
        stopbits=config.stopbits,
        timeout=READ_TIMEOUT,
        exclusive=True,  # two readers on one port would each get half the bytes
    )
    port.port = config.port
    port.open()
    return port


class PortReader:
    """Reads one port in a thread until stopped; reopens it after a loss with backoff."""

    def __init__(self, config: SerialConfig, deliver: Callable[[PortEvent], None]) -> None:
        """``deliver`` is called from the reader thread; it must be thread-safe."""
        self._config = config
        self._deliver = deliver
        self._port: serial.Serial | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Open the port now (blocking), for the driver's start().

        Raises:
            serial.SerialException | OSError: the port cannot be opened.
        """
        self._port = open_port(self._config)

    def start(self) -> None:
        """Start the reader thread (the port should already be open)."""
        self._thread = threading.Thread(target=self._run, name=f"serial-{self._config.id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop (non-blocking); it closes the port on its way out."""
        self._stop.set()
        port = self._port
        if port is not None and self._thread is not None:
            # cancel_read wakes a read blocked in select() at once; if it fails, the read
            # times out anyway, and stopping must not raise.
            with contextlib.suppress(Exception):
                port.cancel_read()

    def stop(self) -> None:
        """Stop reading and close the port (blocking, within about READ_TIMEOUT). Never raises."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=5 * READ_TIMEOUT + 1)
            if self._thread.is_alive():
                log.warning("device %s: serial reader thread did not stop", self._config.id)
                return  # leave the port to the thread rather than close it under its feet
        self._close()

    def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:
                log.debug("device %s: closing %s failed", self._config.id, self._config.port, exc_info=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._port is None and not self._reopen():
                    return
                self._read_until_lost()
        except RuntimeError:
            return  # the event loop is closed: the agent is shutting down
        finally:
            self._close()

    def _read_until_lost(self) -> None:
        port = self._port
        assert port is not None
        while not self._stop.is_set():
            try:
                data = port.read(1)
                if data and port.in_waiting:
                    data += port.read(min(port.in_waiting, READ_MAX))
            except Exception as exc:  # whatever the cause, this port object is done: reopen
                if self._stop.is_set():
                    return
                self._close()
                self._deliver(PortLost(f"{type(exc).__name__}: {exc}"))
                return
            if data:
                self._deliver(Chunk(data, datetime.now(UTC)))

    def _reopen(self) -> bool:
        """Retry opening with backoff until it works (True) or stop is asked (False)."""
        delay = REOPEN_MIN
        lost_at = time.monotonic()
        attempts = 0
        while not self._stop.wait(delay):
            attempts += 1
            try:
                self._port = open_port(self._config)
            except (serial.SerialException, OSError, ValueError) as exc:
                if attempts == 1 or attempts % 10 == 0:
                    log.info(
                        "device %s: cannot reopen %s (attempt %d): %s%s",
                        self._config.id,
                        self._config.port,
                        attempts,
                        exc,
                        port_problem(self._config.port),
                    )
                delay = min(delay * 2, self._config.reconnect_max)
                continue
            self._deliver(PortOpened(time.monotonic() - lost_at))
            return True
        return False
