"""The event envelope: CloudEvents 1.0 in JSON structured mode, and the MQTT topic it goes to.

This module is the data contract with the operations centre (docs/events.md). Change it only
in ways a consumer can ignore (new optional fields); never rename or remove.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Literal

import orjson

# Gateway-level events (health) use this stream name where a device id would go.
GATEWAY_STREAM = "gateway"

METER_READING = "city.meter.reading"
PARKING_OCCUPANCY = "city.parking.occupancy"
CROSSWALK_PRESENCE = "city.crosswalk.presence"
DEVICE_STATUS = "city.device.status"
GATEWAY_HEALTH = "city.gateway.health"
# The client certificate expires within days (fleet.identity.renew.expiring_days): at most once a day.
GATEWAY_CERT_EXPIRING = "city.gateway.cert.expiring"
# Not buffered, no seq: a retained state document on {prefix}/{gateway}/inventory (fleet channel).
GATEWAY_INVENTORY = "city.gateway.inventory"
CAMERA_SNAPSHOT = "city.camera.snapshot"
# LoRaWAN devices (drivers/lorawan): battery and radio, and an uplink whose payload did not decode.
DEVICE_HEALTH = "city.device.health"
DEVICE_UNDECODED = "city.device.undecoded"

# Every type the agent emits: each has a JSON Schema file (schemas/v1/<type>.json) named by its events' dataschema.
EVENT_TYPES = (
    METER_READING,
    PARKING_OCCUPANCY,
    CROSSWALK_PRESENCE,
    DEVICE_STATUS,
    GATEWAY_HEALTH,
    CAMERA_SNAPSHOT,
    GATEWAY_INVENTORY,
    GATEWAY_CERT_EXPIRING,
    DEVICE_HEALTH,
    DEVICE_UNDECODED,
)

# The contract's major version: the topic prefix's (ioc/v1) and the schema files' folder. Within it changes are
# additive, so a file is updated in place and its URI stays; a breaking change would start v2 beside it.
CONTRACT_VERSION = "v1"
# Identifiers, not locations (the .example domain is reserved and never resolves): the files ship in the package
# (agent/contract/shipped_schemas) and the repository (schemas/); a consumer maps this prefix to either.
SCHEMA_BASE = f"https://edge-agent.example/schemas/{CONTRACT_VERSION}/"


def dataschema_for(event_type: str) -> str:
    """The ``dataschema`` URI of ``event_type``: its schema file's ``$id``."""
    return f"{SCHEMA_BASE}{event_type}.json"


class Priority(IntEnum):
    """Delivery class: higher drains first after an outage and is evicted last."""

    MEDIA = -1  # snapshots: bulky and least urgent, with their own byte quota in the buffer
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
    GATEWAY_CERT_EXPIRING: Priority.ALARM,
    CAMERA_SNAPSHOT: Priority.MEDIA,
    DEVICE_HEALTH: Priority.TELEMETRY,
    DEVICE_UNDECODED: Priority.EVENT,
}


@dataclass(slots=True)
class Reading:
    """What a driver hands to the runtime: one event's type and data, before the envelope.

    Attributes:
        type: CloudEvents type, e.g. ``city.meter.reading``.
        data: JSON-serialisable payload (see docs/events.md for each type's schema).
        time: when the reading was taken; ``None`` means now.
        priority: overrides the configured class for this one event.
        id: the CloudEvent ``id`` (32 lowercase hex digits) when the driver derives it from its
            source (a LoRaWAN uplink's dedupe key), so a redelivery makes the same id; None: random.
    """

    type: str
    data: dict[str, Any]
    time: datetime | None = None
    priority: Priority | None = None
    id: str | None = None


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
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # isoformat is C code and zero-pads the year (strftime's %Y does not, on glibc).
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


# A topic root (events' prefix, the fleet channel's root): levels without wildcards, no leading
# or trailing slash.
TOPIC_ROOT_PATTERN = r"^[^#+/\s][^#+\s]*[^#+/\s]$|^[^#+/\s]$"


def topic_for(prefix: str, gateway: str, device: str, event_type: str) -> str:
    """``{prefix}/{gateway}/{device}/{last segment of type}``."""
    return f"{prefix}/{gateway}/{device}/{event_type.rsplit('.', 1)[-1]}"


def status_topic(prefix: str, gateway: str) -> str:
    """Retained availability topic (``online``/``offline``, the latter as MQTT last will)."""
    return f"{prefix}/{gateway}/status"


def batch_topic(prefix: str, gateway: str) -> str:
    """Where batches go when batching is on: ``{prefix}/{gateway}/batch``."""
    return f"{prefix}/{gateway}/batch"


def source_for(gateway: str, device: str) -> str:
    """CloudEvents ``source``: a URI reference naming gateway and device."""
    return f"/gateways/{gateway}/devices/{device}"


