"""The ``data`` of each event type, built in one place (docs/events.md, agent/contract/schemas.py).

Every driver and the device runner build their events' data through these functions, so a
field's name, its position and the form of its times are written once. The position matters:
the JSON is compared byte for byte by tests and consumers, so optional fields go last, in a
fixed order, and only when set. The builders are plain functions returning fresh dicts (no
validation, no copies of the caller's lists): they run for every event on the hot path, and
the pydantic models in schemas.py are the test oracle, not a step of it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agent.contract.events import format_time


def measurement(
    quantity: str,
    value: float | str | None,
    unit: str,
    quality: str = "good",
    *,
    point: str | None = None,
    reason: str | None = None,
    phase: str | None = None,
) -> dict[str, Any]:
    """One entry of ``city.meter.reading``'s ``measurements``.

    ``quality`` is good, stale or bad (``value`` None). ``point`` (field drivers), ``reason``
    (why not good) and ``phase`` are left out when None.
    """
    m: dict[str, Any] = {"quantity": quantity, "value": value, "unit": unit, "quality": quality}
    if point is not None:
        m["point"] = point
    if reason is not None:
        m["reason"] = reason
    if phase is not None:
        m["phase"] = phase
    return m


def measurement_point(m: dict[str, Any]) -> str:
    """The name a measurement goes by for SCADA and remote reads: its point, or quantity[_phase]."""
    return m.get("point") or (f"{m['quantity']}_{m['phase']}" if m.get("phase") else m["quantity"])


def meter_reading(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """``city.meter.reading``: ``measurements`` made by :func:`measurement` (the list itself, not a copy)."""
    return {"measurements": measurements}


def parking_occupancy(
    bay: str, occupied: bool, confidence: float, since: datetime, *, point: str | None = None
) -> dict[str, Any]:
    """``city.parking.occupancy``: one bay's state, ``since`` when it entered it (an aware datetime)."""
    data: dict[str, Any] = {"bay": bay, "occupied": occupied, "confidence": confidence, "since": format_time(since)}
    if point is not None:
        data["point"] = point
    return data


def crosswalk_presence(area: str, count: int, max_count: int, *, point: str | None = None) -> dict[str, Any]:
    """``city.crosswalk.presence``: people waiting in ``area`` now, and the most in the current window."""
    data: dict[str, Any] = {"area": area, "count": count, "max_count": max_count}
    if point is not None:
        data["point"] = point
    return data


def device_status(
    status: str, reason: str | None, driver: str, consecutive_failures: int, since: datetime
) -> dict[str, Any]:
    """``city.device.status``: ``status`` online or offline; ``reason`` None when online."""
    return {
        "status": status,
        "reason": reason,
        "driver": driver,
        "consecutive_failures": consecutive_failures,
        "since": format_time(since),
    }


def camera_snapshot(
    reason: str, trigger: str | None, width: int, height: int, image: str, blurred: dict[str, int]
) -> dict[str, Any]:
    """``city.camera.snapshot``: a blurred JPEG (``image``, base64); ``trigger`` is sent even when None."""
    return {
        "reason": reason,
        "trigger": trigger,
        "media_type": "image/jpeg",
        "width": width,
        "height": height,
        "image": image,
        "blurred": blurred,
    }
