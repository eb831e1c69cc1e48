"""Bad input never stops ingestion: every malformed message becomes a rejection naming the field."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from agent.contract.compact import compress
from agent.ingest.decode import decode
from tests.conftest import ROOT
from tests.ingest.helpers import EPOCH, reading_event, status_event

TOPIC = "ioc/v1/gw-a/meter-1/reading"


def _with(**changes: object) -> bytes:
    event = orjson.loads(reading_event("gw-a", "meter-1", 7))
    event.update(changes)
    return orjson.dumps({k: v for k, v in event.items() if v is not ...})


def test_an_agent_event_decodes_to_its_identity_and_data() -> None:
    decoded = decode(TOPIC, reading_event("gw-a", "meter-1", 7), "ioc/v1")
    assert decoded.rejections == [] and len(decoded.events) == 1
    event = decoded.events[0]
    assert event.key == ("gw-a", "meter-1", EPOCH, 7)
    assert event.data["measurements"][0]["value"] == 0.7
    # Before seqepoch existed: read as "" (docs/events.md).
    assert decode(TOPIC, _with(seqepoch=...), "ioc/v1").events[0].seqepoch == ""
    status = decode("ioc/v1/gw-a/meter-1/status", status_event("gw-a", "meter-1", 8), "ioc/v1")
    assert status.events[0].data["status"] == "offline"
    online = decode("ioc/v1/gw-a/status", b"online", "ioc/v1")
    assert online.availability is not None and online.availability.status == "online"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (TOPIC, b"\xff\xfe", "payload: not JSON"),
        (TOPIC, b"42", "event: a JSON object is needed, got int"),
        (TOPIC, _with(specversion="0.3"), "specversion: '1.0' is needed"),
        (TOPIC, _with(seq=True), "seq: an integer from 1 is needed, got True"),
        (TOPIC, _with(seq=2**63), "seq: an integer from 1 is needed"),
        (TOPIC, _with(seqepoch="XYZ"), "seqepoch: 16 hex digits are needed"),
        (TOPIC, _with(time="yesterday"), "time: not RFC 3339"),
        (TOPIC, _with(time="2026-11-23T08:00:00"), "time: no UTC offset"),
        (TOPIC, _with(data=[1]), "data: a JSON object is needed, got list"),
        (TOPIC, _with(data={"measurements": [{"quantity": "x", "unit": "V", "quality": "good", "value": "1"}]}),
         "data.measurements[0].value: a number or null is needed"),
        (TOPIC, _with(data={"measurements": [{"unit": "V"}]}), "data.measurements[0].quantity: a string is needed"),
        (TOPIC, _with(data={"note": "a\x00b", "measurements": []}), "data: contains a NUL character"),
        (TOPIC, _with(id="a\x00b"), "id: contains a NUL character"),
        (TOPIC, _with(gateway="GW A"), "gateway: 'GW A' is not [a-z0-9][a-z0-9-]*"),
        ("ioc/v1/gw-b/meter-1/reading", _with(), "gateway: 'gw-a' on the topic of gateway 'gw-b'"),
        ("ioc/v1/gw-a/meter-1/presence", _with(), "type: 'city.meter.reading' on a 'presence' topic"),
        ("ioc/v1/gw-a/meter-1/status", _with(type="city.device.status", data={"status": "?"}),
         "data.status: online or offline is needed"),
        ("ioc/v1/gw-a/status", b"maybe", "payload: a gateway status is online or offline, got 'maybe'"),
        ("ioc/v2/gw-a/status", b"online", "topic: not under the prefix 'ioc/v1'"),
    ],
)  # fmt: skip
def test_a_malformed_message_is_rejected_with_its_topic_and_reason(topic: str, payload: bytes, reason: str) -> None:
    decoded = decode(topic, payload, "ioc/v1")
    assert decoded.events == [] and decoded.availability is None
    assert len(decoded.rejections) == 1
    rejection = decoded.rejections[0]
    assert rejection.topic == topic and rejection.reason.startswith(reason), rejection.reason
    assert rejection.payload == payload[:512]


def test_a_batch_keeps_its_good_events_and_rejects_the_bad_one_by_index() -> None:
    good = [reading_event("gw-a", "meter-1", s) for s in (1, 2)]
    payload = b"[" + good[0] + b',{"specversion":"1.0"},' + good[1] + b"]"
    decoded = decode("ioc/v1/gw-a/batch", payload, "ioc/v1")
    assert [e.seq for e in decoded.events] == [1, 2]
    assert [r.reason for r in decoded.rejections] == ["batch[1]: gateway: a non-empty string is needed, got None"]
    assert decoded.rejections[0].payload == b'{"specversion":"1.0"}'


def test_a_password_on_the_command_line_is_refused_without_echoing_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "ingest", "--dsn", "host=127.0.0.1 password=hunter2", "--init-db"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--dsn: holds a password" in done.stderr and "hunter2" not in done.stderr + done.stdout


def test_compact_messages_decode_to_the_same_events() -> None:
    """``{prefix}/{gateway}/deflate`` (uplink.mqtt.compact): one event or a batch, deflated."""
    events = [reading_event("gw-a", "meter-1", s) for s in (1, 2, 3)]
    single = decode("ioc/v1/gw-a/deflate", compress(events[0]), "ioc/v1")
    assert [e.key for e in single.events] == [("gw-a", "meter-1", EPOCH, 1)] and single.rejections == []
    batched = decode("ioc/v1/gw-a/deflate", compress(b"[" + b",".join(events) + b"]"), "ioc/v1")
    assert [e.seq for e in batched.events] == [1, 2, 3] and batched.rejections == []
    assert batched.events[2].data == decode(TOPIC, events[2], "ioc/v1").events[0].data
    broken = decode("ioc/v1/gw-a/deflate", b"\x78\x9c not deflate", "ioc/v1")
    assert broken.events == [] and broken.rejections[0].reason.startswith("payload: compact payload:")
