"""Compact payloads: exact round trips, the dictionary pinned, the size target, and bad payloads refused by reason."""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from agent.config.model import load_config
from agent.contract import compact, data
from agent.contract.compact import CompactError, compress, decode_events, decode_message, decompress
from agent.contract.compact_dictionary import DICTIONARIES, DICTIONARY_V1, DICTIONARY_V1_ID
from agent.contract.events import (
    CROSSWALK_PRESENCE,
    DEVICE_STATUS,
    METER_READING,
    PARKING_OCCUPANCY,
    Reading,
    batch_topic,
    make_event,
    topic_for,
)
from agent.contract.floats import shortest_float32
from agent.errors import ConfigError
from agent.uplinks.mqtt.config import mqtt_settings
from tests.conftest import ROOT

AT = datetime(2026, 11, 23, 8, 12, 27, 158000, tzinfo=UTC)
SDM630 = yaml.safe_load((ROOT / "config" / "profiles" / "eastron-sdm630.yaml").read_text())["points"]
THINGSBOARD = 240  # B per reading: issue 17's side-by-side, 100 Modbus devices x 20 registers


def reading(device: str, seq: int, points: list[dict[str, Any]], rng: random.Random) -> bytes:
    """A meter reading as the Modbus driver reports it: float32 values, shortest decimals, 7-9 digits."""
    ms = [
        data.measurement(
            p["quantity"],
            shortest_float32(rng.uniform(0.5, 400.0)),
            p["unit"],
            point=p["name"],
            phase=p.get("phase"),
        )
        for p in points
    ]
    r = Reading(METER_READING, data.meter_reading(ms), AT + timedelta(milliseconds=3 * seq))
    return make_event(gateway="gw-demo-01", device=device, seq=seq, reading=r, now=AT, epoch="5f0c2a9e81d34b17")


def every_type() -> list[bytes]:
    """One event of each buffered type but the camera's (its JPEG is already compressed)."""
    rng = random.Random(1)
    events = [reading("meter-1", 1, SDM630, rng)]
    for seq, (kind, body) in enumerate(
        [
            (DEVICE_STATUS, data.device_status("offline", "timeout after 1.0 s", "modbus", 3, AT)),
            (PARKING_OCCUPANCY, data.parking_occupancy("P-07", True, 0.98, AT, point="bay_7")),
            (CROSSWALK_PRESENCE, data.crosswalk_presence("north", 3, 5)),
        ],
        start=2,
    ):
        events.append(make_event(gateway="gw-demo-01", device="dev-1", seq=seq, reading=Reading(kind, body), now=AT))
    return events


def test_the_dictionary_is_frozen() -> None:
    # Its Adler-32 is in every compact payload: changing one byte breaks every consumer's decoder.
    # A new dictionary is added beside this one, never instead of it.
    assert DICTIONARY_V1_ID == 0x12B4AB21 and len(DICTIONARY_V1) == 5817
    assert hashlib.sha256(DICTIONARY_V1).hexdigest() == (
        "09309099c3afe93489138191b0cb183ffcf265dd613d3d6798e5d661b3eb55fb"  # Adler-32 alone is a weak check
    )
    assert DICTIONARIES[DICTIONARY_V1_ID] == DICTIONARY_V1
    assert DICTIONARY_V1.isascii()


@pytest.mark.parametrize("level", [1, 6, 9])
def test_every_event_and_a_batch_come_back_byte_for_byte(level: int) -> None:
    events = every_type()
    batch = b"[" + b",".join(events) + b"]"  # as the uplink builds a batch
    for message in [*events, batch]:
        packed = compress(message, level)
        assert decompress(packed) == message
    assert decode_events(compress(batch, level)) == [json.loads(e) for e in events]
    assert decode_events(compress(events[0], level)) == [json.loads(events[0])]


def test_a_consumer_needs_only_zlib_and_the_dictionary() -> None:
    # What a consumer in another language does: read the DICTID from the header, inflate with that dictionary.
    event = every_type()[0]
    packed = compress(event)
    assert packed[0] == 0x78 and packed[1] & 0x20, "no zlib header naming a preset dictionary"
    assert int.from_bytes(packed[2:6], "big") == DICTIONARY_V1_ID
    with pytest.raises(zlib.error):  # without the dictionary it cannot be read
        zlib.decompress(packed)
    inflater = zlib.decompressobj(zdict=DICTIONARY_V1)
    assert inflater.decompress(packed) + inflater.flush() == event


def test_compact_batches_are_at_or_below_thingsboard_per_reading() -> None:
    rng = random.Random(17)
    registers = [dict(p, name=f"t{i:03d}") for i, p in enumerate(SDM630[:20])]
    events = [reading(f"meter-{d:03d}", d + 1, registers, rng) for d in range(100)]
    batch = b"[" + b",".join(events) + b"]"
    plain = len(batch) / 100
    packed = len(compress(batch)) / 100
    single = sum(len(compress(e)) for e in events) / 100
    assert plain > 2000  # the comparison's baseline: a 20-register reading is about 2 KB of JSON
    assert packed <= THINGSBOARD, f"compact batched: {packed:.0f} B per reading"
    assert single < plain / 5, f"compact single: {single:.0f} B per reading of {plain:.0f}"


