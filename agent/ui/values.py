"""The latest value of every point, with its quality and arrival time, for the page.

A live sink (like the fleet's :class:`~agent.fleet.latest.LatestValues`, which it extends so
that remote reads keep working when both are on): one dict assignment per reading.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from agent.contract.data import measurement_point
from agent.contract.events import DEVICE_STATUS
from agent.fleet.latest import LatestValues


class UiValues(LatestValues):
    """(device, point) -> value, unit, quality, reason, event type, monotonic arrival."""

    def __init__(self, inner: LatestValues | None = None) -> None:
        """``inner``: the fleet channel's latest values, fed on as before."""
        super().__init__()
        self._inner = inner
        self._points: dict[str, dict[str, dict[str, Any]]] = {}
        self._events: dict[str, dict[str, tuple[dict[str, Any], datetime]]] = {}  # device -> type -> latest
        self.changed = 0  # bumped by every reading: the event stream sends only when it moved

    def update(self, device: str, event_type: str, data: dict[str, Any], time_: datetime) -> None:
        """Keep the reading's points."""
        super().update(device, event_type, data, time_)
        if self._inner is not None:
            self._inner.update(device, event_type, data, time_)
        self._events.setdefault(device, {})[event_type] = (data, time_)
        if event_type == DEVICE_STATUS:
            return  # the page shows a device's status and fault on their own, not as a value
        points = self._points.setdefault(device, {})
        arrived = time.monotonic()
        measurements = data.get("measurements")
        if isinstance(measurements, list):
            for m in measurements:
                if isinstance(m, dict) and "quantity" in m:
                    points[measurement_point(m)] = {
                        "value": m.get("value"),
                        "unit": m.get("unit"),
                        "quality": m.get("quality", "good"),
                        "reason": m.get("reason"),
                        "type": event_type,
                        "at": arrived,
                    }
        else:
            name = str(data.get("point") or data.get("bay") or data.get("area") or event_type.rsplit(".", 1)[-1])
            shown = {k: v for k, v in data.items() if not isinstance(v, (dict, list)) and k not in ("point", "since")}
            points[name] = {"value": shown, "unit": None, "quality": "good", "reason": None,
                            "type": event_type, "at": arrived}  # fmt: skip
        self.changed += 1

    def points(self, device: str) -> list[dict[str, Any]]:
        """A device's points by name, each with its age in seconds."""
        now = time.monotonic()
        found = self._points.get(device, {})
        return [
            {"name": name, **{k: v for k, v in p.items() if k != "at"}, "age_s": round(now - p["at"], 1)}
            for name, p in sorted(found.items())
        ]

    def latest_events(self, device: str) -> dict[str, tuple[dict[str, Any], datetime]]:
        """A device's latest data and time by event type."""
        return dict(self._events.get(device, {}))

    def forget(self, keep: set[str]) -> None:
        """Drop devices no longer configured."""
        for device in list(self._points):
            if device not in keep:
                del self._points[device]
                self._events.pop(device, None)
