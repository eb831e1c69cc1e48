"""From the agent's events to Sparkplug metrics: names, datatypes, units, quality, timestamps.

One metric per point (``voltage_L1``: the measurement's point, or quantity[_phase]), per parking
bay (``bay/<bay>/occupied``, ``bay/<bay>/confidence``) and per waiting area
(``area/<area>/count``). Camera snapshots and inventories are not carried; device status
events drive DBIRTH/DDEATH instead of being metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from agent.contract.data import measurement_point
from agent.contract.events import (
    CROSSWALK_PRESENCE,
    DEVICE_STATUS,
    GATEWAY_HEALTH,
    METER_READING,
    PARKING_OCCUPANCY,
)

# Sparkplug B DataType numbers (sparkplug_b.proto, enum DataType) this edge node uses.
INT32, INT64, UINT64, FLOAT, DOUBLE, BOOLEAN, STRING = 3, 4, 8, 9, 10, 11, 12
INT_TYPES = frozenset({1, 2, 3, 5, 6, 7})  # carried in int_value (uint32)
LONG_TYPES = frozenset({4, 8, 13})  # carried in long_value (uint64)
TYPE_NAMES = {INT32: "Int32", INT64: "Int64", UINT64: "UInt64", FLOAT: "Float", DOUBLE: "Double",
              BOOLEAN: "Boolean", STRING: "String"}  # fmt: skip
BOOLEAN_QUANTITIES = frozenset({"digital_input"})  # 0/1 states (coils, bits), as the OPC UA server types them
NODE = ""  # the edge node itself, as a "device" id: its metrics go in NBIRTH/NDATA
# The gateway's health as node metrics: name, where in the health event's data, datatype. A fixed
# list, so NBIRTH names them all (null until the first health event) and no new one forces a rebirth.
HEALTH_METRICS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("Gateway/uptime_s", ("uptime_s",), DOUBLE),
    ("Gateway/devices/total", ("devices", "total"), INT64),
    ("Gateway/devices/online", ("devices", "online"), INT64),
    ("Gateway/buffer/events", ("buffer", "events"), INT64),
    ("Gateway/buffer/bytes", ("buffer", "bytes"), INT64),
    ("Gateway/buffer/oldest_age_s", ("buffer", "oldest_age_s"), DOUBLE),
    ("Gateway/uplink/connected", ("uplink", "connected"), BOOLEAN),
    ("Gateway/process/cpu_percent", ("process", "cpu_percent"), DOUBLE),
    ("Gateway/process/rss_bytes", ("process", "rss_bytes"), INT64),
    ("Gateway/host/disk_free_bytes", ("host", "disk_free_bytes"), INT64),
    ("Gateway/host/temperature_c", ("host", "temperature_c"), DOUBLE),
)


@dataclass(slots=True)
class Value:
    """One metric's value as an event gave it; ``value`` None when there is none (bad quality)."""

    name: str
    value: Any
    datatype: int
    unit: str | None
    quality: str  # good, stale or bad
    timestamp: int  # the reading's time, UTC milliseconds
    point: str | None = None  # the device point it is (writes name it), None for bays and areas


@dataclass(slots=True)
class Event:
    """What one buffered event says to the edge node."""

    device: str
    type: str
    values: list[Value]
    status: str | None = None  # online/offline for a device status event
    timestamp: int = 0  # the event's time, UTC milliseconds


def millis(text: str) -> int:
    """An RFC 3339 time as UTC milliseconds."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def datatype_of(value: Any, unit: str | None, quantity: str | None) -> int:
    """A measurement's Sparkplug datatype, from its value as the OPC UA server chooses a variant."""
    if isinstance(value, bool) or quantity in BOOLEAN_QUANTITIES:
        return BOOLEAN
    if isinstance(value, int) and not unit:
        return INT64
    if isinstance(value, str):
        return STRING
    return DOUBLE


def parse(payload: bytes) -> Event | None:
    """The metrics of one stored CloudEvent; None for a type the edge node does not carry."""
    event = orjson.loads(payload)
    kind, data, device = event.get("type"), event.get("data") or {}, event.get("device", "")
    ts = millis(event["time"])
    if kind == METER_READING:
        values = []
        for m in data.get("measurements", ()):
            name = measurement_point(m)
            value, unit, quality = m.get("value"), m.get("unit") or None, m.get("quality", "good")
            if not isinstance(value, bool | int | float | str):  # nothing a metric can hold
                value, quality = None, "bad"
            values.append(Value(name, value, datatype_of(value, unit, m.get("quantity")), unit, quality, ts, name))
        return Event(device, kind, values)
    if kind == PARKING_OCCUPANCY:
        bay = f"bay/{data['bay']}"
        return Event(device, kind, [
            Value(f"{bay}/occupied", bool(data["occupied"]), BOOLEAN, None, "good", ts),
            Value(f"{bay}/confidence", float(data.get("confidence", 0.0)), DOUBLE, None, "good", ts),
        ])  # fmt: skip
    if kind == CROSSWALK_PRESENCE:
        return Event(device, kind, [Value(f"area/{data['area']}/count", int(data["count"]), INT64, None, "good", ts)])
    if kind == DEVICE_STATUS:
        return Event(device, kind, [], status=str(data.get("status", "offline")), timestamp=ts)
    if kind == GATEWAY_HEALTH:
        return Event(NODE, kind, [Value(name, _dig(data, path), datatype, None, "good", ts)
                                  for name, path, datatype in HEALTH_METRICS])  # fmt: skip
    return None


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The scalar at ``path`` in a health event's data, or None (absent, or not a scalar)."""
    found: Any = data
    for key in path:
        found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, int | float | str) else None


def compact_meter(payload: bytes) -> tuple[str, int, tuple[str, ...], tuple[Any, ...], tuple[str, ...]] | None:
    """A meter reading as (device, timestamp, names, values, qualities), without a Value each:
    the backlog's read-ahead, where millions go through. None for any other event (use parse)."""
    event = orjson.loads(payload)
    if event.get("type") != METER_READING:
        return None
    measurements = (event.get("data") or {}).get("measurements", ())
    names = tuple(m.get("point") or (f"{m['quantity']}_{m['phase']}" if m.get("phase") else m["quantity"])
                  for m in measurements)  # fmt: skip
    values = tuple(m.get("value") for m in measurements)
    qualities = tuple(m.get("quality", "good") for m in measurements)
    return event.get("device", ""), millis(event["time"]), names, values, qualities


def coerce(value: Any, datatype: int) -> Any:
    """``value`` as a metric of ``datatype`` holds it (a metric keeps the type of its BIRTH)."""
    if value is None:
        return None
    if datatype in (DOUBLE, FLOAT):
        return float(value)
    if datatype == BOOLEAN:
        return bool(value)
    if datatype == STRING:
        return str(value)
    return int(value)
