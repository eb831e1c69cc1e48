"""Nwave NPS405/NPS310: the vendor's published examples, then vectors worked by hand from the format.

The examples are those of TheThingsNetwork/lorawan-devices ``vendor/nwave/nps405-codec.yaml`` (commit
62c8acdd; the 6-byte registration from commit 2ed97bce) and ``vendor/nwave/nps310sm-codec.yaml``
(commit 74279b60), their ``uplinkDecoder.examples`` with input and expected output as published.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drivers.lorawan.codecs import CodecError, Decoded, Reading, get_codec
from drivers.lorawan.codecs.nwave import previous_state

NOW = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
NPS405 = get_codec("nwave-nps405")
NPS310 = get_codec("nwave-nps310")


def decode405(f_port: int, data: list[int]) -> Decoded:
    return NPS405.decode(f_port, bytes(data), NOW)


def test_nps405_vendor_example_parking_status() -> None:
    # 0x95 -> occupied: true, previous_state_duration: 74, error 0, overflow false.
    decoded = decode405(1, [0x95])
    assert (decoded.kind, decoded.occupied, decoded.previous_state_minutes) == ("status", True, 74)
    assert decoded.extra == {"previous_state_error_minutes": 0, "previous_state_overflow": False}


@pytest.mark.parametrize(
    ("data", "tag_volts"),
    [([0xD1, 0x1F, 0x34, 0x56, 0x78], None), ([0xD1, 0x20, 0x1F, 0x34, 0x56, 0x78], 3.2)],
    ids=["5-byte", "6-byte-with-tag-battery"],
)
def test_nps405_vendor_examples_user_registration(data: list[int], tag_volts: float | None) -> None:
    # Both revisions: occupied true, previous_state_duration 160 (error 4), tag_id '1F345678'.
    decoded = decode405(10, data)
    assert (decoded.kind, decoded.occupied, decoded.previous_state_minutes) == ("registration", True, 160)
    assert decoded.extra["tag_id"] == "1F345678"
    assert decoded.extra["previous_state_error_minutes"] == 4
    assert decoded.extra.get("tag_battery_volts") == tag_volts


def test_nps405_vendor_example_heartbeat() -> None:
    # battery_voltage 3.344, temperature -10, battery_health normal, hw_health_status 0, occupied false.
    decoded = decode405(2, [0x00, 0xD3, 0xD8, 0x00, 0x59, 0x0B])
    assert decoded == Decoded(
        kind="heartbeat",
        occupied=False,
        readings=(Reading("temperature", -10.0, "degC"),),
        battery_volts=3.344,
        battery_class="ok",
        extra={"hw_health_status": 0},
    )


def test_nps405_vendor_example_startup() -> None:
    decoded = decode405(3, [0x02, 0x04, 0x09, 0x02, 0x00])
    assert (decoded.kind, decoded.occupied) == ("startup", False)
    assert decoded.extra == {"firmware": "2.4.9", "reset_cause": "power_on"}


# Compressed duration (bits 1-7 of byte 0) -> minutes: exact to 89, 5-minute steps from 90, hours from 120.
@pytest.mark.parametrize(
    ("code", "minutes", "error"),
    [
        (0, 0, 0),
        (89, 89, 0),
        (90, 90, 4),
        (91, 95, 4),
        (119, 235, 4),
        (120, 240, 59),
        (126, 600, 59),
        (127, None, None),
    ],
)
@pytest.mark.parametrize("occupied", [False, True])
def test_nps405_status_duration_bands(code: int, minutes: int | None, error: int | None, occupied: bool) -> None:
    decoded = decode405(1, [code << 1 | occupied])
    assert decoded.occupied is occupied
    assert decoded.previous_state_minutes == minutes
    assert decoded.extra == {"previous_state_error_minutes": error, "previous_state_overflow": code == 127}


def test_duration_bands_are_monotonic_and_continuous_at_their_edges() -> None:
    minutes = [previous_state(code)[0] for code in range(127)]
    assert minutes == sorted(minutes)
    assert len(set(minutes)) == 127
    assert previous_state(119)[0] == 235 and previous_state(120)[0] == 240  # 235 + 4 error reaches 239


# Battery byte b -> 2500 + 4b mV; temperature byte t (int8) -> t/2 + 10 degC. -5.0 degC (t = -30 = 0xE2) keeps
# the normal thresholds (low < 3,000 mV, critical < 2,900); -5.5 (t = -31 = 0xE1) lowers both by 100 mV.
@pytest.mark.parametrize(
    ("battery", "temperature", "celsius", "volts", "klass"),
    [
        (125, 0xE2, -5.0, 3.0, "ok"),
        (124, 0xE2, -5.0, 2.996, "low"),
        (100, 0xE2, -5.0, 2.9, "low"),
        (99, 0xE2, -5.0, 2.896, "critical"),
        (100, 0xE1, -5.5, 2.9, "ok"),
        (99, 0xE1, -5.5, 2.896, "low"),
        (75, 0xE1, -5.5, 2.8, "low"),
        (74, 0xE1, -5.5, 2.796, "critical"),
        (0, 0x80, -54.0, 2.5, "critical"),
        (255, 0x7F, 73.5, 3.52, "ok"),
        (150, 0x00, 10.0, 3.1, "ok"),
    ],
)
def test_nps405_heartbeat_battery_thresholds_around_minus_5(
    battery: int, temperature: int, celsius: float, volts: float, klass: str
) -> None:
    decoded = decode405(2, [0x01, battery, temperature])
    assert decoded.occupied is True
    assert decoded.readings == (Reading("temperature", celsius, "degC"),)
    assert decoded.battery_volts == pytest.approx(volts, abs=1e-9)
    assert decoded.battery_class == klass


def test_nps405_registration_without_occupied_bit_leaves_state_unknown() -> None:
    decoded = decode405(10, [0x00, 0x00, 0x00, 0x00, 0x2A])
    assert (decoded.occupied, decoded.previous_state_minutes, decoded.extra) == (None, None, {"tag_id": "0000002A"})


def test_nps405_startup_reset_cause_without_a_name_keeps_its_code() -> None:
    assert decode405(3, [1, 0, 0, 4, 1]).extra["reset_cause"] == "code 4"
    assert decode405(3, [1, 0, 0, 200, 1]).extra["reset_cause"] == "code 200"
    assert decode405(3, [1, 0, 0, 6, 1]).extra["reset_cause"] == "brownout"


def test_nps405_debug_passes_the_bytes_on() -> None:
    assert decode405(6, [0xDE, 0xAD]) == Decoded(kind="debug", extra={"bytes": "dead"})


@pytest.mark.parametrize(
    ("f_port", "data", "message"),
    [
        (1, [], "fPort 1 status: byte 0 (state): payload too short (0 of 1 bytes)"),
        (2, [0x00, 0xD3], "fPort 2 heartbeat: byte 2 (temperature): payload too short (2 of 3 bytes)"),
        (2, [0x00], "fPort 2 heartbeat: byte 1 (battery): payload too short (1 of 3 bytes)"),
        (3, [2, 4, 9, 2], "fPort 3 startup: byte 4 (state): payload too short (4 of 5 bytes)"),
        (10, [0xD1, 0x1F, 0x34], "fPort 10 registration: byte 1 (tag id): payload too short (3 of 5 bytes)"),
    ],
)
def test_nps405_truncated_payload_names_field_and_offset(f_port: int, data: list[int], message: str) -> None:
    with pytest.raises(CodecError) as caught:
        decode405(f_port, data)
    assert str(caught.value) == message
    assert caught.value.reason == "too_short"


@pytest.mark.parametrize("f_port", [0, 4, 5, 7, 11, 223])
def test_nps405_unknown_port(f_port: int) -> None:
    with pytest.raises(CodecError, match=rf"^fPort {f_port}: fPort: no nwave-nps405 message") as caught:
        decode405(f_port, [0x01])
    assert (caught.value.reason, caught.value.field, caught.value.offset) == ("unknown_port", "fPort", None)


def test_nps310_vendor_examples() -> None:
    assert NPS310.decode(1, bytes([1]), NOW) == Decoded(kind="status", occupied=True)
    assert NPS310.decode(2, bytes([0]), NOW) == Decoded(kind="heartbeat", occupied=False)
    startup = NPS310.decode(3, bytes([0x01, 0x0D, 0x00, 0x02, 0x00]), NOW)
    assert (startup.kind, startup.occupied) == ("startup", False)
    assert startup.extra == {"firmware": "1.13.0", "reset_cause": "power_on"}


def test_nps310_edges() -> None:
    # Its reset causes differ from the NPS405's: 4 is brownout, 0 has no name.
    assert NPS310.decode(3, bytes([1, 0, 0, 4, 1]), NOW).extra["reset_cause"] == "brownout"
    assert NPS310.decode(3, bytes([1, 0, 0, 0, 1]), NOW).extra["reset_cause"] == "code 0"
    # Only bit 0 is the state; no duration, battery or temperature on this model.
    assert NPS310.decode(1, bytes([0xFE]), NOW) == Decoded(kind="status", occupied=False)
    with pytest.raises(CodecError, match=r"^fPort 2 heartbeat: byte 0 \(state\): payload too short \(0 of 1"):
        NPS310.decode(2, b"", NOW)
    with pytest.raises(CodecError, match="no nwave-nps310 message on this port") as caught:
        NPS310.decode(10, bytes([0xD1, 0x1F, 0x34, 0x56, 0x78]), NOW)
    assert caught.value.reason == "unknown_port"
