"""OPC UA DataValues -> samples -> city events.

Quality follows the status code's severity (OPC UA Part 4, 7.39): Good -> ``good``;
Uncertain (e.g. UncertainLastUsableValue) -> ``stale``, the value kept; Bad -> ``bad``,
``value: null``. A status that is not Good is named in ``reason`` (``BadNodeIdUnknown``,
``UncertainSensorNotAccurate``), so a bad point is reported, never silently dropped.

An event's ``time`` is the source timestamp (the server's timestamp, then now, when the
server sends none). Measurements that share a source timestamp (to the millisecond, the
resolution of the envelope) share one ``city.meter.reading``: a PLC stamps a whole scan with
one time, so one scan becomes one event (split after ``max_measurements``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncua import ua
from asyncua.ua import status_codes

from agent.contract.data import crosswalk_presence, measurement, meter_reading, parking_occupancy
from agent.contract.events import CROSSWALK_PRESENCE, METER_READING, PARKING_OCCUPANCY, Reading
from agent.contract.floats import shortest_float32
from drivers.opcua.config import OpcUaConfig, PointConfig

AREA_WINDOW = 300.0  # s: max_count of a crosswalk area is the most people seen in this window


@dataclass(slots=True)
class Sample:
    """One point's value at one moment, with its quality."""

    point: PointConfig
    value: float | int | None
    quality: str  # good, stale, bad
    reason: str | None
    time: datetime


def code_name(code: int) -> str:
    """``BadNodeIdUnknown`` for 0x80340000; the hex code when asyncua does not know it."""
    name = status_codes.get_name_and_doc(code)[0]
    return name if name and not name.startswith("Unknown") else f"0x{code:08X}"


def quality_of(code: int) -> str:
    """Severity bits 31..30: 00 good, 01 uncertain (stale), 1x bad."""
    severity = code >> 30
    return "good" if severity == 0 else "stale" if severity == 1 else "bad"


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)  # OPC UA DateTime is UTC by definition
    return moment


def engineering(point: PointConfig, raw: Any, *, float32: bool = False) -> tuple[float | int | None, str | None]:
    """(value, None) for a finite number (bools count as 0/1), else (None, why).

    ``float32``: the variable is a Float, published as the digits it holds (230.1, not the
    230.10000610351562 it widens to: agent/contract/floats.py).
    """
    if float32 and isinstance(raw, float):
        raw = shortest_float32(raw)
    if isinstance(raw, bool):
        raw = int(raw)
    elif not isinstance(raw, int | float):
        kind = "array" if isinstance(raw, list) else "null" if raw is None else type(raw).__name__
        return None, f"not a number ({kind})"
    if point.scale != 1.0 or point.offset != 0.0:
        raw = round(raw * point.scale + point.offset, 9)
    if isinstance(raw, float) and not math.isfinite(raw):
        return None, f"not a finite number ({raw})"
    return raw, None


def sample_of(point: PointConfig, dv: ua.DataValue, now: datetime) -> Sample:
    """Map one DataValue (from a notification or a Read) to a sample of ``point``."""
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    stamp = _aware(dv.SourceTimestamp) or _aware(dv.ServerTimestamp) or now
    quality = quality_of(code)
    reason = None if quality == "good" else code_name(code)
    if quality == "bad":
        return Sample(point, None, "bad", reason, stamp)
    variant = dv.Value
    value, problem = engineering(
        point,
        variant.Value if variant is not None else None,
        float32=variant is not None and variant.VariantType == ua.VariantType.Float,
    )
    if problem is not None:
        return Sample(point, None, "bad", problem, stamp)
    return Sample(point, value, quality, reason, stamp)


def bad_sample(point: PointConfig, reason: str, now: datetime) -> Sample:
    """A point that could not be read at all (unknown node, refused monitored item)."""
    return Sample(point, None, "bad", reason, now)


class EventMapper:
    """Turns samples into readings; remembers what bays and areas need across batches."""

    def __init__(self, config: OpcUaConfig) -> None:
        """No I/O; state lives as long as the driver."""
        self.config = config
        self._occupied: dict[str, bool] = {}
        self._since: dict[str, datetime] = {}
        self._window_max: dict[str, int] = {}
        self._window_start = time.monotonic()

    def readings(self, samples: list[Sample]) -> list[Reading]:
        """The events for one batch, in time order."""
        groups: dict[datetime, list[dict[str, Any]]] = {}
        others: list[Reading] = []
        for s in samples:
            p = s.point
            if p.quantity is not None:
                key = s.time.replace(microsecond=s.time.microsecond // 1000 * 1000)
                m = measurement(
                    p.quantity, s.value, p.event_unit, s.quality, point=p.name, reason=s.reason, phase=p.phase
                )
                groups.setdefault(key, []).append(m)
            elif s.quality == "bad" or s.value is None:
                continue  # a bay or area without a value has no event to say so; the device status does
            elif p.bay is not None:
                others.append(Reading(PARKING_OCCUPANCY, self._bay(p, p.bay, bool(s.value), s), s.time))
            elif p.area is not None:
                others.append(Reading(CROSSWALK_PRESENCE, self._area(p, p.area, int(s.value)), s.time))
        out: list[Reading] = []
        limit = self.config.max_measurements
        for stamp, measurements in groups.items():
            for start in range(0, len(measurements), limit):
                out.append(Reading(METER_READING, meter_reading(measurements[start : start + limit]), stamp))
        out += others
        if len(out) > 1:
            out.sort(key=lambda r: r.time or datetime.min.replace(tzinfo=UTC))
        return out

    def _bay(self, point: PointConfig, bay: str, occupied: bool, s: Sample) -> dict[str, Any]:
        if self._occupied.get(point.name) != occupied:
            self._occupied[point.name] = occupied
            self._since[point.name] = s.time
        confidence = 1.0 if s.quality == "good" else 0.5
        return parking_occupancy(bay, occupied, confidence, self._since[point.name], point=point.name)

    def _area(self, point: PointConfig, area: str, count: int) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._window_start >= AREA_WINDOW:
            self._window_start = now
            self._window_max.clear()
        window_max = max(self._window_max.get(point.name, 0), count)
        self._window_max[point.name] = window_max
        return crosswalk_presence(area, max(count, 0), max(window_max, 0), point=point.name)
