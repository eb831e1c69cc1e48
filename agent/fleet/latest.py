"""The latest value of every device's points, for remote ``read`` commands.

A live sink the pipeline feeds only while the fleet channel is on: one dict assignment per
reading. A polled device's latest value is at most one poll old; the reply says how old.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from agent.contract.data import measurement_point
from agent.contract.events import format_time


class LatestValues:
    """(device, event type) -> (data, time, monotonic arrival)."""

    def __init__(self) -> None:
        """Empty until readings arrive."""
        self._values: dict[tuple[str, str], tuple[dict[str, Any], datetime, float]] = {}

    async def start(self) -> None:
        """Nothing to start."""

    def update(self, device: str, event_type: str, data: dict[str, Any], time_: datetime) -> None:
        """Keep the reading (the hot path: one assignment)."""
        self._values[(device, event_type)] = (data, time_, time.monotonic())

    async def stop(self) -> None:
        """Nothing to stop."""

    def describe(self) -> str:
        """For the log."""
        return "fleet reads: latest values kept"

    def read(self, device: str, point: str) -> dict[str, Any] | None:
        """The point's latest value: a measurement by point name or quantity[_phase], or a data key."""
        for (dev, event_type), (data, moment, arrived) in list(self._values.items()):
            if dev != device:
                continue
            found = _find(data, point)
            if found is not None:
                return {
                    "device": device,
                    "point": point,
                    "type": event_type,
                    **found,
                    "time": format_time(moment),
                    "age_s": round(time.monotonic() - arrived, 3),
                }
        return None

    def devices(self) -> set[str]:
        """Devices that produced anything."""
        return {device for device, _ in self._values}


def _find(data: dict[str, Any], point: str) -> dict[str, Any] | None:
    for m in data.get("measurements") or ():
        if point in (measurement_point(m), m.get("quantity")):
            return {k: m[k] for k in ("value", "unit", "quality", "reason") if k in m}
    if point in data and not isinstance(data[point], (dict, list)):
        return {"value": data[point]}
    return None
