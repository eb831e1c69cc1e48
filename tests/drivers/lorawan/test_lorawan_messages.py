"""The network servers' messages as they publish them, read by drivers/lorawan/messages.py.

ChirpStack's are built from its own protobuf definitions (chirpstack-api 4.20, ``integration``)
and protobuf's JSON mapping, which is what its MQTT integration with ``json=true`` writes: fields
at their default value (fCnt 0, fPort 0) are left out. The Things Stack's follow the examples of
its data-formats page, with empty fields left out as it does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from chirpstack_api import gw, integration
from google.protobuf import json_format

from drivers.lorawan.messages import BadMessage, Join, Status, Uplink, parse, topics

APP = "2d7c1f0a-4b8e-4f3a-9c1d-5e6f7a8b9c0d"
UP = f"application/{APP}/device/0004a30b001c0530/event/up"


def _device_info(event: integration.UplinkEvent | integration.JoinEvent | integration.StatusEvent) -> None:
    event.device_info.tenant_id = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
    event.device_info.application_id = APP
    event.device_info.device_profile_name = "Nwave NPS405"
    event.device_info.device_name = "bay-17"
    event.device_info.dev_eui = "0004a30b001c0530"
    event.time.FromDatetime(datetime(2026, 12, 7, 8, 0, 0, 123000))


def _json(message: object) -> bytes:
    return json_format.MessageToJson(message).encode()  # type: ignore[arg-type]


def test_a_chirpstack_uplink_heard_by_two_gateways() -> None:
    event = integration.UplinkEvent(deduplication_id="3d3b7bd6-0f5b-4b8b-9b0c-0c1c9d8a6f01", f_cnt=42, f_port=1,
                                    data=bytes([0x95]), dr=5)  # fmt: skip
    _device_info(event)
    event.rx_info.append(gw.UplinkRxInfo(gateway_id="0016c001ff10a235", rssi=-97, snr=3.5))
    event.rx_info.append(gw.UplinkRxInfo(gateway_id="0016c001ff10a236", rssi=-81, snr=-2.25))
    up = parse("chirpstack", UP, _json(event))
    assert isinstance(up, Uplink)
    assert (up.dev_eui, up.key, up.f_cnt, up.f_port, up.payload) == (
        "0004a30b001c0530", "3d3b7bd6-0f5b-4b8b-9b0c-0c1c9d8a6f01", 42, 1, b"\x95")  # fmt: skip
    assert (up.rssi, up.snr, up.gateways) == (-81.0, 3.5, 2)
    assert up.received == datetime(2026, 12, 7, 8, 0, 0, 123000, tzinfo=UTC)
    assert (up.name, up.profile) == ("bay-17", "Nwave NPS405")
    assert (up.dr, up.correlation) == (5, "3d3b7bd6-0f5b-4b8b-9b0c-0c1c9d8a6f01")


def test_protobufs_json_leaves_zero_f_cnt_and_port_out_and_they_read_as_zero() -> None:
    event = integration.UplinkEvent(deduplication_id="a", f_cnt=0, f_port=0)
    _device_info(event)
    text = _json(event)
    assert b"fCnt" not in text and b"fPort" not in text and b'"data"' not in text
    up = parse("chirpstack", UP, text)
    assert isinstance(up, Uplink) and (up.f_cnt, up.f_port, up.payload, up.gateways) == (0, 0, b"", 0)


def test_a_chirpstack_join_and_status() -> None:
    join = integration.JoinEvent(deduplication_id="j", dev_addr="01ab2345")
    _device_info(join)
    parsed = parse("chirpstack", UP.replace("/up", "/join"), _json(join))
    assert isinstance(parsed, Join) and parsed.dev_eui == "0004a30b001c0530"
    status = integration.StatusEvent(deduplication_id="s", margin=7, battery_level=87.5, external_power_source=False)
    _device_info(status)
    report = parse("chirpstack", UP.replace("/up", "/status"), _json(status))
    assert isinstance(report, Status)
    assert (report.battery_percent, report.margin) == (87.5, 7)
    unavailable = integration.StatusEvent(battery_level_unavailable=True, external_power_source=True)
    _device_info(unavailable)
    report = parse("chirpstack", UP.replace("/up", "/status"), _json(unavailable))
    assert isinstance(report, Status) and report.battery_percent is None and report.external_power is True


def test_event_kinds_the_driver_does_not_use_are_ignored() -> None:
    ack = integration.AckEvent(deduplication_id="x", acknowledged=True, f_cnt_down=3)
    assert parse("chirpstack", UP.replace("/up", "/ack"), _json(ack)) is None
    assert parse("chirpstack", UP.replace("/up", "/log"), b"not even json") is None


# The data-formats page's uplink message, trimmed; session_key_id, f_port, f_cnt as it shows them.
TTS_UP = {
    "end_device_ids": {
        "device_id": "dev1",
        "application_ids": {"application_id": "app1"},
        "dev_eui": "0004A30B001C0530",
        "join_eui": "800000000000000C",
        "dev_addr": "00BCB929",
    },
    "correlation_ids": ["as:up:01E0WCTFNCHW4DBB7R9H2TQ6YK", "gs:conn:01E0WDEC6T5T4XXBAX7S1VMGCK"],
    "received_at": "2020-02-12T15:15:45.787844072Z",
    "uplink_message": {
        "session_key_id": "AXBSH1Pk6Z0G166/9e9HBw==",
        "f_port": 1,
        "f_cnt": 25,
        "frm_payload": "lQ==",
        "rx_metadata": [
            {"gateway_ids": {"gateway_id": "gtw1"}, "rssi": -35, "channel_rssi": -35, "snr": 5.2},
            {"gateway_ids": {"gateway_id": "gtw2"}, "rssi": -109, "snr": -6},
        ],
        "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}}, "frequency": "868300000"},
        "received_at": "2020-02-12T15:15:45.787642543Z",
        "version_ids": {"brand_id": "nwave", "model_id": "nps405"},
    },
}


def test_a_tts_uplink() -> None:
    up = parse("tts", "v3/app1@ttn/devices/dev1/up", json.dumps(TTS_UP).encode())
    assert isinstance(up, Uplink)
    assert (up.dev_eui, up.f_cnt, up.f_port, up.payload) == ("0004a30b001c0530", 25, 1, b"\x95")
    assert up.key == "AXBSH1Pk6Z0G166/9e9HBw==/25"
    assert (up.rssi, up.snr, up.gateways, up.profile) == (-35.0, 5.2, 2, "nwave/nps405")
    assert up.received == datetime(2020, 2, 12, 15, 15, 45, 787642, tzinfo=UTC)
    assert up.correlation == "as:up:01E0WCTFNCHW4DBB7R9H2TQ6YK" and up.dr is None


def test_a_tts_uplink_with_its_empty_fields_left_out() -> None:
    first = json.loads(json.dumps(TTS_UP))
    for key in ("f_cnt", "f_port", "frm_payload"):
        del first["uplink_message"][key]
    up = parse("tts", "v3/app1@ttn/devices/dev1/up", json.dumps(first).encode())
    assert isinstance(up, Uplink) and (up.f_cnt, up.f_port, up.payload) == (0, 0, b"")
    assert up.key == "AXBSH1Pk6Z0G166/9e9HBw==/0"


def test_a_tts_join() -> None:
    doc = {"end_device_ids": TTS_UP["end_device_ids"], "correlation_ids": ["as:up:01E"],
           "received_at": "2020-02-12T15:15:40Z",
           "join_accept": {"session_key_id": "AXBSH1Pk6Z0G166/9e9HBw==",
                           "received_at": "2020-02-12T15:15:39Z"}}  # fmt: skip
    join = parse("tts", "v3/app1@ttn/devices/dev1/join", json.dumps(doc).encode())
    assert isinstance(join, Join) and join.received == datetime(2020, 2, 12, 15, 15, 39, tzinfo=UTC)


@pytest.mark.parametrize(
    ("server", "payload", "expected"),
    [
        ("chirpstack", b"\x0a\x24protobuf", "not JSON (set json=true in ChirpStack's [integration.mqtt])"),
        ("chirpstack", b"[1, 2]", "not a JSON object"),
        ("chirpstack", b'{"deduplicationId": "x", "time": "2026-01-01T00:00:00Z"}', "deviceInfo missing"),
        ("chirpstack", b'{"deviceInfo": {"devEui": "0004a30b001c0530"}, "time": "2026-01-01T00:00:00Z"}',
         "deduplicationId missing"),
        ("chirpstack", b'{"deduplicationId": "x", "deviceInfo": {"devEui": "0004a30b001c0530"}}', "time missing"),
        ("chirpstack", b'{"deduplicationId": "x", "time": "2026-01-01T00:00:00Z", "deviceInfo": {"devEui": "12"}}',
         "deviceInfo.devEui missing or not 16 hex digits"),
        ("tts", b'{"end_device_ids": {"dev_eui": "0004A30B001C0530"}}', "uplink_message missing"),
        ("tts", b'{"end_device_ids": {"dev_eui": "0004A30B001C0530"}, "received_at": "2020-02-12T15:15:45Z",'
                b' "uplink_message": {"f_cnt": "7"}}', "uplink_message.f_cnt: '7' is not an integer"),
    ],
)  # fmt: skip
def test_messages_that_are_not_what_the_server_sends_name_what_is_wrong(
    server: str, payload: bytes, expected: str
) -> None:
    topic = UP if server == "chirpstack" else "v3/app1@ttn/devices/dev1/up"
    with pytest.raises(BadMessage) as caught:
        parse(server, topic, payload)  # type: ignore[arg-type]
    assert str(caught.value) == expected


def test_subscriptions() -> None:
    assert topics("chirpstack", APP) == [f"application/{APP}/device/+/event/{k}" for k in ("up", "join", "status")]
    assert topics("tts", "app1@ttn") == ["v3/app1@ttn/devices/+/up", "v3/app1@ttn/devices/+/join"]
