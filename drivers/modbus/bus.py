"""Connections to Modbus devices, shared by every device on the same bus or gateway.

An RS-485 line carries one request at a time: devices on one serial port share one client and
one lock, and leave the inter-frame silence the standard requires (3.5 character times, at
least 1.75 ms above 19200 baud) between a response and the next request. TCP devices each get
their own connection per host:port and poll concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from agent.devices.ports import port_problem
from drivers.modbus.config import ModbusConfig

log = logging.getLogger(__name__)
# Each failure reaches the runtime with the device's id (status events, poll counts); pymodbus's
# own log lines, with frame dumps, would repeat every one of them on every poll.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_READS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}
_FUNCTIONS = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}
MISMATCH = "answer does not match the request (a late answer to an earlier request?)"
_WRITES = {5: "write_coil", 15: "write_coils", 6: "write_register", 16: "write_registers"}
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


GARBLED = "garbled answer (bad CRC or framing; wrong baud rate or parity?)"  # RTU framing
MALFORMED = "garbled answer (no valid frame)"  # Modbus TCP framing, or a frame that does not decode
SHOWN_BYTES = 32  # of a garbled answer, in its log line


class ModbusRequestError(Exception):
    """A request failed; ``reason`` is short and specific (timeout, exception 2 (illegal data address), ...)."""

    def __init__(
        self, reason: str, *, link: bool = False, exception_code: int | None = None, garbled: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.link = link  # the connection itself failed, not just this request
        self.exception_code = exception_code  # the device's exception response, if it sent one
        self.garbled = garbled  # a garbled answer: what came in ("9 bytes, no valid frame in them: 01 04 ...")


class ModbusReadError(ModbusRequestError):
    """A read failed."""


class ModbusWriteError(ModbusRequestError):
    """A write failed or was refused by the device."""


def raise_if_cancelling() -> None:
    """Hand back a cancellation pymodbus swallowed.

    pymodbus turns a cancelled request (device stopped, reload, shutdown) into a
    ModbusIOException, an error response or a failed connect. The cancellation is then spent,
    and the device would poll on for ever, so a reload or a shutdown waiting for it hangs
    (seen with 500 devices: some are always mid-request).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def inter_frame_gap(baudrate: int, bits_per_char: int = 11) -> float:
    """Seconds of silence between RTU frames: 3.5 characters, 1.75 ms above 19200 baud."""
    return 0.00175 if baudrate > 19200 else 3.5 * bits_per_char / baudrate


