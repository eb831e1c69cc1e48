"""From a good frame's raw values to the event the city expects (meter, parking, crosswalk)."""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime
from typing import Any

from agent.contract.data import crosswalk_presence, measurement, meter_reading, parking_occupancy
from agent.contract.events import CROSSWALK_PRESENCE, METER_READING, PARKING_OCCUPANCY, Reading
from agent.contract.vocabulary import QUANTITY_UNITS
from drivers.serial.config import FieldConfig, SerialConfig
from drivers.serial.framing import Frame, FrameValue

_TRUE = {"1", "true", "on", "yes", "occupied"}
_FALSE = {"0", "false", "off", "no", "free"}


class BadValueError(ValueError):
    """A frame passed its checks but a value it carries cannot be used (counted as undecodable)."""


def to_number(raw: FrameValue) -> float:
    """A frame value as a finite float: numbers, flags and number-like text.

    Raises:
        BadValueError: missing, not a number, or not finite (JSON cannot carry NaN).
    """
    if raw is None:
        raise BadValueError("not in the frame")
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        value = float(raw)
    else:
        text = raw.strip().lower()
        if text in _TRUE:
            return 1.0
        if text in _FALSE:
            return 0.0
        try:
            value = float(text)
        except ValueError:
            raise BadValueError(f"not a number: {raw[:20]!r}") from None
    if not math.isfinite(value):
        raise BadValueError(f"not finite: {raw!r}")
    return value


def scaled(raw: FrameValue, field: FieldConfig) -> float:
    """``raw * scale + offset``, with binary-to-decimal noise removed.

    2153 * 0.01 is 21.530000000000001 in binary floating point; twelve significant digits is
    far beyond any sensor's resolution and prints as the 21.53 the technician expects.
    """
    value = to_number(raw) * field.scale + field.offset
    return float(f"{value:.12g}")


class EventMapper:
    """Builds one Reading per good frame; keeps the little state the events need across frames."""

    def __init__(self, config: SerialConfig) -> None:
        """Index the configured fields; no I/O."""
        self.config = config
        self._fields = [(field, config.field_key(field)) for field in config.fields]
        self._by_quantity = {field.quantity: key for field, key in self._fields}
        # The config requires bay for emits parking and area for emits crosswalk: "" is never sent.
        self._bay, self._area = config.bay or "", config.area or ""
        self._occupied: bool | None = None
        self._since: datetime | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic-ish seconds, count)

    def reading(self, frame: Frame, at: datetime) -> Reading:
        """The event for ``frame``, received at ``at`` (UTC).

        Raises:
            BadValueError: a value a parking or crosswalk event needs is missing or unusable.
        """
        if self.config.emits == "parking":
            return Reading(PARKING_OCCUPANCY, self._parking(frame, at), time=at)
        if self.config.emits == "crosswalk":
            return Reading(CROSSWALK_PRESENCE, self._crosswalk(frame, at), time=at)
        return Reading(METER_READING, meter_reading([self._measurement(frame, f, k) for f, k in self._fields]), at)

    def _measurement(self, frame: Frame, field: FieldConfig, key: str | int) -> dict[str, Any]:
        # One unusable value (a sensor printing ERR, a NaN float) must not cost the others:
        # it is reported with quality bad, as the meter contract allows.
        unit = QUANTITY_UNITS.get(field.quantity, field.unit or "")
        try:
            value = scaled(frame.values.get(key), field)
        except BadValueError as exc:
            return measurement(field.quantity, None, unit, "bad", reason=str(exc))
        return measurement(field.quantity, value, unit)

    def _value(self, frame: Frame, quantity: str) -> float:
        field = next(f for f in self.config.fields if f.quantity == quantity)
        try:
            return scaled(frame.values.get(self._by_quantity[quantity]), field)
        except BadValueError as exc:
            raise BadValueError(f"{quantity}: {exc}") from None

    def _parking(self, frame: Frame, at: datetime) -> dict[str, Any]:
        occupied = self._value(frame, "occupied") != 0
        confidence = self._value(frame, "confidence") if "confidence" in self._by_quantity else 1.0
        if not 0.0 <= confidence <= 1.0:
            raise BadValueError(f"confidence {confidence} outside 0..1 (check its scale)")
        if occupied != self._occupied or self._since is None:
            # The first frame after start sets the state; the sensor knows no better "since".
            self._occupied, self._since = occupied, at
        return parking_occupancy(self._bay, occupied, confidence, self._since)

    def _crosswalk(self, frame: Frame, at: datetime) -> dict[str, Any]:
        count = self._count(self._value(frame, "count"), "count")
        if "max_count" in self._by_quantity:
            max_count = self._count(self._value(frame, "max_count"), "max_count")
            return crosswalk_presence(self._area, count, max_count)
        now = at.timestamp()
        self._recent.append((now, count))
        while self._recent and self._recent[0][0] <= now - self.config.window:
            self._recent.popleft()
        return crosswalk_presence(self._area, count, max(c for _, c in self._recent))

    @staticmethod
    def _count(value: float, quantity: str) -> int:
        if value < 0 or value != int(value):
            raise BadValueError(f"{quantity} {value} is not a count of people")
        return int(value)
