"""Milesight EM300-TH and EM400-MUD (TLV channels): the vendor's published examples, then vectors by hand.

The examples are those of Milesight-IoT/SensorDecoders (commit e79c9d8b): the ``Example`` sections of
``em-series/em300-th/README.md`` and ``em-series/em400-mud/README.md``, and the ``bytes`` sample of each
model's ``…-codec.json``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drivers.lorawan.codecs import CodecError, Decoded, Reading, get_codec

NOW = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
EM300 = get_codec("milesight-em300-th")
EM400 = get_codec("milesight-em400-mud")
PORT = 85  # Milesight's usual application port; the codec reads any


def th(hexed: str) -> Decoded:
    return EM300.decode(PORT, bytes.fromhex(hexed), NOW)


def mud(hexed: str) -> Decoded:
    return EM400.decode(PORT, bytes.fromhex(hexed), NOW)


def test_em300_th_readme_example_current_values() -> None:
    # 01755C 03673401 046865 -> battery 92, temperature 30.8, humidity 50.5.
    assert th("01755C03673401046865") == Decoded(
        kind="measurement",
        readings=(Reading("temperature", 30.8, "degC"), Reading("humidity", 50.5, "%")),
        battery_percent=92,
    )


def test_em300_th_readme_example_stored_record_keeps_its_own_time() -> None:
    # 20CE9E74466310015D00 -> history [{timestamp 1665561758, temperature 27.2, humidity 46.5}].
    stamp = datetime.fromtimestamp(1665561758, UTC)
    assert th("20CE9E74466310015D00").readings == (
        Reading("temperature", 27.2, "degC", stamp),
        Reading("humidity", 46.5, "%", stamp),
    )


def test_em300_th_codec_json_sample() -> None:
    # 0175640367040104687B -> battery 100, temperature 0x0104 = 26.0, humidity 0x7B / 2 = 61.5.
    decoded = th("0175640367040104687B")
    assert decoded.battery_percent == 100
    assert decoded.readings == (Reading("temperature", 26.0, "degC"), Reading("humidity", 61.5, "%"))


def test_em400_mud_readme_example_and_codec_json_sample() -> None:
    # 01755C 03670101 04824408 050001 -> battery 92, temperature 25.7, distance 2116, position tilt.
    assert mud("01755C0367010104824408050001") == Decoded(
        kind="measurement",
        readings=(Reading("temperature", 25.7, "degC"), Reading("distance", 2116, "mm"), Reading("tilt", True, None)),
        battery_percent=92,
    )


def test_em400_mud_readme_example_alarms() -> None:
    # 8367e80001 8482410601 -> temperature 23.2 threshold_alarm, distance 1601 threshold_alarm.
    decoded = mud("8367e800018482410601")
    assert decoded.readings == (Reading("temperature", 23.2, "degC"), Reading("distance", 1601, "mm"))
    assert decoded.extra == {"temperature_alarm": "threshold_alarm", "distance_alarm": "threshold_alarm"}


def test_negative_and_extreme_temperatures() -> None:
    # int16 LE tenths: 9C FF = -100 -> -10.0; 01 80 = -32767 -> -3276.7; 00 00 -> 0.0.
    assert th("03679CFF").readings == (Reading("temperature", -10.0, "degC"),)
    assert th("03670180").readings == (Reading("temperature", -3276.7, "degC"),)
    assert mud("83670000 00".replace(" ", "")).extra == {"temperature_alarm": "threshold_alarm_release"}


def test_several_stored_records_each_with_its_time() -> None:
    # Two records: t=0x65000000 (-1.5 degC, 40 %), t=0x65000E10 an hour later (-2.0 degC, 41 %).
    decoded = th("20CE00000065F1FF5000" + "20CE100E0065ECFF5200")
    first, second = datetime.fromtimestamp(0x65000000, UTC), datetime.fromtimestamp(0x65000E10, UTC)
    assert decoded.readings == (
        Reading("temperature", -1.5, "degC", first),
        Reading("humidity", 40.0, "%", first),
        Reading("temperature", -2.0, "degC", second),
        Reading("humidity", 41.0, "%", second),
    )
    assert (second - first).total_seconds() == 3600


def test_attributes_only_is_an_info_message() -> None:
    # Sent after a join: ipso 0x01, hardware 01 10 -> v1.1, firmware 01 10 -> v1.10, serial, class A, status.
    decoded = th("FF0101" + "FF090110" + "FF0A0110" + "FF166136C19146000001" + "FF0F00" + "FF0B01" + "FFFE01")
    assert decoded.kind == "info"
    assert decoded.readings == ()
    assert decoded.extra == {
        "ipso_version": 1,
        "hardware_version": "v1.1",
        "firmware": "v1.10",
        "serial_number": "6136c19146000001",
        "lorawan_class": "A",
        "device_status": 1,
        "reset_event": 1,
    }


def test_downlink_reply_stops_decoding_and_keeps_the_rest() -> None:
    # FE 02 is a reply to a collection-interval downlink: its values are not readings.
    decoded = th("01755AFE023C00")
    assert decoded.battery_percent == 90
    assert decoded.extra == {"unparsed": "fe023c00"}


@pytest.mark.parametrize(
    ("decode", "hexed", "message", "reason"),
    [
        (th, "", "fPort 85 channel: byte 0 (channel id): payload too short (0 of 2 bytes)", "too_short"),
        (th, "01755C03", "fPort 85 channel: byte 4 (channel type): payload too short (4 of 5 bytes)", "too_short"),
        (
            th,
            "01755C036701",
            "fPort 85 temperature (03 67): byte 5 (temperature): payload too short (6 of 7 bytes)",
            "too_short",
        ),
        (
            th,
            "20CE9E7446",
            "fPort 85 stored record (20 CE): byte 2 (time): payload too short (5 of 10 bytes)",
            "too_short",
        ),
        (th, "0175C8", "fPort 85 battery (01 75): byte 2 (battery): 200 is over 100", "out_of_range"),
        (th, "0468C9", "fPort 85 humidity (04 68): byte 2 (humidity): 100.5 is over 100", "out_of_range"),
        (mud, "050002", "fPort 85 position (05 00): byte 2 (tilt): code 2 is none of 0 normal, 1 tilt", "out_of_range"),
        (th, "04824408", "fPort 85 channel: byte 0 (channel): unknown channel 04 82", "malformed"),
        (mud, "01755C20CE9E74466310015D00", "fPort 85 channel: byte 3 (channel): unknown channel 20 CE", "malformed"),
    ],
)
def test_bad_payload_names_field_and_offset(decode: object, hexed: str, message: str, reason: str) -> None:
    assert callable(decode)
    with pytest.raises(CodecError) as caught:
        decode(hexed)
    assert str(caught.value) == message
    assert caught.value.reason == reason


def test_humidity_and_battery_at_their_limits_decode() -> None:
    assert th("0468C8").readings == (Reading("humidity", 100.0, "%"),)
    assert th("017564").battery_percent == 100
    assert th("017500").battery_percent == 0


@pytest.mark.parametrize("f_port", [0, 224, 255])
def test_ports_outside_the_application_range(f_port: int) -> None:
    with pytest.raises(CodecError, match="no milesight-em300-th message on this port") as caught:
        EM300.decode(f_port, bytes.fromhex("01755C"), NOW)
    assert caught.value.reason == "unknown_port"
