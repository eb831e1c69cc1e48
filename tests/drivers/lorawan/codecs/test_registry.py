"""The codec registry, and every codec held to its promise: any bytes on any port decode or raise CodecError.

Hypothesis feeds random payloads (up to LoRaWAN's largest, 242 bytes, and beyond) on random ports,
and payloads built from each codec's own message layouts, so the fuzzing reaches past the first
length check. Each example must finish within Hypothesis's deadline.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.vocabulary import QUANTITY_UNITS
from drivers.lorawan.codecs import CODECS, CodecError, Decoded, UnknownCodec, get_codec, guess_codec
from drivers.lorawan.codecs.api import Codec

NOW = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
REASONS = {"too_short", "unknown_port", "out_of_range", "malformed"}
KINDS = {"status", "heartbeat", "startup", "registration", "info", "usage", "debug", "measurement"}
# Valid starts of Milesight channels, so random tails follow real headers.
MILESIGHT_HEADERS = [bytes.fromhex(h) for h in ("0175", "0367", "0468", "20CE", "0482", "0500", "8367", "8482", "FF0A")]


def test_the_five_codecs_by_name_and_role() -> None:
    assert {name: codec.role for name, codec in CODECS.items()} == {
        "nwave-nps405": "detector",
        "nwave-nps310": "detector",
        "bosch-tps110": "detector",
        "milesight-em300-th": "sensor",
        "milesight-em400-mud": "sensor",
    }
    assert all(codec.name == name for name, codec in CODECS.items())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nwave-nps450", "unknown codec 'nwave-nps450'; did you mean nwave-nps405"),
        ("NWAVE-NPS405", "unknown codec 'NWAVE-NPS405'; did you mean nwave-nps405"),
        ("milesight-em300", "unknown codec 'milesight-em300'; did you mean milesight-em300-th"),
        ("libelium", "unknown codec 'libelium'; known: bosch-tps110, milesight-em300-th, milesight-em400-mud, nwave"),
    ],
)
def test_unknown_codec_suggests_names(name: str, message: str) -> None:
    with pytest.raises(UnknownCodec) as caught:
        get_codec(name)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, LookupError)


@pytest.mark.parametrize(
    ("profile", "codec"),
    [
        ("Nwave NPS405 SM", "nwave-nps405"),
        ("nwave-nps310sm", "nwave-nps310"),
        ("Bosch TPS110 0.29.2", "bosch-tps110"),
        ("tpl110-0292", "bosch-tps110"),
        ("EM300-TH (EU868)", "milesight-em300-th"),
        ("em400_mud", "milesight-em400-mud"),
        ("Libelium Smart Parking", None),
        ("", None),
    ],
)
def test_guess_codec_from_profile_names(profile: str, codec: str | None) -> None:
    assert guess_codec(profile) == codec


def test_sensor_readings_use_the_meter_vocabulary() -> None:
    # Every reading with a unit is a vocabulary quantity in its unit; unitless ones (tilt) are states.
    em400 = get_codec("milesight-em400-mud").decode(85, bytes.fromhex("01755C0367010104824408050001"), NOW)
    em300 = get_codec("milesight-em300-th").decode(85, bytes.fromhex("01755C03673401046865"), NOW)
    for reading in em400.readings + em300.readings:
        if reading.unit is not None:
            assert QUANTITY_UNITS[reading.name] == reading.unit
    assert QUANTITY_UNITS["distance"] == "mm"


def check(codec: Codec, f_port: int, payload: bytes) -> None:
    """Decode, or a CodecError whose fields say what failed; nothing else may escape."""
    failure: CodecError | None = None
    try:
        decoded = codec.decode(f_port, payload, NOW)
    except CodecError as error:
        failure = error
    if failure is None:
        assert isinstance(decoded, Decoded)
        assert decoded.kind in KINDS
        assert decoded.battery_class in (None, "ok", "low", "critical")
        return
    assert failure.reason in REASONS
    assert failure.field
    assert failure.offset is None or 0 <= failure.offset <= max(len(payload), 256)
    assert str(failure).startswith(f"fPort {f_port}")


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=300, deadline=200)
@given(f_port=st.integers(0, 255), payload=st.binary(max_size=300))
def test_random_bytes_on_random_ports_raise_only_codec_errors(name: str, f_port: int, payload: bytes) -> None:
    check(CODECS[name], f_port, payload)


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=200, deadline=200)
@given(
    f_port=st.sampled_from([1, 2, 3, 4, 5, 6, 10, 85]),
    chunks=st.lists(st.tuples(st.sampled_from(MILESIGHT_HEADERS), st.binary(max_size=10)), max_size=25),
)
def test_structured_payloads_raise_only_codec_errors(name: str, f_port: int, chunks: list[tuple[bytes, bytes]]) -> None:
    check(CODECS[name], f_port, b"".join(header + tail for header, tail in chunks))
