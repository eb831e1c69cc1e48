"""Read planning: adjacent points coalesced into as few requests as the protocol allows.

Planned once when a device starts, not per poll. A request covers points of one table and one
poll interval; it grows while the span stays within ``max_registers`` (``max_bits`` for bit
tables) and the hole between neighbours is at most ``max_gap``. A unit that refuses a merged
read (exception 2 or 3) has it split by ``split`` for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.modbus.codec import BlockDecoder
from drivers.modbus.config import BIT_TABLES, ModbusConfig, PointConfig


@dataclass
class Request:
    """One read: ``count`` registers (or bits) from ``address`` of ``table``."""

    table: str
    address: int
    count: int
    interval: float
    points: list[PointConfig] = field(default_factory=list)
    # The driver's decoder for the whole read, set when the driver takes the read on (codec.compile_block).
    block: BlockDecoder | None = field(default=None, compare=False, repr=False)

    @property
    def end(self) -> int:
        return self.address + self.count


def plan(config: ModbusConfig) -> list[Request]:
    """The requests that read every point of ``config``, in table then address order."""
    groups: dict[tuple[str, float], list[PointConfig]] = {}
    for point in config.points:
        interval = point.interval or config.interval
        groups.setdefault((point.table, interval), []).append(point)
    requests: list[Request] = []
    for (table, interval), points in sorted(groups.items()):
        limit = config.max_bits if table in BIT_TABLES else config.max_registers
        for point in points:
            if point.registers > limit:
                raise ValueError(f"point {point.name!r} spans {point.registers} registers, over max_registers {limit}")

        def fits(current: Request, point: PointConfig, limit: int = limit) -> bool:
            end = max(point.address + point.registers, current.end)
            return point.address <= current.end + config.max_gap and end - current.address <= limit

        requests += _group(table, interval, points, fits)
    return requests


def split(request: Request) -> list[Request]:
    """The smaller reads to try when a unit refuses ``request``; ``[request]`` if it cannot be split.

    First the runs of points with no unused register between them (the unit may refuse to read
    registers it does not define); a run it still refuses is split into one read per register
    span (it may take fewer registers per request than planned, or one address may be wrong).
    """
    for joins in (_touches, _overlaps):
        parts = _group(request.table, request.interval, request.points, joins)
        if len(parts) > 1:
            return parts
    return [request]


def _touches(current: Request, point: PointConfig) -> bool:
    return point.address <= current.end


def _overlaps(current: Request, point: PointConfig) -> bool:
    return point.address < current.end


def _group(
    table: str, interval: float, points: list[PointConfig], joins: Callable[[Request, PointConfig], bool]
) -> list[Request]:
    """Reads of ``points`` in address order, each point joining the read before it when ``joins`` says so."""
    reads: list[Request] = []
    for point in sorted(points, key=lambda p: (p.address, p.registers)):
        end = point.address + point.registers
        if reads and joins(reads[-1], point):
            reads[-1].count = max(end, reads[-1].end) - reads[-1].address
            reads[-1].points.append(point)
        else:
            reads.append(Request(table, point.address, point.registers, interval, [point]))
    return reads