# The strict reference: what JSON can carry. orjson below is ~7x faster (the envelope is built
# once per event on the hot path) but writes NaN and infinity as null, which would turn a
# driver's broken reading into an apparently missing value.
_strict_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
# Datetimes and dataclasses are refused like json does, so a driver cannot come to rely on them.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def encode_data(data: Any) -> bytes:
    """``data`` as compact UTF-8 JSON.

    Raises:
        ValueError: ``data`` holds NaN or infinity, which JSON cannot carry.
        TypeError: ``data`` holds something JSON has no form for (including non-string keys).
    """
    out = orjson.dumps(data, option=_ORJSON_OPTIONS)
    if b"null" in out:
        # A null may be a NaN orjson wrote as null: let the strict encoder raise if so.
        _strict_encode(data)
    return out


_ID_BATCH = 256  # ids drawn per os.urandom call


class _EventIds:
    """Random 128-bit ids drawn from the OS in batches.

    One os.urandom call per event cost 11% of the event loop at 40,000 events/s: the call
    releases the GIL, and winning it back beside the busy commit thread waits.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []

    def next(self) -> str:
        if not self._ids:
            block = os.urandom(16 * _ID_BATCH).hex()
            self._ids = [block[i : i + 32] for i in range(0, len(block), 32)]
        return self._ids.pop()

    def forget(self) -> None:
        """A forked child must not hand out the ids its parent will also use."""
        self._ids = []


_event_ids = _EventIds()
os.register_at_fork(after_in_child=_event_ids.forget)


def new_event_id() -> str:
    """A random 128-bit id: unique without coordination, fixed once the event is stored."""
    return _event_ids.next()


def _type_attributes(event_type: str) -> tuple[str, str]:
    """``type``'s JSON text, and the attributes between ``timequality`` and ``gateway`` (dataschema for known types)."""
    schema = f'"dataschema":"{dataschema_for(event_type)}",' if event_type in EVENT_TYPES else ""
    return _strict_encode(event_type), f'"datacontenttype":"application/json",{schema}'


# Made once per type, not per event: make_event runs at tens of thousands of events a second.
_TYPE_ATTRIBUTES = {t: _type_attributes(t) for t in EVENT_TYPES}

# timequality: was the gateway's clock synchronised when it accepted the event (docs/events.md#time-you-can-trust)?
TimeQuality = Literal["synced", "unsynced", "unknown"]
TIME_SYNCED: TimeQuality = "synced"
TIME_UNSYNCED: TimeQuality = "unsynced"
TIME_UNKNOWN: TimeQuality = "unknown"


def make_event(
    *,
    gateway: str,
    device: str,
    seq: int,
    reading: Reading,
    now: datetime | str,
    epoch: str = "",
    timequality: TimeQuality = TIME_UNKNOWN,
) -> bytes:
    """The CloudEvent as compact UTF-8 JSON (structured mode).

    ``now`` is when the gateway accepted the event (``recordedtime``), and its ``time`` when the
    reading has none: a datetime, or the text :func:`format_time` made of it (the store formats
    each millisecond once, not each event). ``timequality`` is the state of the gateway's clock
    at that moment (``unknown`` unless the caller knows it). ``epoch`` is the buffer's sequence
    epoch (``seqepoch``; hex digits, so no escaping), left out when empty. ``dataschema`` names
    the type's schema file; a type the contract does not know has no file, so none.
    ``partitionkey`` is ``{gateway}/{device}``. ``backlog`` is never here: it is a property of
    one delivery, added at send time (:func:`mark_backlog`).

    Built as text around the encoded ``data``: gateway and device ids are validated to
    ``[a-z0-9_-]``, so they need no escaping, and this runs once per event on the hot path.
    (Caching each device's constant text measured no faster than formatting it each time.)

    Raises:
        ValueError: ``data`` holds NaN or infinity, which JSON cannot carry.
    """
    data = encode_data(reading.data)
    kind, middle = _TYPE_ATTRIBUTES.get(reading.type) or _type_attributes(reading.type)
    recorded = now if isinstance(now, str) else format_time(now)
    taken = recorded if reading.time is None else format_time(reading.time)
    return (
        (
            f'{{"specversion":"1.0","id":"{reading.id or new_event_id()}",'
            f'"source":"/gateways/{gateway}/devices/{device}",'
            f'"type":{kind},"time":"{taken}","recordedtime":"{recorded}","timequality":"{timequality}",{middle}'
            f'"gateway":"{gateway}","device":"{device}","partitionkey":"{gateway}/{device}","seq":{seq},'
            + (f'"seqepoch":"{epoch}",' if epoch else "")
            + '"data":'
        ).encode()
        + data
        + b"}"
    )


# What a delivery from the backlog adds to the event's closing brace (docs/events.md#live-or-backlog-backlog).
_BACKLOG_TAIL = b',"backlog":true}'


def mark_backlog(payload: bytes) -> bytes:
    """``payload`` (one event as made by :func:`make_event`) with ``"backlog":true`` added.

    Spliced into the bytes, not decoded and encoded again: the event ends with the object's
    closing brace, and an attribute's place in a JSON object carries no meaning.
    """
    return payload[:-1] + _BACKLOG_TAIL
