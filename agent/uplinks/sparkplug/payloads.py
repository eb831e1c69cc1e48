"""Sparkplug B payloads: BIRTH, DATA and DEATH made, NCMD/DCMD read (sparkplug_b.proto's Payload)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.uplinks.sparkplug.metrics import (
    BOOLEAN,
    DOUBLE,
    FLOAT,
    INT32,
    INT64,
    INT_TYPES,
    LONG_TYPES,
    STRING,
    Value,
)
from agent.uplinks.sparkplug.proto import new_payload, payload_class

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
QUALITY = "Quality"  # the property key the spec reserves (payloads-propertyset-quality-value-type)
ENG_UNIT = "engUnit"  # no key is reserved for units: this one is Ignition's and Tahu's
QUALITY_STALE, QUALITY_BAD = 500, 0  # OPC-style quality codes: 192 good (implied by no property)


def now_ms() -> int:
    """The current time, UTC milliseconds."""
    return int(time.time() * 1000)


def set_value(target: Any, datatype: int, value: Any) -> None:
    """Fill a Metric's (or PropertyValue's) value field for ``datatype``; None sets is_null."""
    if value is None:
        target.is_null = True
    elif datatype in INT_TYPES:
        target.int_value = int(value) & 0xFFFFFFFF  # signed types travel two's complement
    elif datatype in LONG_TYPES:
        target.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif datatype == FLOAT:
        target.float_value = float(value)
    elif datatype == DOUBLE:
        target.double_value = float(value)
    elif datatype == BOOLEAN:
        target.boolean_value = bool(value)
    elif datatype == STRING or datatype == 14:
        target.string_value = str(value)
    else:
        raise ValueError(f"datatype {datatype} is not one this edge node sends")


def get_value(metric: Any, datatype: int) -> Any:
    """A received Metric's value read as ``datatype`` (signed integers from two's complement)."""
    if metric.is_null:
        return None
    field = metric.WhichOneof("value")
    if field is None:
        raise ValueError("no value")
    value = getattr(metric, field)
    if datatype in (1, 2, 3) and field == "int_value":
        bits = {1: 8, 2: 16, 3: 32}[datatype]
        value &= (1 << bits) - 1
        return value - (1 << bits) if value >> (bits - 1) else value
    if datatype == 4 and field == "long_value":
        return value - (1 << 64) if value >> 63 else value
    return value


def _property(props: Any, key: str, datatype: int, value: Any) -> None:
    props.keys.append(key)
    prop = props.values.add()
    prop.type = datatype
    set_value(prop, datatype, value)


def add_metric(payload: Any, value: Value, *, alias: int | None, birth: bool, historical: bool = False) -> None:
    """One metric: name (BIRTH, or without aliases), alias, datatype (BIRTH only), quality, unit."""
    metric = payload.metrics.add()
    if birth or alias is None:
        metric.name = value.name
    if alias is not None:
        metric.alias = alias
    metric.timestamp = value.timestamp
    if birth:
        metric.datatype = value.datatype
    if historical:
        metric.is_historical = True
    bad = value.quality == "bad"
    try:
        set_value(metric, value.datatype, None if bad else value.value)
    except (TypeError, ValueError, OverflowError):  # not a value of the metric's BIRTH datatype
        bad = True
        set_value(metric, value.datatype, None)
    if birth and value.unit:
        _property(metric.properties, ENG_UNIT, STRING, value.unit)
    if bad:
        _property(metric.properties, QUALITY, INT32, QUALITY_BAD)
    elif value.quality == "stale":
        _property(metric.properties, QUALITY, INT32, QUALITY_STALE)


def node_birth(bdseq: int, seq: int, node_metrics: Iterable[tuple[Value, int | None]]) -> bytes:
    """NBIRTH: bdSeq, Node Control/Rebirth (false, never aliased), then the node's own metrics."""
    payload = new_payload()
    ts = now_ms()
    payload.timestamp, payload.seq = ts, seq
    add_metric(payload, Value(BDSEQ, bdseq, INT64, None, "good", ts), alias=None, birth=True)
    add_metric(payload, Value(REBIRTH, False, BOOLEAN, None, "good", ts), alias=None, birth=True)
    for value, alias in node_metrics:
        add_metric(payload, value, alias=alias, birth=True)
    return bytes(payload.SerializeToString())


def node_death(bdseq: int) -> bytes:
    """NDEATH (also the will): bdSeq only, no seq."""
    payload = new_payload()
    ts = now_ms()
    payload.timestamp = ts
    add_metric(payload, Value(BDSEQ, bdseq, INT64, None, "good", ts), alias=None, birth=True)
    return bytes(payload.SerializeToString())


def metrics_payload(seq: int, metrics: Iterable[tuple[Value, int | None]], *, birth: bool,
                    historical: bool = False) -> bytes:  # fmt: skip
    """DBIRTH (``birth``), or NDATA/DDATA, or DDEATH (no metrics)."""
    payload = new_payload()
    payload.timestamp, payload.seq = now_ms(), seq
    for value, alias in metrics:
        add_metric(payload, value, alias=alias, birth=birth, historical=historical)
    return bytes(payload.SerializeToString())


@dataclass(frozen=True, slots=True)
class Written:
    """One metric of a received NCMD/DCMD: by name, alias or both."""

    name: str | None
    alias: int | None
    datatype: int | None
    metric: Any  # the protobuf Metric, for its value once the datatype is known


def decode_command(data: bytes) -> list[Written]:
    """The metrics of an NCMD/DCMD payload. Raises ValueError if it is not a Sparkplug B payload."""
    try:
        payload = payload_class().FromString(data)
    except Exception as exc:  # protobuf's DecodeError, or anything a hostile payload provokes
        raise ValueError(f"not a Sparkplug B payload ({type(exc).__name__})") from exc
    return [
        Written(
            m.name if m.HasField("name") else None,
            m.alias if m.HasField("alias") else None,
            m.datatype if m.HasField("datatype") else None,
            m,
        )
        for m in payload.metrics
    ]
