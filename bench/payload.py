#!/usr/bin/env python3
"""Payload benchmark: bytes per meter reading on the wire, plain and compact, and what compressing costs.

The events are the agent's own: ``make_event`` around ``meter_reading`` of ``measurement`` entries
built as the Modbus driver builds them (point name, quantity, the profile's unit, phase), with
float32 values made the shortest decimal as the driver's codec does (``shortest_float32``). The
messages are built as the MQTT uplink builds them (a batch is ``[e1,e2,...]``) and compressed by
the same function it calls (``agent.contract.compact.compress``).

Readings:
- "SDM630 full": every point of config/profiles/eastron-sdm630.yaml (36 measurements);
- "100 x 20 registers": the side-by-side with ThingsBoard IoT Gateway (issue 17: about 240 B per
  reading): 100 Modbus devices of 20 registers each, the register layout of bench/modbus.py's
  tag profile (14 float32 values with quantity and phase, then 6 uint16), polled in one cycle.

Per reading: single (one message per event, on its device's topic), batched (100 events per
message), and compact single / compact batched (zlib with the contract's preset dictionary, on
{prefix}/{gateway}/deflate). "payload" is the MQTT message's payload; "on the wire" adds the
MQTT 3.1.1 PUBLISH header (fixed header, topic, packet id) and the broker's 4-byte PUBACK (QoS 1),
spread over the events of the message. TCP, IP and TLS overheads are left out (per packet, not
per event). Sizes are averages over 100 readings with fresh random values.

    .venv/bin/python bench/payload.py            # about 10 s
    .venv/bin/python bench/payload.py --quick    # fewer timing rounds

Figures are printed, never asserted (tests/contract/test_compact.py asserts the target).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402 - after the path set-up, so this checkout's agent is imported

from agent.contract.compact import DEFAULT_LEVEL, compact_topic, compress, decompress  # noqa: E402
from agent.contract.data import measurement, meter_reading  # noqa: E402
from agent.contract.events import METER_READING, Reading, batch_topic, make_event, topic_for  # noqa: E402
from agent.contract.floats import shortest_float32  # noqa: E402
from agent.contract.vocabulary import QUANTITY_UNITS  # noqa: E402

GATEWAY = "gw-demo-01"
PREFIX = "ioc/v1"
EPOCH = "5f0c2a9e81d34b17"
DEVICES = 100
BATCH = 100  # events per batch message (uplink.mqtt.batch.max_events' default)
THINGSBOARD = 240  # B per reading, issue 17's side-by-side measurement
START = datetime(2026, 11, 23, 8, 12, 27, 158000, tzinfo=UTC)
SDM630 = ROOT / "config" / "profiles" / "eastron-sdm630.yaml"

# Plausible ranges for a three-phase supply, so the values have the digits a real meter's have.
RANGES: dict[str, tuple[float, float]] = {
    "voltage": (225.0, 240.0),
    "current": (0.0, 80.0),
    "active_power": (0.0, 18.0),
    "apparent_power": (0.0, 18.0),
    "reactive_power": (-5.0, 5.0),
    "power_factor": (-1.0, 1.0),
    "frequency": (49.9, 50.1),
    "active_energy": (0.0, 100000.0),
    "active_energy_export": (0.0, 10000.0),
    "reactive_energy": (0.0, 30000.0),
    "flow": (0.0, 40.0),
    "pressure": (0.0, 10.0),
}
# bench/modbus.py's tag profile: (quantity, phase) of its float32 registers, cycled.
TAG_QUANTITIES = [
    ("voltage", "L1"),
    ("voltage", "L2"),
    ("voltage", "L3"),
    ("current", "L1"),
    ("current", "L2"),
    ("current", "L3"),
    ("active_power", "L1"),
    ("active_power", "L2"),
    ("active_power", "L3"),
    ("reactive_power", None),
    ("apparent_power", None),
    ("power_factor", None),
    ("frequency", None),
    ("active_energy", None),
]


@dataclass(frozen=True)
class Point:
    name: str
    quantity: str
    unit: str
    phase: str | None
    kind: str  # float32, temperature (uint16 x 0.1) or counter (uint16)


def sdm630_points() -> list[Point]:
    """Every point of the shipped SDM630 profile, as the driver reports them."""
    points = yaml.safe_load(SDM630.read_text())["points"]
    return [Point(p["name"], p["quantity"], p["unit"], p.get("phase"), "float32") for p in points]


def tag_points(registers: int = 20) -> list[Point]:
    """bench/modbus.py's tag layout: two thirds float32 (t000...), then uint16 temperature and counter."""
    floats = (2 * registers + 2) // 3
    out = []
    for i in range(registers):
        if i < floats:
            quantity, phase = TAG_QUANTITIES[i % len(TAG_QUANTITIES)]
            out.append(Point(f"t{i:03d}", quantity, QUANTITY_UNITS[quantity], phase, "float32"))
        else:
            quantity = "temperature" if i % 2 == 0 else "counter"
            out.append(Point(f"t{i:03d}", quantity, QUANTITY_UNITS[quantity], None, quantity))
    return out


def value(point: Point, rng: random.Random) -> float | int:
    """A register's value as the Modbus codec hands it on."""
    if point.kind == "counter":
        return rng.randrange(65536)
    if point.kind == "temperature":
        return round(rng.randrange(150, 300) * 0.1, 9)  # the codec's scaling of a uint16
    low, high = RANGES[point.quantity]
    return shortest_float32(struct.unpack(">f", struct.pack(">f", rng.uniform(low, high)))[0])


