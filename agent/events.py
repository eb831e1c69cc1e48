"""The event envelope: CloudEvents 1.0 in JSON structured mode, and the MQTT topic it goes to.

This module is the data contract with the operations centre (docs/events.md). Change it only
in ways a consumer can ignore (new optional fields); never rename or remove.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"

# Gateway-level events (health) use this stream name where a device id would go.
GATEWAY_STREAM = "gateway"

METER_READING = "city.meter.reading"
PARKING_OCCUPANCY = "city.parking.occupancy"
CROSSWALK_PRESENCE = "city.crosswalk.presence"
DEVICE_STATUS = "city.device.status"
GATEWAY_HEALTH = "city.gateway.health"


class Priority(IntEnum):
    """Delivery class: higher drains first after an outage and is evicted last."""

    TELEMETRY = 0
    EVENT = 1
    ALARM = 2


# Lifecycle events (status, health) are alarms: the backend must learn that a device went
# offline even when the buffer is full of meter readings.
DEFAULT_PRIORITIES: dict[str, Priority] = {
    METER_READING: Priority.TELEMETRY,
    PARKING_OCCUPANCY: Priority.EVENT,
    CROSSWALK_PRESENCE: Priority.EVENT,
    DEVICE_STATUS: Priority.ALARM,
    GATEWAY_HEALTH: Priority.ALARM,
}


@dataclass(slots=True)
class Reading:
    """What a driver hands to the runtime: one event's type and data, before the envelope.

    Attributes:
        type: CloudEvents type, e.g. ``city.meter.reading``.
        data: JSON-serialisable payload (see docs/events.md for each type's schema).
        time: when the reading was taken; ``None`` means now.
        priority: overrides the configured class for this one event.
    """

    type: str
    data: dict[str, Any]
    time: datetime | None = None
    priority: Priority | None = None


@dataclass(slots=True, frozen=True)
class Envelope:
    """A finished event: the serialised CloudEvent plus what the buffer needs to route it."""

    device: str
    type: str
    seq: int
    priority: int
    topic: str
    payload: bytes
    created: float = field(compare=False)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-11-23T08:00:00.123Z``."""
    m = moment.astimezone(UTC)
    # Not strftime: %Y does not zero-pad years before 1000 on glibc.
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
        f"{m.microsecond // 1000:03d}Z"
    )


def topic_for(prefix: str, gateway: str, device: str, event_type: str) -> str:
    """``{prefix}/{gateway}/{device}/{last segment of type}``."""
    return f"{prefix}/{gateway}/{device}/{event_type.rsplit('.', 1)[-1]}"


def status_topic(prefix: str, gateway: str) -> str:
    """Retained availability topic (``online``/``offline``, the latter as MQTT last will)."""
    return f"{prefix}/{gateway}/status"


def source_for(gateway: str, device: str) -> str:
    """CloudEvents ``source``: a URI reference naming gateway and device."""
    return f"/gateways/{gateway}/devices/{device}"


def build_event(
    *,
    gateway: str,
    device: str,
    seq: int,
    reading: Reading,
    now: datetime,
) -> dict[str, Any]:
    """Return the CloudEvent as a dict (structured mode, JSON data)."""
    return {
        "specversion": SPECVERSION,
        "id": str(uuid.uuid4()),
        "source": source_for(gateway, device),
        "type": reading.type,
        "time": format_time(reading.time or now),
        "datacontenttype": DATACONTENTTYPE,
        "gateway": gateway,
        "device": device,
        "seq": seq,
        "data": reading.data,
    }


def encode(event: dict[str, Any]) -> bytes:
    """Compact, deterministic JSON; NaN/Infinity are refused (they are not JSON)."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
