"""The two network servers' MQTT messages, read into one form: uplinks, joins and status reports.

ChirpStack v4 (MQTT integration, ``json=true``): ``application/{id}/device/{dev_eui}/event/{up,join,status}``,
the protobuf messages of ``chirpstack_api.integration`` in protobuf's JSON mapping (camelCase keys;
fields at their default value are left out, so a missing ``fCnt`` is 0).

The Things Stack v3 (MQTT server): ``v3/{app}@{tenant}/devices/{device_id}/{up,join}``; empty fields
are left out too (a missing ``f_cnt`` or ``f_port`` is 0, a missing ``frm_payload`` no bytes).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

Server = Literal["chirpstack", "tts"]


class BadMessage(Exception):
    """A message that is not one the network server sends: not JSON, or lacking a required field."""


@dataclass(slots=True)
class Uplink:
    """One uplink, as the network server received it (after its own deduplication across gateways)."""

    dev_eui: str  # lowercase
    key: str  # the dedupe key: ChirpStack's deduplicationId; TTS's session_key_id/f_cnt
    f_cnt: int
    f_port: int
    payload: bytes
    received: datetime  # the server's receive time
    rssi: float | None  # best over the gateways that heard it
    snr: float | None
    gateways: int
    name: str | None  # the server's device name (scan)
    profile: str | None  # the server's device profile, or brand/model (scan's codec guess)
    session: str | None = None  # TTS session_key_id
    dr: int | None = None  # data rate (ChirpStack's dr; TTS's settings.data_rate_index when it sends one)
    correlation: str | None = None  # what the server's console finds it by: deduplicationId, TTS's as:up: id
    receipt: tuple[int, int] | None = None  # (connection generation, MQTT mid) to acknowledge once handled
    held: bool = False  # counted in its connection's messages in hand until handled (backpressure)


@dataclass(slots=True)
class Join:
    """A device joined: a new session, its frame counter starts again at 0."""

    dev_eui: str
    key: str  # ChirpStack's deduplicationId; TTS's new session_key_id: a redelivered join changes nothing
    received: datetime
    name: str | None
    profile: str | None
    receipt: tuple[int, int] | None = None
    held: bool = False


@dataclass(slots=True)
class Status:
    """ChirpStack's DevStatusAns report: battery and link margin."""

    dev_eui: str
    received: datetime
    battery_percent: float | None
    margin: int | None
    external_power: bool | None
    name: str | None
    profile: str | None
    receipt: tuple[int, int] | None = None
    held: bool = False


Message = Uplink | Join | Status


def topics(server: Server, application: str) -> list[str]:
    """The subscriptions that bring every device of ``application``."""
    if server == "chirpstack":
        return [f"application/{application}/device/+/event/{kind}" for kind in ("up", "join", "status")]
    return [f"v3/{application}/devices/+/{kind}" for kind in ("up", "join")]


def parse(server: Server, topic: str, payload: bytes) -> Message | None:
    """The message on ``topic``; None for an event kind the driver does not use (ack, txack, log...).

    Raises:
        BadMessage: not JSON, or a required field missing or of the wrong type (named).
    """
    kind = topic.rsplit("/", 1)[-1]
    if kind not in ("up", "join", "status"):
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        hint = " (set json=true in ChirpStack's [integration.mqtt])" if server == "chirpstack" else ""
        raise BadMessage(f"not JSON{hint}") from None
    if not isinstance(doc, dict):
        raise BadMessage("not a JSON object")
    if server == "chirpstack":
        return _chirpstack(kind, doc)
    return _tts(kind, doc)


