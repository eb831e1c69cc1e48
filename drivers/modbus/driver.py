"""The Modbus driver: planned reads, decoding, quality, report-on-change, event mapping."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from agent.contract.data import crosswalk_presence, measurement, meter_reading, parking_occupancy
from agent.contract.events import CROSSWALK_PRESENCE, METER_READING, PARKING_OCCUPANCY, Reading
from agent.devices.api import Driver, DriverContext
from agent.errors import DriverFatalError, DriverWriteError, WriteFailure
from drivers.modbus import codec
from drivers.modbus.bus import POOL, Bus, ModbusReadError, ModbusWriteError, raise_if_cancelling
from drivers.modbus.config import BIT_TABLES, UNWRITABLE_TYPES, WRITABLE_TABLES, ModbusConfig, PointConfig
from drivers.modbus.plan import Request, plan, split

log = logging.getLogger(__name__)


# A point's outcome in one poll: (point, value, None), or (point, None, why there is none).
# A plain tuple: a poll makes one per point, and a dataclass costs ten times as much to build.
_Sample = tuple[PointConfig, float | int | str | None, str | None]


MAX_PHASE_SPREAD = 2.0  # seconds over which devices' first polls are spread


def decoder_for(point: PointConfig, config: ModbusConfig) -> codec.Decoder | None:
    """The point's compiled decoder (None for coils and discrete inputs, which are bits)."""
    if point.table in BIT_TABLES:
        return None
    return codec.compile_decoder(
        point.type,
        byte_order=point.byte_order or config.byte_order,
        word_order=point.word_order or config.word_order,
        bit=point.bit,
        length=point.registers,
        scale=point.scale,
        offset=point.offset,
    )


def decode_point(
    point: PointConfig, values: list[int] | list[bool], start: int, config: ModbusConfig
) -> float | int | str:
    """The engineering value of ``point`` out of a request's ``values`` that begin at ``start``."""
    decoder = decoder_for(point, config)
    if decoder is None:
        return int(bool(values[point.address - start]))
    return decoder(struct.pack(f">{len(values)}H", *values), 2 * (point.address - start))


# Exceptions a unit answers when a read is not one it takes: 2, an address in the span it does not
# define; 3, more registers than it reads at once. Either way, smaller reads may succeed.
_SPLIT_ON = (2, 3)


def _changed(
    quantity: str | None, deadband: float | None, value: Any, quality: str, last: tuple[Any, str] | None
) -> bool:
    """Whether a point's (value, quality) is worth reporting against the last one reported."""
    if last is None or last[1] != quality:
        return True
    if quantity is not None:
        if deadband is None:
            return True  # no deadband: a meter reports every poll
        if isinstance(value, int | float) and isinstance(last[0], int | float):
            return abs(value - last[0]) > deadband
    return bool(value != last[0])


class NotWritable(ValueError):
    """The point takes no writes: its table, its type, or its config."""


# What a device's exception response means for the writer (the rest: device_error).
_EXCEPTION_KINDS: dict[int, WriteFailure] = {1: "not_writable", 2: "not_writable", 3: "out_of_range"}


def write_values(point: PointConfig, value: Any, config: ModbusConfig) -> list[int] | list[bool]:
    """What goes on the wire to set ``point`` to ``value`` (engineering units): coil bits or registers.

    Raises:
        NotWritable: the point cannot be written (its table, type or config).
        codec.OutOfRange: the value does not fit the point.
        ValueError: the value is not one the point can take.
    """
    if point.table not in WRITABLE_TABLES:
        kind = "an input register" if point.table == "input" else "a discrete input"
        raise NotWritable(f"point {point.name!r} is {kind}: read-only in Modbus")
    if point.type in UNWRITABLE_TYPES:
        raise NotWritable(f"point {point.name!r} is a {point.type}: not writable")
    if not point.writable:
        raise NotWritable(f"point {point.name!r} is not writable (set writable: true on the point to allow it)")
    if point.table == "coil":
        # 0/1 as numbers too: OPC UA clients often send a coil's state as a Double.
        if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
            return [bool(value)]
        raise ValueError(f"a coil takes true/false (or 1/0), not {value!r}")
    return codec.encode_scaled(
        value,
        point.type,
        byte_order=point.byte_order or config.byte_order,
        word_order=point.word_order or config.word_order,
        scale=point.scale,
        offset=point.offset,
    )