@dataclass
class Bus:
    """One connection (TCP socket or serial port) and the lock that serialises its requests."""

    key: str
    client: Any
    gap: float = 0.0
    rtu: bool = False  # RTU framing (serial, or RTU over TCP): frames end in a CRC
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    received: bytes = b""  # what came back since the last request was sent
    malformed: str | None = None  # why an answer to the current request did not decode, if one did not
    problem: str | None = None  # why the port did not open (missing, forbidden, busy, a refused setting)
    _quiet_at: float = 0.0
    _waiting: bool = False  # a request was sent and its answer is awaited

    def trace(self, sending: bool, data: bytes) -> bytes:
        """pymodbus's packet hook: keeps what came back for the current request."""
        if sending:
            self.received, self.malformed, self._waiting = b"", None, True
        elif data:
            self.received = data  # pymodbus's receive buffer: all of the answer so far
        return data

    def discard(self, exc: Exception) -> None:
        """An answer's frame did not decode: note why, and end the request waiting for it now.

        pymodbus decodes answers inside the connection's ``data_received``; a frame that does
        not decode (a byte count past its end, an unknown function code, too few bytes for its
        function) raises there. asyncio then logs it with a traceback and, on TCP, drops the
        connection. The framer is wrapped (:func:`_guard`) to call this instead.
        """
        self.malformed = "does not decode" if isinstance(exc, ModbusException) else f"does not decode ({exc})"
        # pymodbus makes a request's future before sending it, so once sent, this one is the request's.
        waiting = self.client.ctx.response_future
        if self._waiting and not waiting.done():
            waiting.set_exception(ModbusIOException(MALFORMED))  # type: ignore[no-untyped-call]

    async def read(self, table: str, address: int, count: int, unit: int) -> list[int] | list[bool]:
        """Registers (or bits) read from ``unit``.

        Raises:
            ModbusReadError: timeout, exception response, garbled or missing answer.
        """
        call = getattr(self.client, _READS[table])
        response = await self._exchange(ModbusReadError, lambda: call(address, count=count, device_id=unit))
        bits = table in ("coil", "discrete")
        # pymodbus hands the waiting request whatever frame of its unit arrives next. On RS-485
        # that can be a unit's late answer to its previous request: the function and size tell.
        size = len(response.bits) if bits else len(response.registers)
        if response.function_code != _FUNCTIONS[table] or size != (-(-count // 8) * 8 if bits else count):
            if size < count and response.function_code == _FUNCTIONS[table]:
                raise ModbusReadError(f"short answer: {size} of {count}")
            # This request's own answer is still on its way: let it arrive while nothing waits
            # (pymodbus drops it), or it would be taken for the next request in turn.
            self._quiet_at = max(self._quiet_at, time.monotonic() + self.client.comm_params.timeout_connect)
            raise ModbusReadError(MISMATCH)
        return list(response.bits[:count]) if bits else list(response.registers)

    async def write(self, function: int, address: int, values: list[int] | list[bool], unit: int) -> None:
        """Write ``values`` from ``address`` on ``unit`` with ``function`` (5, 15: coils; 6, 16: registers).

        Same turn-taking as reads: on an RS-485 line a write waits for the bus like any request.

        Raises:
            ModbusWriteError: timeout, exception response (the device refused), garbled or missing answer.
        """
        call = getattr(self.client, _WRITES[function])
        arg: Any = values[0] if function in (5, 6) else list(values)
        await self._exchange(ModbusWriteError, lambda: call(address, arg, device_id=unit))

    async def _exchange(self, error: type[ModbusRequestError], send: Callable[[], Awaitable[Any]]) -> Any:
        """One request and its answer, alone on the connection, after the line's silence."""
        async with self.lock:
            if not self.client.connected and not await self._connect():
                raise_if_cancelling()
                where = self.key.split(":", 1)[1]
                why = f": {self.problem}" if self.problem else ""
                raise error(f"cannot connect to {where}{why}", link=True)
            wait = self._quiet_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                response = await send()
            except ModbusException as exc:
                raise_if_cancelling()
                reason = _describe(exc)
                if self.malformed is not None:
                    raise error(MALFORMED, garbled=_shown(self.received, self.malformed)) from exc
                if reason == "timeout" and self.received:
                    # Bytes came back but never a valid frame: noise, a bad CRC, a cut frame,
                    # or (typically, when commissioning) the wrong baud rate or parity. Also
                    # when pymodbus, after a few of those in a row, closes the connection (the
                    # next request opens it again).
                    raise error(GARBLED if self.rtu else MALFORMED, garbled=_shown(self.received)) from exc
                if not self.client.connected:
                    raise error("connection lost", link=True) from exc
                raise error(reason) from exc
            finally:
                self._waiting = False
                self._quiet_at = time.monotonic() + self.gap
        raise_if_cancelling()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise error(f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})", exception_code=code)
        return response

    async def _connect(self) -> bool:
        self.problem = None
        failure: BaseException | None = None
        try:
            if await self.client.connect():
                return True
        except (OSError, ModbusException, termios.error) as exc:  # termios: a setting the port refuses
            log.debug("%s: connect failed: %s", self.key, exc)
            failure = exc
        if self.rtu and self.key.startswith("rtu:"):
            # The cause and its fix, in the words of `edge-agent read` and `doctor`, from the first failure.
            params = self.client.comm_params
            setting = f"{params.baudrate} {params.bytesize}{params.parity}{params.stopbits}"
            self.problem = await asyncio.to_thread(port_problem, self.key.split(":", 1)[1], failure, setting)
        return False

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        self.client.close()


def _shown(data: bytes, note: str = "no valid frame in them") -> str:
    """A garbled answer for its log line: ``9 bytes, no valid frame in them: 01 04 04 ...``."""
    shown = " ".join(f"{b:02x}" for b in data[:SHOWN_BYTES]) + (" ..." if len(data) > SHOWN_BYTES else "")
    return f"{len(data)} bytes, {note}: {shown}"


def _guard(bus: Bus) -> None:
    """Route a frame that does not decode to :meth:`Bus.discard` instead of out of the protocol.

    Its bytes are dropped from the receive buffer, the connection stays, and the request
    waiting for the answer fails at once as a garbled answer (not after its timeout).
    """
    framer = bus.client.ctx.framer
    handle = framer.handleFrame

    def tolerant(data: bytes, device_id: int, tid: int) -> tuple[int, Any]:
        try:
            used, pdu = handle(data, device_id, tid)
        except Exception as exc:  # anything a decoder raises on received bytes means they are garbled
            bus.discard(exc)
            return len(data), None
        return int(used), pdu

    framer.handleFrame = tolerant


def _describe(exc: ModbusException) -> str:
    text = str(exc)
    if "No response" in text or "timeout" in text.lower():
        return "timeout"
    if "Connection" in type(exc).__name__ or "connect" in text.lower():
        return "connection lost"
    return text.removeprefix("Modbus Error: ").strip() or type(exc).__name__


class BusPool:
    """The process's buses, created on first use and closed when their last device stops."""

    def __init__(self) -> None:
        """Start with no buses."""
        self._buses: dict[str, Bus] = {}
        self._settings: dict[str, ModbusConfig] = {}

    def acquire(self, config: ModbusConfig) -> Bus:
        """The bus for ``config``; devices on one serial port must agree on its settings.

        Raises:
            ValueError: another device opened the same port with different line settings.
        """
        key = config.bus_key()
        bus = self._buses.get(key)
        if bus is None:
            bus = Bus(key, None, gap=_gap(config), rtu=config.transport != "tcp")
            bus.client = _client(config, bus.trace)
            _guard(bus)
            self._buses[key] = bus
            self._settings[key] = config
        elif config.serial is not None and config.serial != self._settings[key].serial:
            other = self._settings[key]
            raise ValueError(
                f"{config.serial.port} is already open for device {other.id} with {other.serial}; "
                f"devices on one RS-485 bus need the same baudrate, parity and stop bits"
            )
        bus.users += 1
        return bus

    def release(self, bus: Bus) -> None:
        """Drop one user; the last one closes the connection."""
        bus.users -= 1
        if bus.users <= 0:
            bus.close()
            self._buses.pop(bus.key, None)
            self._settings.pop(bus.key, None)


def _gap(config: ModbusConfig) -> float:
    if config.transport == "rtu" and config.serial is not None:
        bits = 1 + config.serial.bytesize + (0 if config.serial.parity == "N" else 1) + config.serial.stopbits
        return inter_frame_gap(config.serial.baudrate, bits)
    return 0.0


def _client(config: ModbusConfig, trace: Any) -> Any:
    # reconnect_delay=0: the driver decides when to reconnect (next poll), so a dead device does
    # not keep a background task hammering it; retries=0: a silent device costs one timeout.
    common: dict[str, Any] = {"timeout": config.timeout, "retries": 0, "reconnect_delay": 0, "trace_packet": trace}
    if config.transport == "rtu" and config.serial is not None:
        s = config.serial
        return AsyncModbusSerialClient(
            s.port, framer=FramerType.RTU, baudrate=s.baudrate, parity=s.parity, stopbits=s.stopbits,
            bytesize=s.bytesize, **common,
        )  # fmt: skip
    framer = FramerType.RTU if config.transport == "rtu_over_tcp" else FramerType.SOCKET
    return AsyncModbusTcpClient(str(config.host), port=config.port, framer=framer, **common)


POOL = BusPool()
