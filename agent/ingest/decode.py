"""MQTT message -> events to store, or rejections naming the field: pure, no database, no broker.

A consumer must never stop on one bad message: everything that is not a well-formed event of
the contract (docs/events.md) becomes a :class:`Rejection` with the topic and a reason, and the
well-formed events of the same batch are kept. Unknown fields are kept in ``data`` as they
came (consumers must ignore what they do not know, not drop it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from agent.contract.compact import ENCODING, CompactError, decompress

PAYLOAD_PREFIX = 512  # bytes of a rejected payload kept for a person to look at
READING = "city.meter.reading"
DEVICE_STATUS = "city.device.status"
_GATEWAY = re.compile(r"[a-z0-9][a-z0-9-]*")
_EPOCH = re.compile(r"[0-9a-f]{16}")
_MAX_SEQ = 2**63 - 1  # PostgreSQL bigint

Key = tuple[str, str, str, int]


@dataclass(frozen=True)
class Event:
    """One well-formed event; ``key`` (gateway, device, seqepoch, seq) is its identity."""

    gateway: str
    device: str
    seqepoch: str
    seq: int
    id: str
    type: str
    time: datetime
    data: dict[str, Any]
    data_json: str  # ``data`` as the JSON stored in the jsonb column

    @property
    def key(self) -> Key:
        return (self.gateway, self.device, self.seqepoch, self.seq)


@dataclass(frozen=True)
class Rejection:
    topic: str
    reason: str
    payload: bytes  # the first PAYLOAD_PREFIX bytes


@dataclass(frozen=True)
class Availability:
    """The retained ``{prefix}/{gateway}/status``: ``online`` or ``offline`` (the gateway's last will)."""

    gateway: str
    status: str


@dataclass
class Decoded:
    """What one MQTT message holds: events, rejections (a batch may have both), or an availability."""

    topic: str
    events: list[Event] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    availability: Availability | None = None


class Malformed(ValueError):
    """Why an event is not one of the contract: the message names the field."""


def decode(topic: str, payload: bytes, prefix: str) -> Decoded:
    """Decode one message received on ``topic`` under ``prefix`` (e.g. ``ioc/v1``)."""
    out = Decoded(topic)
    try:
        _decode_into(out, topic, payload, prefix)
    except Malformed as exc:
        out.events.clear()
        out.rejections.append(Rejection(topic, str(exc), payload[:PAYLOAD_PREFIX]))
    return out


def _decode_into(out: Decoded, topic: str, payload: bytes, prefix: str) -> None:
    if not topic.startswith(prefix + "/"):
        raise Malformed(f"topic: not under the prefix {prefix!r}")
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) == 2 and parts[1] == "status":
        text = payload.decode("utf-8", "replace")
        if text not in ("online", "offline"):
            raise Malformed(f"payload: a gateway status is online or offline, got {text[:40]!r}")
        out.availability = Availability(parts[0], text)
        return
    if not (len(parts) == 2 and parts[1] in ("batch", ENCODING)) and len(parts) != 3:
        raise Malformed("topic: neither {prefix}/{gateway}/{device}/{kind} nor {prefix}/{gateway}/batch or /deflate")
    if parts[-1] == ENCODING and len(parts) == 2:  # compact: the same JSON, deflated (docs/events.md)
        try:
            payload = decompress(payload)
        except CompactError as exc:
            raise Malformed(f"payload: compact payload: {exc}") from None
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Malformed(f"payload: not JSON ({exc})") from None
    batch = isinstance(document, list)
    if batch and len(parts) == 3:  # a compact message may hold one event or a batch
        raise Malformed("payload: a JSON array (a batch) on a per-device topic")
    items = document if batch else [document]
    for index, item in enumerate(items):
        where = f"batch[{index}]: " if batch else ""
        try:
            event = event_of(item)
            _check_topic(event, parts)
        except Malformed as exc:
            out.rejections.append(Rejection(topic, f"{where}{exc}", _prefix_of(item, payload, batch)))
            continue
        out.events.append(event)


