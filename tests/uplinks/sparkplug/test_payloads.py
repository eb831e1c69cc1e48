"""The edge node's parts without a broker: payloads through the pinned .proto and back, the
config's refusals, bdSeq's file and wrap, and the backlog's pacing."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from agent.uplinks.sparkplug.bdseq import BdSeq
from agent.uplinks.sparkplug.config import SparkplugConfig
from agent.uplinks.sparkplug.forward import MAX_METRICS, PAYLOADS_PER_SECOND, Forward
from agent.uplinks.sparkplug.metrics import BOOLEAN, DOUBLE, INT32, INT64, STRING, UINT64, Value, parse
from agent.uplinks.sparkplug.payloads import (
    decode_command,
    get_value,
    metrics_payload,
    node_birth,
    node_death,
)
from agent.uplinks.sparkplug.proto import payload_class

TS = 1_772_352_000_123


@pytest.mark.parametrize(
    ("datatype", "value", "field"),
    [
        (DOUBLE, 231.25, "double_value"),
        (BOOLEAN, True, "boolean_value"),
        (BOOLEAN, False, "boolean_value"),
        (INT64, -5, "long_value"),  # two's complement in a uint64
        (INT64, 2**62, "long_value"),
        (UINT64, 255, "long_value"),
        (INT32, -7, "int_value"),  # two's complement in a uint32
        (STRING, "online", "string_value"),
    ],
)
def test_every_datatype_used_round_trips(datatype: int, value: object, field: str) -> None:
    data = metrics_payload(7, [(Value("m", value, datatype, "V", "good", TS), 3)], birth=True)
    payload = payload_class().FromString(data)
    (metric,) = payload.metrics
    assert (metric.name, metric.alias, metric.datatype, metric.timestamp) == ("m", 3, datatype, TS)
    assert metric.WhichOneof("value") == field
    assert get_value(metric, datatype) == value
    assert dict(zip(metric.properties.keys, [v.string_value for v in metric.properties.values], strict=True)) == {
        "engUnit": "V"
    }
    assert payload.seq == 7


def test_quality_property_and_null() -> None:
    stale = Value("p", 4.2, DOUBLE, None, "stale", TS)
    bad = Value("c", 1.0, DOUBLE, None, "bad", TS)
    payload = payload_class().FromString(metrics_payload(1, [(stale, 1), (bad, 2)], birth=False))
    s, b = payload.metrics
    assert not s.HasField("name") and not s.HasField("datatype"), "DATA carries the alias only"
    assert (s.double_value, list(s.properties.keys), s.properties.values[0].type) == (4.2, ["Quality"], INT32)
    assert s.properties.values[0].int_value == 500
    assert b.is_null and b.WhichOneof("value") is None
    assert (list(b.properties.keys), b.properties.values[0].int_value) == (["Quality"], 0)


def test_a_value_the_datatype_cannot_hold_goes_null_with_bad_quality() -> None:
    payload = payload_class().FromString(metrics_payload(1, [(Value("v", "n/a", DOUBLE, None, "good", TS), 1)],
                                                         birth=False, historical=True))  # fmt: skip
    (m,) = payload.metrics
    assert m.is_null and m.is_historical and m.properties.values[0].int_value == 0


def test_node_birth_and_death() -> None:
    birth = payload_class().FromString(node_birth(255, 0, ()))
    names = [(m.name, m.datatype, m.HasField("alias")) for m in birth.metrics]
    assert names == [("bdSeq", INT64, False), ("Node Control/Rebirth", BOOLEAN, False)]  # topics-nbirth-bdseq
    assert birth.metrics[0].long_value == 255 and birth.metrics[1].boolean_value is False
    death = payload_class().FromString(node_death(255))
    assert not death.HasField("seq") and death.metrics[0].long_value == 255


def test_commands_that_are_not_payloads_are_refused() -> None:
    with pytest.raises(ValueError, match="not a Sparkplug B payload"):
        decode_command(b"\xff\xff\xff garbage")
    cmd = payload_class()()
    m = cmd.metrics.add()
    m.alias, m.double_value = 4, 1.5
    (written,) = decode_command(cmd.SerializeToString())
    assert (written.name, written.alias, written.datatype) == (None, 4, None)


def test_events_become_metrics() -> None:
    event = {"type": "city.meter.reading", "device": "m1", "time": "2026-03-01T08:00:00.123Z", "data": {
        "measurements": [
            {"quantity": "voltage", "phase": "L1", "value": 231.5, "unit": "V", "quality": "good"},
            {"quantity": "digital_input", "point": "relay", "value": 1, "quality": "good"},
            {"quantity": "counter", "point": "c", "value": None, "quality": "bad"},
        ]}}  # fmt: skip
    parsed = parse(orjson.dumps(event))
    assert parsed is not None
    got = {v.name: (v.value, v.datatype, v.unit, v.quality, v.timestamp) for v in parsed.values}
    assert got == {"voltage_L1": (231.5, DOUBLE, "V", "good", TS), "relay": (1, BOOLEAN, None, "good", TS),
                   "c": (None, DOUBLE, None, "bad", TS)}  # fmt: skip
    bay = parse(orjson.dumps({"type": "city.parking.occupancy", "device": "b", "time": "2026-03-01T08:00:00.123Z",
                              "data": {"bay": "P-07", "occupied": True, "confidence": 0.9}}))  # fmt: skip
    assert bay is not None and [(v.name, v.datatype) for v in bay.values] == [
        ("bay/P-07/occupied", BOOLEAN), ("bay/P-07/confidence", DOUBLE)]  # fmt: skip
    area = parse(orjson.dumps({"type": "city.crosswalk.presence", "device": "x", "time": "2026-03-01T08:00:00Z",
                               "data": {"area": "crossing-n", "count": 3}}))  # fmt: skip
    assert area is not None and [(v.name, v.value) for v in area.values] == [("area/crossing-n/count", 3)]
    assert parse(orjson.dumps({"type": "city.camera.snapshot", "device": "c", "time": "2026-03-01T08:00:00Z"})) is None


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        ({"group_id": "a/b"}, "group_id"),
        ({"edge_node_id": "gw+1"}, "edge_node_id"),
        ({"primary_host_id": "scada#"}, "primary_host_id"),
        ({"writable": [{"device": "m/1", "point": "p"}]}, "writable.0.device"),
        ({"writable": [{"device": "m1", "point": "p+"}]}, "writable.0.point"),
    ],
)
def test_ids_with_topic_characters_are_refused_naming_the_key(keys: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        SparkplugConfig.model_validate(keys)
    assert [".".join(str(p) for p in e["loc"]) for e in info.value.errors()] == [field]
    assert "one MQTT topic level" in str(info.value)


def test_password_rules_are_the_mqtt_uplinks(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    with pytest.raises(ValidationError, match="refusing to send a password in clear text"):
        SparkplugConfig.model_validate({"servers": [{"host": "scada.example"}], "username": "u",
                                        "password_file": str(secret), "tls": {"enabled": False}})  # fmt: skip
    ok = SparkplugConfig.model_validate({"servers": [{"host": "scada.example"}], "username": "u",
                                         "password_file": str(secret)})  # fmt: skip
    assert ok.tls.active and ok.port(ok.servers[0]) == 8883 and ok.password() == "s3cret"
    assert ok.secrets() == ["s3cret"]


def test_bdseq_is_kept_0600_and_wraps(tmp_path: Path) -> None:
    path = tmp_path / "sparkplug.bdseq"
    assert [BdSeq(path).next() for _ in range(3)] == [0, 1, 2]  # a new object each time: as across restarts
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("255\n")
    assert BdSeq(path).next() == 0
    path.write_text("garbage")
    assert BdSeq(path).next() == 0


def test_backlog_payloads_are_paced_and_bounded() -> None:
    forward = Forward(keepalive=5.0)
    values = [Value(f"m{i}", 1.0, DOUBLE, None, "good", TS) for i in range(1200)]
    forward.add("d1", values, row_id=1)  # one row too big for one payload: split, acked with its last part
    for row in range(2, 5):
        forward.add("d2", values[:10], row_id=row)
    now = 100.0
    sent: list[tuple[str, int, list[int]]] = []
    while forward.history:
        assert forward.due(now)
        device, metrics, ids = forward.take(now)
        assert not forward.due(now), "one payload per 1/PAYLOADS_PER_SECOND"
        sent.append((device, len(metrics), ids))
        forward.sent(ids, now)
        now += 1.0 / PAYLOADS_PER_SECOND
    assert sent == [("d1", MAX_METRICS, []), ("d2", 30, [2, 3, 4]), ("d1", MAX_METRICS, []), ("d1", 200, [1])]
    assert forward.confirmed(now) == [] and forward.confirmed(now + 5.0) == [2, 3, 4, 1]