def test_the_full_sdm630_reading_shrinks_eightfold_alone() -> None:
    event = reading("meter-1", 42, SDM630, random.Random(3))
    assert len(event) > 4000
    assert len(compress(event)) * 8 < len(event), len(compress(event))


def test_topics_keep_compact_messages_from_plain_consumers() -> None:
    topic = compact.compact_topic("ioc/v1", "gw-demo-01")
    assert topic == "ioc/v1/gw-demo-01/deflate"
    assert compact.is_compact_topic(topic)
    # A consumer that cannot decode them subscribes to these and never receives them.
    for plain in ("ioc/v1/+/+/+", "ioc/v1/+/batch", "ioc/v1/+/status", "ioc/v1/+/inventory"):
        assert not topic_matches_sub(plain, topic), plain
    assert topic_matches_sub("ioc/v1/+/deflate", topic)
    assert not compact.is_compact_topic(topic_for("ioc/v1", "gw-demo-01", "deflate", METER_READING))
    assert not compact.is_compact_topic(batch_topic("ioc/v1", "gw-demo-01"))


def test_decode_message_reads_every_kind_of_event_message() -> None:
    events = every_type()[:2]
    batch = b"[" + b",".join(events) + b"]"
    expected = [json.loads(e) for e in events]
    device_topic = topic_for("ioc/v1", "gw-demo-01", "meter-1", METER_READING)
    assert decode_message(device_topic, events[0]) == expected[:1]
    assert decode_message(batch_topic("ioc/v1", "gw-demo-01"), batch) == expected
    deflate = compact.compact_topic("ioc/v1", "gw-demo-01")
    assert decode_message(deflate, compress(batch)) == expected
    assert decode_message(deflate, compress(events[1])) == expected[1:]


def _other_dictionary(payload: bytes) -> bytes:
    """A stream naming a dictionary this decoder does not know."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, b'{"other":"dictionary"}')
    return deflater.compress(payload) + deflater.flush()


EVENT = b'{"specversion":"1.0","id":"x","data":{}}'
BAD: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not a compact payload: 0 byte(s)"),
    ("plain JSON", EVENT, "no zlib header (starts with 7b22)"),
    ("gzip", bytes.fromhex("1f8b0800"), "no zlib header"),
    ("dictionary id cut off", compress(EVENT)[:4], "the dictionary id is cut off"),
    ("unknown dictionary", _other_dictionary(EVENT), "which this decoder does not know"),
    ("truncated", compress(EVENT)[:-6], "truncated compact payload"),
    ("trailing bytes", compress(EVENT) + b"xx", "2 byte(s) after the end"),
    ("damaged", compress(EVENT)[:-1] + bytes([compress(EVENT)[-1] ^ 1]), "damaged compact payload"),
    ("not JSON", compress(b"\x00not json"), "not JSON"),
    ("array of numbers", compress(b"[1,2]"), "item 0 is a JSON int, not a CloudEvent object"),
]


@pytest.mark.parametrize(("name", "payload", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_payloads_are_refused_with_the_reason(name: str, payload: bytes, reason: str) -> None:
    with pytest.raises(CompactError) as caught:
        decode_events(payload)
    assert reason in str(caught.value), (name, str(caught.value))


def test_a_payload_that_inflates_too_far_is_refused_without_inflating_it_all() -> None:
    bomb = compress(b"[" + b" " * 10_000_000 + b"]")
    assert len(bomb) < 20_000
    with pytest.raises(CompactError, match="inflates to more than 1000000 bytes"):
        decompress(bomb, max_bytes=1_000_000)
    assert len(decompress(bomb)) == 10_000_002  # within the default limit it is read whole


def _site(tmp_path: Path, mqtt: str) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        "gateway: {id: gw-1}\n"
        f"uplink:\n  mqtt: {{{mqtt}}}\n"
        "buffer: {path: buffer.db}\n"
        "devices:\n  - {id: m, driver: virtual, kind: meter}\n"
    )
    return site


def test_compact_is_off_by_default_and_turned_on_per_link(tmp_path: Path) -> None:
    assert not mqtt_settings(load_config(_site(tmp_path, "host: 127.0.0.1"))).compact.enabled
    # The defaults written out (as the sample shows them) are valid, and off.
    assert not mqtt_settings(load_config(_site(tmp_path, "compact: {enabled: false, level: 6}"))).compact.enabled
    on = mqtt_settings(load_config(_site(tmp_path, "compact: {enabled: true, level: 9}, batch: {enabled: true}")))
    assert on.compact.enabled and on.compact.level == 9 and on.batch.enabled


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ("compact: {enabled: true, level: 0}", "uplink.mqtt.compact.level"),
        ("compact: {enabled: true, level: 10}", "uplink.mqtt.compact.level"),
        ("compact: {enabled: yes please}", "uplink.mqtt.compact.enabled"),
        ("compact: {enabled: true, dictionary: none}", "uplink.mqtt.compact.dictionary"),
    ],
)
def test_bad_compact_settings_are_refused_naming_the_field(tmp_path: Path, mqtt: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_site(tmp_path, mqtt))
    (problem,) = caught.value.problems
    assert expected in problem, problem