class ModbusDriver(Driver):
    """Polls one unit through a shared bus; see the module docstring of each part for the rules."""

    config: ModbusConfig

    def __init__(self, config: ModbusConfig, context: DriverContext) -> None:
        """Plan the reads once; no I/O."""
        super().__init__(config, context)
        self.requests: list[Request] = plan(config)
        # What is actually read for each planned request: itself, or the parts of it the unit took.
        self._reads: dict[int, list[Request]] = {id(r): [r] for r in self._prepared(self.requests)}
        self._decoders = {p.name: decoder_for(p, config) for p in config.points}
        # Per point, what each poll needs: (quantity, unit, phase, deadband) and (float?, scale, offset).
        self._info = {
            p.name: (p.quantity, p.event_unit, p.phase, p.deadband if p.deadband is not None else config.deadband)
            for p in config.points
        }
        self._scaling = {
            p.name: (p.type.startswith("float"), None if (p.scale, p.offset) == (1.0, 0.0) else p.scale, p.offset)
            for p in config.points
        }
        self._bus: Bus | None = None
        self._link_failure: str | None = None  # the link failure last logged (each new one is, at once)
        self._good: dict[str, float | int | str] = {}  # last good value per point
        self._reported: dict[str, tuple[Any, str]] = {}  # last reported (value, quality) per point
        self._since: dict[str, datetime] = {}  # when each bay entered its state
        self._window_max: dict[str, int] = {}
        self._full_at = 0.0
        self._points = {p.name: p for p in config.points}
        # Points written since their last report: the next poll reports them whatever the deadband,
        # so whoever wrote sees the device's own value come back.
        self._written: set[str] = set()
        self.stats = {"polls": 0, "requests": 0, "failed_requests": 0, "writes": 0, "failed_writes": 0,
                      "splits": 0}  # fmt: skip

    async def start(self) -> None:
        """Join the device's bus (shared with the other units on the same port)."""
        try:
            self._bus = POOL.acquire(self.config)
        except ValueError as exc:
            raise DriverFatalError(str(exc)) from exc

    async def stop(self) -> None:
        """Leave the bus; the last device on it closes the connection."""
        if self._bus is not None:
            POOL.release(self._bus)
            self._bus = None

    async def write(self, point: str, value: Any) -> None:
        """Write ``value`` (engineering units) to a writable coil or holding-register point.

        The value goes through the point's scale, offset, type, byte and word order; the request
        takes its turn on the bus like a poll. Every attempt is logged with its outcome.

        Raises:
            DriverWriteError: unknown or unwritable point, a value that does not fit, the device not
                running, or the device refused or did not answer.
        """
        device = self.config.id
        spec = self._points.get(point)
        try:
            if spec is None:
                raise NotWritable(f"no point {point!r}")
            values = write_values(spec, value, self.config)
            function = self.config.write_function(spec)
            if function is None:  # refused when the config loads; kept for configs built in code
                raise NotWritable(f"none of write_functions {self.config.write_functions} writes point {point!r}")
        except ValueError as exc:
            log.warning("device %s: write %s = %r refused: %s", device, point, value, exc)
            kind: WriteFailure = (
                "not_writable" if isinstance(exc, NotWritable)
                else "out_of_range" if isinstance(exc, codec.OutOfRange)
                else "bad_value"
            )  # fmt: skip
            raise DriverWriteError(f"device {device}: cannot write {point} = {value!r}: {exc}", kind) from exc
        if self._bus is None:
            log.warning("device %s: write %s = %r refused: the device is not running", device, point, value)
            raise DriverWriteError(
                f"device {device}: cannot write {point} = {value!r}: the device is not running", "unavailable"
            )
        assert spec is not None
        shown = [int(v) for v in values]
        self.stats["writes"] += 1
        try:
            await self._bus.write(function, spec.address, values, self.config.unit)
        except ModbusWriteError as exc:
            self.stats["failed_writes"] += 1
            reason = exc.reason
            if reason == "timeout":
                reason += " (the device may or may not have applied it)"
            log.warning("device %s: write %s = %r (%s %d, function %d, %s) failed: %s", device, point, value,
                        spec.table, spec.address, function, shown, reason)  # fmt: skip
            kind = (
                "timeout" if exc.reason == "timeout"
                else "unavailable" if exc.link
                else _EXCEPTION_KINDS.get(exc.exception_code or 0, "device_error")
            )  # fmt: skip
            raise DriverWriteError(f"device {device}: write {point} = {value!r} failed: {reason}", kind) from exc
        self._written.add(point)
        log.info("device %s: write %s = %r (%s %d, function %d, %s): ok", device, point, value, spec.table,
                 spec.address, function, shown)  # fmt: skip

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Run each request on its own interval; yield the events each poll produces."""
        # Devices start at different points of their interval: 500 meters polled in the same
        # millisecond every second make one burst of work, and the events at its end wait behind
        # it. The offset is fixed per device id, so a device keeps its phase across restarts.
        spread = min(self.config.interval, MAX_PHASE_SPREAD)
        now = time.monotonic() + spread * (zlib.crc32(self.config.id.encode()) / 2**32)
        due = {id(r): now for r in self.requests}
        while True:
            now = time.monotonic()
            batch = [r for r in self.requests if due[id(r)] <= now]
            if not batch:  # woke before the first slot (the device's phase offset)
                await asyncio.sleep(max(0.0, min(due.values()) - now))
                continue
            readings = await self.poll(batch)
            raise_if_cancelling()
            if readings is not None:
                yield readings
            for r in batch:
                due[id(r)] += r.interval
                if due[id(r)] < now:  # overran: skip missed slots, keep the phase
                    due[id(r)] += ((now - due[id(r)]) // r.interval + 1) * r.interval
            await asyncio.sleep(max(0.0, min(due.values()) - time.monotonic()))

    async def poll(self, requests: list[Request]) -> list[Reading] | None:
        """Read ``requests``; report the poll's outcome; return its events (None if none)."""
        assert self._bus is not None, "start() first"
        self.stats["polls"] += 1
        started = time.monotonic()
        try:
            return await self._poll(requests)
        finally:
            self.context.observe_poll(time.monotonic() - started)

    async def _poll(self, requests: list[Request]) -> list[Reading] | None:
        assert self._bus is not None
        # Only writes done before this poll's reads began are sure to show in them.
        written = set(self._written)
        samples: list[_Sample] = []
        failure: str | None = None  # why the device's poll stopped (a timeout, a lost link)
        for request in requests:
            got, kept, failure = await self._read_all(self._reads.get(id(request), [request]), failure)
            samples += got
            if id(request) in self._reads:
                self._reads[id(request)] = kept
        if all(reason is not None for _, _, reason in samples):
            self.context.poll_failed(next((reason for _, _, reason in samples if reason), "no points"))
            return None
        self.context.poll_ok()
        return self._events(samples, written) or None

    async def _read_all(
        self, reads: list[Request], failure: str | None, *, first: bool = True
    ) -> tuple[list[_Sample], list[Request], str | None]:
        """:meth:`_read` of each read in turn; once one stops the poll, the rest get its reason unread."""
        samples: list[_Sample] = []
        kept: list[Request] = []
        for read in reads:
            if failure is not None:
                # The device already failed this poll: do not spend another timeout on it
                # (on a shared RS-485 bus that time belongs to the other units).
                samples += [(p, None, failure) for p in read.points]
                kept.append(read)
                continue
            got, now, failure = await self._read(read, first=first)
            samples += got
            kept += now
        return samples, kept, failure

    async def _read(self, read: Request, *, first: bool = True) -> tuple[list[_Sample], list[Request], str | None]:
        """Its points' samples, the reads to make for it from now on, and why the poll must stop (or None).

        A read the unit refuses as such (exception 2 or 3) is split and the parts read at once, so
        the poll loses nothing; the parts replace it only if the unit takes at least one of them
        (a unit that refuses everything, say while it boots, leaves the plan as it was).
        """
        assert self._bus is not None
        self.stats["requests"] += 1
        try:
            values = await self._bus.read(read.table, read.address, read.count, self.config.unit)
        except ModbusReadError as exc:
            self.stats["failed_requests"] += 1
            if exc.garbled is not None:
                self._garbled(exc)
            if exc.link and exc.reason != self._link_failure:
                # At once, not when the device goes offline polls later: the cause and fix for the technician.
                log.warning("device %s: %s", self.config.id, exc.reason)
            self._link_failure = exc.reason if exc.link else self._link_failure
            failure = exc.reason if exc.link or exc.reason == "timeout" else None
            parts = split(read) if exc.exception_code in _SPLIT_ON else [read]
            if len(parts) > 1:
                samples, kept, failure = await self._read_all(self._prepared(parts), failure, first=False)
                if any(reason is None for _, _, reason in samples):
                    if first:
                        self._refused(read, kept, exc.reason)
                    return samples, kept, failure
            return [(p, None, exc.reason) for p in read.points], [read], failure
        self._link_failure = None
        return self._decode(read, values), [read], None

    def _decode(self, read: Request, values: list[int] | list[bool]) -> list[_Sample]:
        if read.table in BIT_TABLES:
            return [(p, int(bool(values[p.address - read.address])), None) for p in read.points]
        buffer = struct.pack(f">{len(values)}H", *values)
        if read.block is None or len(values) < read.count:
            return [self._decode_point(p, buffer, p.address - read.address) for p in read.points]
        samples: list[_Sample] = []
        scaling = self._scaling
        for point, raw in zip(read.points, read.block(buffer), strict=True):
            floating, scale, offset = scaling[point.name]
            if floating and not math.isfinite(raw):
                samples.append((point, None, f"decode: {codec.not_available(point.type, raw)}"))
            else:
                samples.append((point, raw if scale is None else round(raw * scale + offset, 9), None))
        return samples

    def _decode_point(self, point: PointConfig, buffer: bytes, at: int) -> _Sample:
        decoder = self._decoders[point.name]
        assert decoder is not None
        try:
            return point, decoder(buffer, 2 * at), None
        except (ValueError, struct.error) as exc:
            return point, None, f"decode: {exc}"

    def _prepared(self, reads: list[Request]) -> list[Request]:
        """``reads`` with their whole-read decoders: one struct when every point is a plain big/big number."""
        config = self.config
        for read in reads:
            if read.table not in BIT_TABLES and all(
                (p.byte_order or config.byte_order) == "big" and (p.word_order or config.word_order) == "big"
                for p in read.points
            ):
                read.block = codec.compile_block([(p.address - read.address, p.type) for p in read.points], read.count)
        return reads

    def _garbled(self, exc: ModbusReadError) -> None:
        """One line per garbled answer, with what came in; the log folds the repeats per device.

        agent/observability/logs.py writes the first at once, then one per window (EDGE_AGENT_LOG_REPEAT_WINDOW,
        60 s) that counts the others: ``... (repeated 57 times in the last 60 s)``. A poll that
        got nothing else fails with the answer's reason, and the runtime counts it in
        ``edge_agent_device_poll_failures_total`` (``bad_checksum``, ``bad_frames``).
        """
        log.warning("device %s: %s from unit %d: %s", self.config.id, exc.reason, self.config.unit, exc.garbled,
                    extra={"device": self.config.id})  # fmt: skip

    def _refused(self, read: Request, parts: list[Request], reason: str) -> None:
        self.stats["splits"] += 1
        spans = ", ".join(f"{p.address}..{p.end - 1}" for p in parts)
        log.warning(
            "device %s: the unit refused to read %s %d..%d in one request (%s); reading it as %d requests"
            " (%s) from now on. To plan that from the start, set max_gap: 0 (or a lower max_registers)"
            " on the device", self.config.id, read.table, read.address, read.end - 1, reason, len(parts), spans,
        )  # fmt: skip

    def _events(self, samples: list[_Sample], written: set[str] | frozenset[str] = frozenset()) -> list[Reading]:
        now_mono = time.monotonic()
        full = now_mono >= self._full_at
        if full:
            self._full_at = now_mono + self.config.full_report
        stamp = datetime.now(UTC)
        measurements: list[dict[str, Any]] = []
        readings: list[Reading] = []
        good, reported, info = self._good, self._reported, self._info
        for p, sampled, reason in samples:
            name = p.name
            if reason is None and sampled is not None:
                good[name] = sampled
                value, quality = sampled, "good"
            elif name in good:
                value, quality = good[name], "stale"
            else:
                value, quality = None, "bad"
            previous = reported.get(name)
            quantity, unit, phase, deadband = info[name]
            if name in written and quality == "good":
                self._written.discard(name)
            elif not (full or _changed(quantity, deadband, value, quality, previous)):
                continue
            reported[name] = (value, quality)
            if quantity is not None:
                measurements.append(measurement(quantity, value, unit, quality, point=name, reason=reason, phase=phase))
            elif quality != "bad" and p.bay is not None:
                data = self._bay(p, p.bay, bool(value), quality, stamp, previous)
                readings.append(Reading(PARKING_OCCUPANCY, data, stamp))
            elif quality != "bad" and p.area is not None and isinstance(value, int | float):
                readings.append(Reading(CROSSWALK_PRESENCE, self._area(p, p.area, int(value), full), stamp))
        if measurements:
            readings.insert(0, Reading(METER_READING, meter_reading(measurements), stamp))
        return readings

    def _bay(
        self, point: PointConfig, bay: str, occupied: bool, quality: str, stamp: datetime, last: tuple[Any, str] | None
    ) -> dict[str, Any]:
        if point.name not in self._since or (last is not None and bool(last[0]) != occupied):
            self._since[point.name] = stamp
        confidence = 1.0 if quality == "good" else 0.5
        return parking_occupancy(bay, occupied, confidence, self._since[point.name], point=point.name)

    def _area(self, point: PointConfig, area: str, count: int, full: bool) -> dict[str, Any]:
        window_max = max(self._window_max.get(point.name, 0), count)
        self._window_max[point.name] = count if full else window_max
        return crosswalk_presence(area, count, window_max, point=point.name)