def _prefix_of(item: Any, payload: bytes, batch: bool) -> bytes:
    if not batch:
        return payload[:PAYLOAD_PREFIX]
    return orjson.dumps(item)[:PAYLOAD_PREFIX]


def _check_topic(event: Event, parts: list[str]) -> None:
    """The event must be where its topic says: another gateway's event on this one's topic is refused."""
    if event.gateway != parts[0]:
        raise Malformed(f"gateway: {event.gateway!r} on the topic of gateway {parts[0]!r}")
    if len(parts) == 3:
        if event.device != parts[1]:
            raise Malformed(f"device: {event.device!r} on the topic of device {parts[1]!r}")
        if event.type.rsplit(".", 1)[-1] != parts[2]:
            raise Malformed(f"type: {event.type!r} on a {parts[2]!r} topic")


def event_of(item: Any) -> Event:
    """The :class:`Event` of one decoded CloudEvent, or :class:`Malformed` naming the first bad field."""
    if not isinstance(item, dict):
        raise Malformed(f"event: a JSON object is needed, got {type(item).__name__}")
    if item.get("specversion") != "1.0":
        raise Malformed(f"specversion: '1.0' is needed, got {item.get('specversion')!r}")
    gateway = _text(item, "gateway")
    if not _GATEWAY.fullmatch(gateway):
        raise Malformed(f"gateway: {gateway[:40]!r} is not [a-z0-9][a-z0-9-]*")
    device, event_id, event_type = _text(item, "device"), _text(item, "id"), _text(item, "type")
    seq = item.get("seq")
    if type(seq) is not int or not 1 <= seq <= _MAX_SEQ:
        raise Malformed(f"seq: an integer from 1 is needed, got {seq!r}"[:120])
    seqepoch = item.get("seqepoch")
    if seqepoch is None:
        seqepoch = ""  # agents before seqepoch existed: the docs say read it as ""
    elif not isinstance(seqepoch, str) or not _EPOCH.fullmatch(seqepoch):
        raise Malformed(f"seqepoch: 16 hex digits are needed, got {seqepoch!r}"[:120])
    data = item.get("data")
    if not isinstance(data, dict):
        raise Malformed(f"data: a JSON object is needed, got {type(data).__name__}")
    _check_data(event_type, data)
    data_json = orjson.dumps(data).decode()
    if "\\u0000" in data_json:
        raise Malformed("data: contains a NUL character (PostgreSQL text and jsonb cannot store it)")
    return Event(gateway, device, seqepoch, seq, event_id, event_type, _time(item.get("time")), data, data_json)


def _text(item: dict[str, Any], name: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise Malformed(f"{name}: a non-empty string is needed, got {value!r}"[:120])
    if "\x00" in value:
        raise Malformed(f"{name}: contains a NUL character")
    return value


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise Malformed(f"time: an RFC 3339 string is needed, got {value!r}"[:120])
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Malformed(f"time: not RFC 3339: {value[:40]!r}") from None
    if moment.tzinfo is None:
        raise Malformed(f"time: no UTC offset: {value[:40]!r}")
    return moment


def _check_data(event_type: str, data: dict[str, Any]) -> None:
    """The fields the tables are built from; the rest of ``data`` is stored as it came."""
    if event_type == READING:
        measurements = data.get("measurements")
        if not isinstance(measurements, list):
            raise Malformed("data.measurements: a list is needed")
        for n, m in enumerate(measurements):
            where = f"data.measurements[{n}]"
            if not isinstance(m, dict):
                raise Malformed(f"{where}: an object is needed")
            for name in ("quantity", "unit", "quality"):
                if not isinstance(m.get(name), str):
                    raise Malformed(f"{where}.{name}: a string is needed")
            value = m.get("value")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise Malformed(f"{where}.value: a number or null is needed, got {value!r}"[:120])
    elif event_type == DEVICE_STATUS and data.get("status") not in ("online", "offline"):
        raise Malformed(f"data.status: online or offline is needed, got {data.get('status')!r}"[:120])