def reading_event(points: list[Point], device: str, seq: int, at: datetime, rng: random.Random) -> bytes:
    """One full meter reading, as the agent stores and sends it."""
    measurements = [measurement(p.quantity, value(p, rng), p.unit, point=p.name, phase=p.phase) for p in points]
    reading = Reading(METER_READING, meter_reading(measurements), at)
    return make_event(gateway=GATEWAY, device=device, seq=seq, reading=reading, now=at, epoch=EPOCH)


def poll_cycle(points: list[Point], cycle: int, rng: random.Random) -> list[bytes]:
    """One poll of every device: DEVICES events, a few ms apart, seq = cycle + 1."""
    at = START + timedelta(seconds=cycle)
    return [
        reading_event(points, f"meter-{d:03d}", cycle + 1, at + timedelta(milliseconds=3 * d), rng)
        for d in range(DEVICES)
    ]


def publish_bytes(topic: str, payload: int) -> int:
    """An MQTT 3.1.1 QoS 1 PUBLISH (fixed header, topic, packet id, payload) plus its 4-byte PUBACK."""
    remaining = 2 + len(topic.encode()) + 2 + payload
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining + 4


@dataclass
class Row:
    mode: str
    payload: float  # B per reading
    wire: float  # B per reading with MQTT framing


def measure(events: list[bytes], level: int) -> list[Row]:
    """Bytes per reading of ``events`` in each mode."""
    n = len(events)
    topics = [topic_for(PREFIX, GATEWAY, json.loads(e)["device"], METER_READING) for e in events]
    batches = [b"[" + b",".join(events[i : i + BATCH]) + b"]" for i in range(0, n, BATCH)]
    ctopic, btopic = compact_topic(PREFIX, GATEWAY), batch_topic(PREFIX, GATEWAY)
    single = [compress(e, level) for e in events]
    batched = [compress(b, level) for b in batches]
    for plain, packed in ((events, single), (batches, batched)):
        assert all(decompress(p) == e for p, e in zip(packed, plain, strict=True)), "round trip failed"
    return [
        Row(
            "single",
            sum(map(len, events)) / n,
            sum(publish_bytes(t, len(e)) for t, e in zip(topics, events, strict=True)) / n,
        ),
        Row(
            f"batched ({BATCH}/msg)",
            sum(map(len, batches)) / n,
            sum(publish_bytes(btopic, len(b)) for b in batches) / n,
        ),
        Row("compact single", sum(map(len, single)) / n, sum(publish_bytes(ctopic, len(p)) for p in single) / n),
        Row(
            f"compact batched ({BATCH}/msg)",
            sum(map(len, batched)) / n,
            sum(publish_bytes(ctopic, len(p)) for p in batched) / n,
        ),
    ]


def per_event_us(fn: Callable[[], Any], events: int, rounds: int) -> float:
    """Best of ``rounds`` timings of ``fn`` (which handles ``events`` events), in µs per event."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / events * 1e6


def compress_each(events: list[bytes], level: int) -> list[bytes]:
    """Every event compressed alone, as the uplink does with batching off."""
    return [compress(e, level) for e in events]


def print_table(title: str, registers: int, rows: list[Row]) -> None:
    plain = rows[0].payload
    print(f"\n{title}: bytes per reading ({registers} measurements per reading)")
    print(f"  {'mode':<28} {'payload':>9} {'on the wire':>12} {'per register':>13} {'saving':>8} {'vs TB 240 B':>12}")
    for r in rows:
        print(
            f"  {r.mode:<28} {r.payload:>9.0f} {r.wire:>12.0f} {r.payload / registers:>13.1f} "
            f"{plain / r.payload:>7.1f}x {r.payload / THINGSBOARD:>11.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="zlib level of the size tables")
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    print(f"bench/payload.py: {' '.join(sys.argv[1:]) or '(no options)'}; nproc {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"zlib {zlib.ZLIB_RUNTIME_VERSION}; compact: zlib level {args.level}, preset dictionary v1")  # fmt: skip
    rng = random.Random(17)
    sdm = sdm630_points()
    sdm_events = poll_cycle(sdm, 0, rng)
    print_table("SDM630 full reading (100 meters, one poll)", len(sdm), measure(sdm_events, args.level))
    tags = tag_points()
    tag_events = poll_cycle(tags, 0, rng)
    rows = measure(tag_events, args.level)
    print_table("100 Modbus devices x 20 registers (the ThingsBoard side-by-side)", len(tags), rows)
    print(f"  ThingsBoard IoT Gateway: about {THINGSBOARD} B per reading (issue 17); compact batched is "
          f"{rows[3].payload:.0f} B ({'at or below' if rows[3].payload <= THINGSBOARD else 'ABOVE'} it)")  # fmt: skip

    print("\nCPU per event on this machine (best of rounds; a Raspberry Pi 4 core is several times slower)")
    print(f"  {'level':<7} {'single B':>9} {'compress single':>16} {'batched B':>10} {'compress batched':>17}")
    batch = b"[" + b",".join(tag_events) + b"]"
    n = len(tag_events)
    for level in (1, 6, 9):
        single_us = per_event_us(functools.partial(compress_each, tag_events, level), n, rounds)
        batch_us = per_event_us(functools.partial(compress, batch, level), n, rounds)
        single_bytes = sum(map(len, compress_each(tag_events, level))) / n
        print(
            f"  {level:<7} {single_bytes:>9.0f} {single_us:>13.1f} µs "
            f"{len(compress(batch, level)) / n:>10.0f} {batch_us:>14.1f} µs"
        )
    packed = compress(batch, args.level)
    decode_us = per_event_us(functools.partial(decompress, packed), n, rounds)
    print(f"  decoding (consumer side, level {args.level} batch): {decode_us:.1f} µs per event")


if __name__ == "__main__":
    main()
