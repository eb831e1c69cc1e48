"""Every message the watcher receives, checked against the contract (docs/events.md, docs/delivery.md).

Per device and sequence epoch: duplicates (equal content is at-least-once delivery; different
content is a violation), order within a delivery class, and at the end the holes over the whole
sequence (across classes order is not promised, so a hole is only a loss once nothing fills it).
Per event: the schemas, the topic it came on, and its time. Nothing here raises on bad input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from agent.contract.compact import ENCODING, CompactError, decompress
from agent.contract.events import (
    DEFAULT_PRIORITIES,
    GATEWAY_HEALTH,
    GATEWAY_INVENTORY,
    GATEWAY_STREAM,
    TIME_UNSYNCED,
    source_for,
)
from agent.tools.watch.schema import problems
from agent.tools.watch.seqs import ranges_text
from agent.tools.watch.state import (
    CONFLICT,
    GAP,
    LATE,
    MALFORMED,
    MAX_KEPT,
    REORDER,
    SILENCE,
    UNSYNCED,
    Device,
    Findings,
    Gateway,
    Stream,
)

_YEAR_2000 = 946_684_800.0  # a clock that never synchronised starts at 1970 (or the board's build date)
_SHOWN = 120  # characters of a bad payload quoted in a reason


@dataclass(frozen=True)
class Limits:
    """The thresholds, from the command line."""

    max_late_s: float = 60.0
    max_skew_s: float = 86_400.0
    strict_late: bool = False
    classes: dict[str, str] | None = None  # event type -> delivery class, over the defaults


def time_problem(event: dict[str, Any], received: float, limits: Limits) -> str | None:
    """Why the event's ``time`` cannot come from a synchronised clock; None if it may.

    The gateway's own word first: ``timequality`` ``unsynced`` says its clock was not
    synchronised when it accepted the event. Without it (``unknown``, or an agent before the
    attribute), and even with ``synced``, a time before 2000 or too far from the receive time
    gives the clock away.
    """
    if event.get("timequality") == TIME_UNSYNCED:
        return f"timequality unsynced: the gateway's clock was not synchronised (time {event.get('time')})"
    taken = event_time(event)
    if taken is None:
        return None  # the schema check already named it
    if taken < _YEAR_2000:
        return f"time {event['time']} is before 2000"
    skew = received - taken
    if abs(skew) > limits.max_skew_s:
        side = "behind" if skew > 0 else "ahead of"
        return f"time {event['time']} is {abs(skew):.0f} s {side} the receive time (--max-skew {limits.max_skew_s:g})"
    return None


def event_time(event: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(event["time"])).timestamp()
    except (KeyError, ValueError):
        return None


def digest(event: dict[str, Any]) -> bytes:
    """What two receipts of one key must share: id, type, time and data."""
    body = [event.get("id"), event.get("type"), event.get("time"), event.get("data")]
    return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()


class Checker:
    """Takes (topic, payload) as they arrive and keeps the counts and findings; never raises on content."""

    def __init__(self, prefix: str, limits: Limits) -> None:
        self.prefix = prefix
        self.limits = limits
        self.gateways: dict[str, Gateway] = {}
        self.findings = Findings()
        self.events = 0  # distinct events, all gateways
        self.messages = 0
        self.unknown_topics = 0
        self._classes = {t: p.name.lower() for t, p in DEFAULT_PRIORITIES.items()} | (limits.classes or {})

    def gateway(self, name: str) -> Gateway:
        return self.gateways.setdefault(name, Gateway())

    def handle(self, topic: str, payload: bytes, retained: bool, received: float) -> None:
        """One MQTT message of ``{prefix}/...``."""
        self.messages += 1
        levels = topic[len(self.prefix) + 1 :].split("/") if topic.startswith(self.prefix + "/") else []
        if len(levels) == 2 and levels[1] == "status":
            self._status(topic, levels[0], payload)
            return
        if (
            len(levels) not in (2, 3)
            or not all(levels)
            or (len(levels) == 2 and levels[1] not in ("batch", "inventory", ENCODING))
        ):
            self.unknown_topics += 1  # not the contract's (it only grows); reported, not judged
            return
        gateway, device = levels[0], levels[1] if len(levels) == 3 else ""
        if retained and levels[1] != "inventory":
            self.malformed(topic, gateway, device, "retained: events are never published retained")
            return
        if levels[1] == ENCODING:  # compact: the same JSON, deflated (docs/events.md, Compact payloads)
            try:
                payload = decompress(payload)
            except CompactError as exc:
                self.malformed(topic, gateway, "", f"compact payload: {exc}")
                return
        try:
            decoded = json.loads(payload)
        except ValueError as exc:  # UnicodeDecodeError is one
            self.malformed(topic, gateway, device, f"not JSON ({exc}): {_quote(payload)}")
            return
        if levels[1] == "inventory":
            self._inventory(topic, gateway, decoded)
        elif levels[1] == ENCODING and isinstance(decoded, dict):
            self._event(topic, decoded, gateway, None, None, received)
        elif levels[1] in ("batch", ENCODING):
            if not isinstance(decoded, list):
                self.malformed(topic, gateway, "", "a batch must be a JSON array of CloudEvents")
                return
            for i, element in enumerate(decoded):
                self._event(f"{topic}[{i}]", element, gateway, None, None, received)
        else:
            self._event(topic, decoded, gateway, device, levels[2], received)

    def _status(self, topic: str, gateway: str, payload: bytes) -> None:
        if payload in (b"online", b"offline"):
            self.gateway(gateway).availability = payload.decode()
        else:
            self.malformed(topic, gateway, "", f"status must be online or offline, got {_quote(payload)}")

    def _inventory(self, topic: str, gateway: str, document: Any) -> None:
        reason = _not_an_event(document) or problems(document)
        if reason is None and document.get("type") != GATEWAY_INVENTORY:
            reason = f"type {document.get('type')!r} on the inventory topic"
        if reason is None and document.get("gateway") != gateway:
            reason = f"gateway {document.get('gateway')!r} on gateway {gateway}'s topic"
        if reason is not None:
            self.malformed(topic, gateway, GATEWAY_STREAM, reason)
            return
        state = self.gateway(gateway)
        state.inventories += 1
        state.clock_synchronised = document["data"]["clock"].get("synced")

    def _event(
        self, topic: str, event: Any, gateway: str, device: str | None, kind: str | None, received: float
    ) -> None:
        reason = _not_an_event(event) or problems(event)
        if reason is None:
            reason = _misplaced(event, gateway, device, kind)
        if reason is not None:
            owner = device if device is not None else event.get("device") if isinstance(event, dict) else None
            self.malformed(topic, gateway, owner if isinstance(owner, str) else "", reason)
            return
        self._sequence(event, gateway, received)

    def _sequence(self, event: dict[str, Any], gateway: str, received: float) -> None:
        name, seq, epoch = event["device"], event["seq"], event.get("seqepoch") or ""
        device = self.gateway(gateway).device(name)
        stream = device.epochs.get(epoch)
        if stream is None:
            if device.epochs:
                previous = list(device.epochs)[-1]
                self.findings.note(
                    f"{gateway}/{name}: new seqepoch {epoch or '(none)'} at seq {seq} (was {previous or '(none)'}):"
                    " the gateway restarted its numbering"
                )
            stream = device.epochs[epoch] = Stream()
        mark = digest(event)
        if not stream.seqs.add(seq):
            self._duplicate(device, stream, event, gateway, mark)
            return
        stream.remember(seq, mark)
        device.events += 1
        self.events += 1
        where = f"seqepoch {epoch or '(none)'}"
        delivery_class = self._classes.get(event["type"], f"type {event['type']}")
        top = stream.top.get(delivery_class, 0)
        if seq < top:
            device.reorders += 1
            detail = f"seq {seq} ({event['type']}, class {delivery_class}) after seq {top}, {where}"
            self.findings.add(REORDER, gateway, name, detail)
        stream.top[delivery_class] = max(top, seq)
        self._time(device, event, gateway, received)
        if event["type"] == GATEWAY_HEALTH:
            self._health(gateway, event["data"])

    def _duplicate(self, device: Device, stream: Stream, event: dict[str, Any], gateway: str, mark: bytes) -> None:
        seen = stream.digests.get(event["seq"])
        if seen is None:
            device.unchecked_duplicates += 1
        elif seen == mark:
            device.duplicates += 1
        else:
            device.conflicts += 1
            detail = (
                f"seq {event['seq']} seqepoch {event.get('seqepoch') or '(none)'} received twice with different"
                f" content (id {event['id']})"
            )
            self.findings.add(CONFLICT, gateway, event["device"], detail)

    def _time(self, device: Device, event: dict[str, Any], gateway: str, received: float) -> None:
        wrong = time_problem(event, received, self.limits)
        if wrong is not None:
            device.unsynced += 1
            self.findings.add(UNSYNCED, gateway, event["device"], f"seq {event['seq']}: {wrong}")
            return
        taken = event_time(event)
        late = received - taken if taken is not None else 0.0
        if late > self.limits.max_late_s:
            device.late += 1
            device.max_late_s = max(device.max_late_s, late)
            if self.limits.strict_late:
                detail = (
                    f"seq {event['seq']} arrived {late:.1f} s after its time (--max-late {self.limits.max_late_s:g})"
                )
                self.findings.add(LATE, gateway, event["device"], detail)

    def _health(self, gateway: str, data: dict[str, Any]) -> None:
        state = self.gateway(gateway)
        clock = data.get("clock")
        if isinstance(clock, dict):
            state.clock_synchronised = clock.get("synchronised")
        for drop in data.get("dropped_since_last_report") or []:
            state.device(drop.get("device") or "(unknown)").dropped_reported += int(drop.get("count") or 0)

    def malformed(self, topic: str, gateway: str, device: str, reason: str) -> None:
        if gateway:
            self.gateway(gateway).device(device or "(none)").malformed += 1
        self.findings.counts[MALFORMED] += 1
        if len(self.findings.malformed) < MAX_KEPT:
            self.findings.malformed.append((topic, reason))

    def open_gaps(self) -> int:
        """Seqs missing now between the first and last received of each stream (may still be filled)."""
        return sum(
            s.seqs.missing() for g in self.gateways.values() for d in g.devices.values() for s in d.epochs.values()
        )

    def finish(self) -> None:
        """The holes still open at the end are losses: record them as violations."""
        for gateway_name, gateway in self.gateways.items():
            for name, device in gateway.devices.items():
                for epoch, stream in device.epochs.items():
                    holes = stream.seqs.holes()
                    if holes:
                        missing = stream.seqs.missing()
                        detail = f"{missing} seq(s) never received, seqepoch {epoch or '(none)'}: {ranges_text(holes)}"
                        if device.dropped_reported:
                            detail += f" (the gateway reported {device.dropped_reported} dropped)"
                        self.findings.add(GAP, gateway_name, name, detail)
        if self.events == 0:
            self.findings.add(SILENCE, "", "", "no event was received")


def _not_an_event(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"not a CloudEvent: a JSON {type(value).__name__}, not an object"
    return None


def _misplaced(event: dict[str, Any], gateway: str, device: str | None, kind: str | None) -> str | None:
    """Why the event does not belong on the topic it came on; None if it does."""
    if event["gateway"] != gateway:
        return f"gateway {event['gateway']!r} on gateway {gateway}'s topic"
    if device is not None and event["device"] != device:
        return f"device {event['device']!r} on device {device}'s topic"
    if kind is not None and event["type"].rsplit(".", 1)[-1] != kind:
        return f"type {event['type']!r} on a topic ending in /{kind}"
    if event["source"] != source_for(event["gateway"], event["device"]):
        return f"source {event['source']!r} does not name gateway {event['gateway']} and device {event['device']}"
    return None


def _quote(payload: bytes) -> str:
    text = payload[:_SHOWN].decode(errors="replace")
    return repr(text) + ("..." if len(payload) > _SHOWN else "")