def _chirpstack(kind: str, doc: dict[str, Any]) -> Message:
    info = _object(doc, "deviceInfo")
    dev_eui = _eui(info, "deviceInfo.devEui", "devEui")
    received = _time(doc.get("time"), "time")
    name, profile = _text(info.get("deviceName")), _text(info.get("deviceProfileName"))
    if kind == "join":
        return Join(dev_eui, f"join/{doc.get('deduplicationId') or received.isoformat()}", received, name, profile)
    if kind == "status":
        level = doc.get("batteryLevel")
        unavailable = bool(doc.get("batteryLevelUnavailable"))
        return Status(
            dev_eui,
            received,
            None if unavailable or not isinstance(level, int | float) else float(level),
            _int(doc.get("margin"), "margin"),
            bool(doc["externalPowerSource"]) if "externalPowerSource" in doc else None,
            name,
            profile,
        )
    key = doc.get("deduplicationId")
    if not isinstance(key, str) or not key:
        raise BadMessage("deduplicationId missing")
    rx = doc.get("rxInfo") or []
    rssi, snr, gateways = _radio(rx, "rssi", "snr")
    return Uplink(dev_eui, key, _int(doc.get("fCnt"), "fCnt") or 0, _int(doc.get("fPort"), "fPort") or 0,
                  _bytes(doc.get("data"), "data"), received, rssi, snr, gateways, name, profile,
                  dr=_int(doc.get("dr"), "dr"), correlation=key)  # fmt: skip


def _tts(kind: str, doc: dict[str, Any]) -> Message:
    ids = _object(doc, "end_device_ids")
    dev_eui = _eui(ids, "end_device_ids.dev_eui", "dev_eui")
    name = _text(ids.get("device_id"))
    if kind == "join":
        accept: dict[str, Any] = doc["join_accept"] if isinstance(doc.get("join_accept"), dict) else {}
        received = _time(accept.get("received_at") or doc.get("received_at"), "join_accept.received_at")
        return Join(dev_eui, f"join/{accept.get('session_key_id') or received.isoformat()}", received, name, None)
    up = _object(doc, "uplink_message")
    received = _time(up.get("received_at") or doc.get("received_at"), "uplink_message.received_at")
    session = _text(up.get("session_key_id"))
    f_cnt = _int(up.get("f_cnt"), "uplink_message.f_cnt") or 0
    version: dict[str, Any] = up["version_ids"] if isinstance(up.get("version_ids"), dict) else {}
    profile = "/".join(str(version[k]) for k in ("brand_id", "model_id") if k in version) or None
    rssi, snr, gateways = _radio(up.get("rx_metadata") or [], "rssi", "snr")
    settings: dict[str, Any] = up["settings"] if isinstance(up.get("settings"), dict) else {}
    correlations = [c for c in doc.get("correlation_ids") or [] if isinstance(c, str)]
    correlation = next((c for c in correlations if c.startswith("as:up:")), correlations[0] if correlations else None)
    return Uplink(dev_eui, f"{session or '-'}/{f_cnt}", f_cnt, _int(up.get("f_port"), "uplink_message.f_port") or 0,
                  _bytes(up.get("frm_payload"), "uplink_message.frm_payload"), received, rssi, snr, gateways, name,
                  profile, session, _int(settings.get("data_rate_index"), "uplink_message.settings.data_rate_index"),
                  correlation)  # fmt: skip


def _object(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise BadMessage(f"{key} missing")
    return value


def _eui(parent: dict[str, Any], where: str, key: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or len(value) != 16:
        raise BadMessage(f"{where} missing or not 16 hex digits")
    try:
        int(value, 16)
    except ValueError:
        raise BadMessage(f"{where} missing or not 16 hex digits") from None
    return value.lower()


def _time(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise BadMessage(f"{where} missing")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadMessage(f"{where}: {value[:40]!r} is not an RFC 3339 time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadMessage(f"{where}: {value!r} is not an integer")
    return value


def _bytes(value: Any, where: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise BadMessage(f"{where}: not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadMessage(f"{where}: not base64") from None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _radio(rx: Any, rssi_key: str, snr_key: str) -> tuple[float | None, float | None, int]:
    """Best RSSI and SNR over the gateways that heard the uplink, and how many did."""
    if not isinstance(rx, list):
        return None, None, 0
    rssis = [float(g[rssi_key]) for g in rx if isinstance(g, dict) and isinstance(g.get(rssi_key), int | float)]
    snrs = [float(g[snr_key]) for g in rx if isinstance(g, dict) and isinstance(g.get(snr_key), int | float)]
    return (max(rssis) if rssis else None), (max(snrs) if snrs else None), len(rx)
