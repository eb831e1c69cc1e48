"""Bosch TPS110 (firmware 0.29.2): the vendor's published examples, then vectors worked by hand.

The examples are the ``uplinkDecoder.examples`` of TheThingsNetwork/lorawan-devices
``vendor/bosch/tps110-0292-codec.yaml`` (commit 3410a4b5), input and expected output as published.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drivers.lorawan.codecs import CodecError, Decoded, Reading, get_codec

NOW = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
TPS110 = get_codec("bosch-tps110")


def decode(f_port: int, data: list[int]) -> Decoded:
    return TPS110.decode(f_port, bytes(data), NOW)


def test_vendor_example_parking_status() -> None:
    assert decode(1, [1]) == Decoded(kind="status", occupied=True)


def test_vendor_example_heartbeat() -> None:
    assert decode(2, [1, 255]) == Decoded(
        kind="heartbeat", occupied=True, readings=(Reading("temperature", -1, "degC"),)
    )


def test_vendor_example_startup_with_codes_804_and_885() -> None:
    decoded = decode(3, [0x24, 3, 0, 0, 0x75, 3, 0, 0, 0, 0, 0, 0, 0, 29, 2, 3, 1])
    assert (decoded.kind, decoded.occupied) == ("startup", True)
    assert decoded.extra == {"debug_codes": (804, 885), "firmware": "0.29.2", "reset_cause": "system request"}


@pytest.mark.parametrize(("byte", "celsius"), [(0x80, -128), (0xEC, -20), (0x00, 0), (0x7F, 127), (0x19, 25)])
def test_heartbeat_temperature_is_int8(byte: int, celsius: int) -> None:
    assert decode(2, [0, byte]).readings == (Reading("temperature", celsius, "degC"),)


def test_heartbeat_without_temperature_byte() -> None:
    # Older firmware sends the state alone; no reading is made up.
    assert decode(2, [0]) == Decoded(kind="heartbeat", occupied=False)


def test_status_reads_bit_0_only() -> None:
    assert decode(1, [0xFE]).occupied is False
    assert decode(1, [0x03]).occupied is True


def test_startup_debug_codes_are_12_bits_and_zero_means_none() -> None:
    # 0xFFF from FF 0F (the high nibble of byte 1 is not part of the code); 0x001 from 01 F0.
    data = [0xFF, 0xFF, 0, 0, 0x00, 0x00, 0, 0, 0x01, 0xF0, 0, 0, 1, 2, 3, 0, 0]
    decoded = decode(3, data)
    assert decoded.extra == {"debug_codes": (0xFFF, 1), "firmware": "1.2.3", "reset_cause": "code 0"}
    assert decoded.occupied is False


def test_debug_message() -> None:
    # timestamp 78 56 34 12 -> 0x12345678; code 24 F3 -> 0x324 = 804; sequence 02 01 -> 0x0102 = 258.
    decoded = decode(6, [0x78, 0x56, 0x34, 0x12, 0x24, 0xF3, 0xAA, 0xBB, 0x02, 0x01])
    assert decoded == Decoded(kind="debug", extra={"timestamp": 0x12345678, "debug_code": 804, "sequence": 258})


def test_info_and_usage_pass_the_bytes_on() -> None:
    assert decode(4, [0x01, 0x02]) == Decoded(kind="info", extra={"bytes": "0102"})
    assert decode(5, []) == Decoded(kind="usage", extra={"bytes": ""})


@pytest.mark.parametrize(
    ("f_port", "data", "message"),
    [
        (1, [], "fPort 1 status: byte 0 (state): payload too short (0 of 1 bytes)"),
        (2, [], "fPort 2 heartbeat: byte 0 (state): payload too short (0 of 1 bytes)"),
        (3, [0] * 16, "fPort 3 startup: byte 16 (state): payload too short (16 of 17 bytes)"),
        (3, [0] * 13, "fPort 3 startup: byte 13 (firmware version): payload too short (13 of 17 bytes)"),
        (3, [0x24], "fPort 3 startup: byte 0 (debug code): payload too short (1 of 17 bytes)"),
        (6, [0] * 9, "fPort 6 debug: byte 8 (sequence number): payload too short (9 of 10 bytes)"),
    ],
)
def test_truncated_payload_names_field_and_offset(f_port: int, data: list[int], message: str) -> None:
    with pytest.raises(CodecError) as caught:
        decode(f_port, data)
    assert str(caught.value) == message
    assert caught.value.reason == "too_short"


@pytest.mark.parametrize("f_port", [0, 7, 10, 85])
def test_unknown_port(f_port: int) -> None:
    with pytest.raises(CodecError, match=r"no bosch-tps110 message on this port \(it defines 1, 2, 3, 4, 5, 6\)") as e:
        decode(f_port, [1])
    assert e.value.reason == "unknown_port"
