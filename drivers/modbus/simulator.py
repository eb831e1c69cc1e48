"""A Modbus device simulator: serves any profile's points with realistic, changing values.

Used by the demo, the tests and the benchmark, and by a technician (``edge-agent simulate
modbus``) to try a config without the device. Built on pymodbus's own servers; the register
store is ours so that addressing is explicit (zero-based protocol addresses, as in profiles).

Faults can be injected per unit, on a running simulator: answer late (past the client's
timeout), answer with an exception code, take fewer registers per read, refuse writes with an
exception code, stay silent, corrupt the CRC, send garbage before the answer, cut the answer
short, or claim more data in it than it carries (framing intact). Writes are applied to the
unit's tables and recorded in ``SimulatedUnit.writes``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pymodbus import FramerType, ModbusDeviceIdentification
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusDeviceContext, ModbusServerContext
from pymodbus.datastore.store import BaseModbusDataBlock
from pymodbus.framer import FramerRTU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from drivers.modbus import codec
from drivers.modbus.config import BIT_TABLES, PointConfig


@dataclass
class Faults:
    """What a unit does wrong, now. Tests flip these while the simulator runs."""

    delay: float = 0.0  # seconds before answering
    exception: int | None = None  # answer every read with this exception code
    max_count: int | None = None  # answer reads of more registers (or bits) with exception 3
    refuse_writes: int | None = None  # answer every write with this exception code, storing nothing
    silent: bool = False  # no answer at all (a dead unit on a live bus)
    corrupt_crc: bool = False  # RTU: flip the last byte of each answer
    garbage: bytes = b""  # bytes sent before each answer
    truncate: int = 0  # drop this many bytes from the end of each answer
    # A read's answer claims two more bytes than it carries, its framing otherwise intact (the
    # Modbus TCP length field, the RTU CRC): over TCP a frame that does not decode, over RTU
    # one that never ends.
    overcount: bool = False


class Signal:
    """A realistic value for a quantity: noise around a level, counters that only increase."""

    def __init__(self, point: PointConfig, rng: random.Random) -> None:
        """Pick a level fitting the quantity."""
        self.point = point
        self.rng = rng
        levels = {"voltage": 230.0, "current": 12.0, "active_power": 2.7, "reactive_power": 0.4,
                  "apparent_power": 2.9, "frequency": 50.0, "power_factor": 0.95, "flow": 3.2,
                  "temperature": 21.0, "pressure": 3.1}  # fmt: skip
        self.level = levels.get(point.quantity or "", 1.0)
        self.total = rng.uniform(1000, 20000)  # energy, volume, counter
        self.state = 0

    def next(self, dt: float) -> float | int | str:
        """The value after ``dt`` more seconds."""
        q = self.point.quantity
        if self.point.type == "string":
            return "SIM-0001"
        if q in ("active_energy", "active_energy_export", "reactive_energy", "volume", "counter"):
            self.total += dt * self.level * (0.5 + self.rng.random())
            return self.total
        if q == "digital_input" or self.point.bay is not None or self.point.type in ("bool", "bitfield"):
            if self.rng.random() < 0.05:
                self.state ^= 1
            return self.state
        if self.point.area is not None:
            return max(0, round(self.rng.gauss(2, 1.5)))
        if q == "power_factor":
            return min(1.0, self.level + self.rng.gauss(0, 0.01))
        wobble = math.sin(time.monotonic() / 60.0) * 0.05
        return self.level * (1 + wobble) + self.rng.gauss(0, self.level * 0.005)


def raw_registers(point: PointConfig, value: float | int | str, byte_order: str, word_order: str) -> list[int]:
    """Registers holding ``value`` as ``point`` decodes it (inverse of scale and offset)."""
    if point.type == "string":
        return codec.encode(str(value), "string", byte_order=point.byte_order or byte_order, length=point.length)
    raw = (float(value) - point.offset) / point.scale
    if point.type == "bitfield":
        return [(int(value) & 1) << (point.bit or 0)]
    if not point.type.startswith("float"):
        raw = round(raw)
        if point.type.startswith("u"):
            raw = max(0, raw)
    return codec.encode(raw, point.type, byte_order=point.byte_order or byte_order,
                        word_order=point.word_order or word_order)  # fmt: skip


class _Block(BaseModbusDataBlock[dict[int, Any]]):
    """One table of one unit. pymodbus hands us the protocol address + 1; we store zero-based."""

    def __init__(self, unit: SimulatedUnit, bits: bool) -> None:
        self.unit = unit
        self.bits = bits
        self.values: dict[int, Any] = {}
        self.address = 0
        self.default_value = False if bits else 0

    def getValues(self, address: int, count: int = 1) -> list[int] | list[bool] | ExcCodes:
        start = address - 1
        if self.unit.strict and any(a not in self.values for a in range(start, start + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        return [self.values.get(a, self.default_value) for a in range(start, start + count)]

    def setValues(self, address: int, values: Any) -> ExcCodes | None:
        for i, v in enumerate(values):
            self.values[address - 1 + i] = v
        return None


class _UnitContext(ModbusDeviceContext):
    """A unit's tables, with its faults applied before every read."""

    def __init__(self, unit: SimulatedUnit) -> None:
        t = unit.tables
        super().__init__(hr=t["holding"], ir=t["input"], co=t["coil"], di=t["discrete"])
        self.unit = unit

    async def async_getValues(self, func_code: int, address: int, count: int = 1) -> list[int] | list[bool] | ExcCodes:
        faults = self.unit.faults
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.exception is not None:
            return ExcCodes(faults.exception)
        if faults.max_count is not None and count > faults.max_count:
            return ExcCodes.ILLEGAL_VALUE
        return self.getValues(func_code, address, count)

    async def async_setValues(self, func_code: int, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        if self.unit.faults.refuse_writes is not None:
            return ExcCodes(self.unit.faults.refuse_writes)
        self.unit.wrote(func_code, address, list(values))
        return self.setValues(func_code, address, values)


@dataclass
class SimulatedUnit:
    """One simulated device: a unit id, its points, and their evolving values."""

    unit: int
    points: list[PointConfig]
    byte_order: str = "big"
    word_order: str = "big"
    strict: bool = False  # undefined registers -> exception 2 (some meters), else read as 0
    seed: int | None = None
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        """Build the four tables and the signals."""
        self.tables = {t: _Block(self, t in BIT_TABLES) for t in ("holding", "input", "coil", "discrete")}
        self.writes: list[tuple[int, int, list[int] | list[bool]]] = []  # (function, address, values) received
        self.held: set[str] = set()  # points written by a client: they keep that value, as a setpoint does
        rng = random.Random(self.seed if self.seed is not None else self.unit)
        self.signals = [Signal(p, rng) for p in self.points]
        self.context = _UnitContext(self)
        self.step(0.0)

    def step(self, dt: float) -> None:
        """Advance every signal by ``dt`` seconds and store the new values (written points keep theirs)."""
        for signal in self.signals:
            if signal.point.name not in self.held:
                self.set(signal.point, signal.next(dt))

    def wrote(self, function: int, address: int, values: list[int] | list[bool]) -> None:
        """Note a client's write (already checked); the points it touched stop following their signal."""
        self.writes.append((function, address, values))
        table = "coil" if function in (5, 15) else "holding"
        end = address + len(values)
        self.held |= {p.name for p in self.points if p.table == table and p.address < end
                      and address < p.address + p.registers}  # fmt: skip

    def set(self, point: PointConfig, value: float | int | str) -> None:
        """Store ``value`` (engineering units) into ``point``'s registers."""
        block = self.tables[point.table]
        if point.table in BIT_TABLES:
            block.values[point.address] = bool(value)
        else:
            for i, reg in enumerate(raw_registers(point, value, self.byte_order, self.word_order)):
                block.values[point.address + i] = reg

    def set_registers(self, table: str, address: int, registers: list[int]) -> None:
        """Store raw registers (tests use it for hand-computed values)."""
        for i, reg in enumerate(registers):
            self.tables[table].values[address + i] = reg


def _overcount(frame: bytes, framer: FramerType) -> bytes:
    """A read's answer (functions 1-4) whose byte count is two more than the bytes that follow it."""
    at = 8 if framer == FramerType.SOCKET else 2  # the byte count: after MBAP or unit, and the function
    if len(frame) <= at or frame[at - 1] not in (1, 2, 3, 4):
        return frame
    frame = frame[:at] + bytes([(frame[at] + 2) & 0xFF]) + frame[at + 1 :]
    if framer == FramerType.SOCKET:
        return frame
    body = frame[:-2]
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


class Simulator:
    """A pymodbus server (TCP, RTU over TCP, or RTU on a serial port) serving simulated units."""

    def __init__(
        self, units: list[SimulatedUnit], *, period: float = 0.5, identity: dict[str, str] | None = None
    ) -> None:
        """Units are served from :meth:`serve_tcp` / :meth:`serve_serial`; values move every ``period``.

        ``identity``: FC 43/14 objects (VendorName, ProductCode, ...) to answer with (pymodbus keeps
        them process-wide); None: empty ones.
        """
        self.units = {u.unit: u for u in units}
        self.identity = ModbusDeviceIdentification(info_name=identity) if identity else None  # type: ignore[no-untyped-call]
        self.period = period
        self.requests = 0
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._context = ModbusServerContext(  # type: ignore[no-untyped-call]
            devices={u.unit: u.context for u in units}, single=False
        )
        self._last_unit: int | None = None
        # (monotonic time, sending?) of recent frames: lets tests measure the silence between them
        self.frames: deque[tuple[float, bool]] = deque(maxlen=1000)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        self.frames.append((time.monotonic(), sending))
        if not sending:
            self.requests += 1
            # RTU: byte 0 is the unit; TCP (MBAP): byte 6. Enough to route faults.
            self._last_unit = data[6] if self._framer == FramerType.SOCKET and len(data) > 6 else (
                data[0] if data else None)  # fmt: skip
            return data
        unit = self.units.get(self._last_unit or -1)
        if unit is None:
            return data
        f = unit.faults
        if f.silent:
            return b""
        if f.overcount:
            data = _overcount(data, self._framer)
        if f.corrupt_crc and data:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if f.truncate:
            data = data[: max(0, len(data) - f.truncate)]
        return f.garbage + data

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 5020, *, rtu_framing: bool = False) -> None:
        """Listen on ``host:port`` until :meth:`stop`; returns once listening."""
        self._framer = FramerType.RTU if rtu_framing else FramerType.SOCKET
        server = ModbusTcpServer(self._context, framer=self._framer, address=(host, port), identity=self.identity,
                                 trace_packet=self._trace)  # fmt: skip
        await self._start(server)

    async def serve_serial(self, port: str, *, baudrate: int = 9600, parity: str = "N", stopbits: int = 1) -> None:
        """Answer on a serial port (or a pseudo-terminal); returns once open."""
        self._framer = FramerType.RTU
        # On RS-485 a unit that is not there is silent; it does not answer for others.
        server = ModbusSerialServer(self._context, framer=FramerType.RTU, port=port, baudrate=baudrate,
                                    parity=parity, stopbits=stopbits, ignore_missing_devices=True,
                                    identity=self.identity, trace_packet=self._trace)  # fmt: skip
        await self._start(server)

    async def _start(self, server: ModbusTcpServer | ModbusSerialServer) -> None:
        self._server = server
        self._tasks.append(asyncio.create_task(server.serve_forever()))
        self._tasks.append(asyncio.create_task(self._evolve()))
        for _ in range(200):
            if server.is_active():
                return
            await asyncio.sleep(0.01)
        raise OSError("simulator did not start listening")

    async def _evolve(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            for unit in self.units.values():
                unit.step(now - last)
            last = now

    async def stop(self) -> None:
        """Stop serving and close connections."""
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
