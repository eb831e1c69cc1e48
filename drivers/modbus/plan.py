"""Read planning: adjacent points coalesced into as few requests as the protocol allows.

Planned once when a device starts, not per poll. A request covers points of one table and one
poll interval; it grows while the span stays within ``max_registers`` (``max_bits`` for bit
tables) and the hole between neighbours is at most ``max_gap``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.modbus.config import BIT_TABLES, ModbusConfig, PointConfig


@dataclass
class Request:
    """One read: ``count`` registers (or bits) from ``address`` of ``table``."""

    table: str
    address: int
    count: int
    interval: float
    points: list[PointConfig] = field(default_factory=list)

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
        gap = config.max_gap
        current: Request | None = None
        for point in sorted(points, key=lambda p: (p.address, p.registers)):
            end = point.address + point.registers
            if (
                current is not None
                and point.address <= current.end + gap
                and max(end, current.end) - current.address <= limit
            ):
                current.count = max(end, current.end) - current.address
                current.points.append(point)
                continue
            if point.registers > limit:
                raise ValueError(f"point {point.name!r} spans {point.registers} registers, over max_registers {limit}")
            current = Request(table, point.address, point.registers, interval, [point])
            requests.append(current)
    return requests
