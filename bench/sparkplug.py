#!/usr/bin/env python3
"""Sparkplug B benchmark: bytes per reading against the JSON uplink, CPU per metric change, the
backlog's read-ahead and drain, a rebirth of 100 devices; and, through the store, paho and a real
Mosquitto, live latency during a 24 h backlog drain and CPU for 15,000 changes/s.

The first four parts (``bytes``, ``cpu``, ``rebirth``, ``backlog``) run in this process through
the edge node's own code (agent/uplinks/sparkplug: ``parse`` of the stored CloudEvent,
``Model.learn``, ``Session`` building the payloads with the pinned .proto) into a connection
stand-in that only counts bytes: no broker, no socket. The last two (``latency``, ``path-cpu``)
are in bench/sparkplug_path.py: the agent's store file, the feed's live lane, the edge node,
paho and a Mosquitto this script starts (``mosquitto`` must be installed).

- Bytes: 100 full SDM630 readings (36 measurements, the readings of bench/payload.py) as the JSON
  uplink sends each (one event per message, QoS 1: MQTT header and the broker's PUBACK counted)
  and as DDATA with aliases (QoS 0: MQTT header, no PUBACK); the DBIRTH is sent once and left out.
  Report by exception: readings where 4 of the 36 values moved (a deadband's output).
- CPU: 150,000 metric changes (100 devices x 20 registers, bench/payload.py's tag layout) from
  stored event to DDATA bytes; the share of one core that 15,000 changes/s would take.
- Backlog: 24 h of one device with 10 metrics at 1 Hz (86,400 events): how long parsing and
  queueing it takes, the memory of the most the edge node reads ahead (QUEUE_CAP metrics), then
  the drain: payloads of <= 500 metrics at 10 a second.
- Rebirth: NBIRTH and 100 DBIRTHs of 36 metrics each.
- Latency, path CPU: see bench/sparkplug_path.py.

    .venv/bin/python bench/sparkplug.py                                  # all, about 80 s
    .venv/bin/python bench/sparkplug.py --parts bytes,cpu,rebirth,backlog  # about 20 s, no broker
    .venv/bin/python bench/sparkplug.py --parts latency --window 20      # about 35 s
    .venv/bin/python bench/sparkplug.py --parts path-cpu                 # about 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sparkplug_path  # noqa: E402
from payload import START, Point, reading_event, sdm630_points, tag_points  # noqa: E402

from agent.uplinks.sparkplug.forward import (  # noqa: E402
    MAX_METRICS,
    PAYLOADS_PER_SECOND,
    QUEUE_CAP,
    Forward,
    queue_backlog,
)
from agent.uplinks.sparkplug.metrics import parse  # noqa: E402
from agent.uplinks.sparkplug.model import Model  # noqa: E402
from agent.uplinks.sparkplug.node import Session, Topics  # noqa: E402

GROUP, NODE = "substation-north", "gw-demo-01"


class Counting:
    """Stands in for the MQTT connection: counts what would be published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.sent.append((topic, len(payload)))


def qos0_wire(topic: str, payload: int) -> int:
    """An MQTT 3.1.1 QoS 0 PUBLISH: fixed header, topic, payload (no packet id, no PUBACK)."""
    remaining = 2 + len(topic.encode()) + payload
    return 1 + (1 if remaining < 128 else 2 if remaining < 16384 else 3) + remaining


def qos1_wire(topic: str, payload: int) -> int:
    """An MQTT 3.1.1 QoS 1 PUBLISH plus its 4-byte PUBACK."""
    remaining = 2 + len(topic.encode()) + 2 + payload
    return 1 + (1 if remaining < 128 else 2 if remaining < 16384 else 3) + remaining + 4


def session() -> tuple[Session, Counting, Model]:
    conn, model = Counting(), Model()
    s = Session(conn, Topics(GROUP, NODE), model, 0, aliases=True)  # type: ignore[arg-type]
    s.birth_all()
    conn.sent.clear()
    return s, conn, model


def carry(s: Session, model: Model, event: bytes) -> None:
    """What the uplink does with one live row (SparkplugUplink._carry without the feed)."""
    parsed = parse(event)
    assert parsed is not None
    device = model.device(parsed.device)
    values, new = model.learn(device, parsed.values)
    if new or not device.born:
        s.dbirth(device, fresh=new)
    else:
        s.ddata(device, values)


def rbe_event(points: list[Point], moved: int, seq: int, rng: random.Random) -> bytes:
    """A reading of only ``moved`` of the points (what a deadband lets through)."""
    return reading_event(rng.sample(points, moved), "meter-001", seq, START + timedelta(seconds=seq), rng)


def bytes_per_reading() -> None:
    rng = random.Random(1)
    points = sdm630_points()
    s, conn, model = session()
    json_topic = f"ioc/v1/{NODE}/meter-001/city.meter.reading"
    for label, events in (
        (f"full SDM630 ({len(points)} values)",
         [reading_event(points, "meter-001", i + 1, START + timedelta(seconds=i), rng) for i in range(101)]),
        ("report by exception (4 values moved)", [rbe_event(points, 4, i + 1, rng) for i in range(101)]),
    ):  # fmt: skip
        if not model.devices:
            carry(s, model, reading_event(points, "meter-001", 0, START, rng))  # the DBIRTH, once
        conn.sent.clear()
        for e in events[1:]:
            carry(s, model, e)
        values = sum(len(p.values) for p in map(parse, events[1:]) if p is not None)
        n = len(events) - 1
        j_payload = sum(len(e) for e in events[1:]) / n
        j_wire = sum(qos1_wire(json_topic, len(e)) for e in events[1:]) / n
        s_payload = sum(size for _, size in conn.sent) / n
        s_wire = sum(qos0_wire(t, size) for t, size in conn.sent) / n
        per_value = values / n
        print(f"{label}: JSON {j_payload:,.0f} B payload / {j_wire:,.0f} B on the wire per reading; Sparkplug DDATA "
              f"{s_payload:,.0f} B / {s_wire:,.0f} B ({s_payload / per_value:.1f} B per value, "
              f"{j_payload / s_payload:.1f}x smaller)")  # fmt: skip


def cpu_per_change() -> None:
    rng = random.Random(2)
    points = tag_points(20)
    s, _conn, model = session()
    rounds = 75
    events = [reading_event(points, f"meter-{d:03d}", r + 1, START + timedelta(seconds=r), rng)
              for r in range(rounds) for d in range(100)]  # fmt: skip
    for e in events[:100]:
        carry(s, model, e)  # births
    changes = len(events[100:]) * len(points)
    started = time.process_time()
    for e in events[100:]:
        carry(s, model, e)
    cpu = time.process_time() - started
    print(f"CPU: {changes:,} metric changes in {cpu:.2f} s CPU = {cpu / changes * 1e6:.1f} us each; "
          f"15,000 changes/s would take {cpu / changes * 15000 * 100:.0f} % of one core")  # fmt: skip


def read_ahead_into(forward: Forward, model: Model, events: list[bytes]) -> None:
    """What the uplink does with backlog rows (SparkplugUplink._carry's backlog path)."""
    for row_id, e in enumerate(events, 1):
        if queue_backlog(model, forward, e, row_id):
            continue
        parsed = parse(e)
        assert parsed is not None
        device = model.device(parsed.device)
        values, _ = model.learn(device, parsed.values, historical=True)
        forward.add(device.id, values, row_id)


def backlog() -> None:
    rng = random.Random(3)
    points = sdm630_points()[:10]
    hours = 24
    events = [reading_event(points, "meter-001", i + 1, START + timedelta(seconds=i), rng) for i in range(hours * 3600)]
    s, conn, model = session()
    carry(s, model, events[-1])  # the device born with its current values
    forward = Forward(keepalive=30.0)
    started = time.perf_counter()
    read_ahead_into(forward, model, events)
    read_ahead = time.perf_counter() - started
    # Memory of the read-ahead the edge node holds at most (QUEUE_CAP metrics; tracemalloc slows the
    # run several times, so only that much is traced).
    tracemalloc.start()
    read_ahead_into(Forward(keepalive=30.0), model, events[: QUEUE_CAP // len(points)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    metrics = forward.queued
    conn.sent.clear()
    started = time.process_time()
    now = 0.0
    while forward.history:
        device_id, values, _ids = forward.take(now)
        device = model.device(device_id)
        s.ddata(device, model.typed(device, values), historical=True)
        now += 1.0 / PAYLOADS_PER_SECOND
    encode = time.process_time() - started
    payloads = len(conn.sent)
    print(f"backlog: {len(events):,} events ({metrics:,} metrics, {hours} h of 10 metrics at 1 Hz) parsed and queued "
          f"in {read_ahead:.1f} s (spread over the drain: at most {QUEUE_CAP:,} metrics are read ahead, about "
          f"{peak / 2**20:.1f} MiB); drained as {payloads:,} DDATA of <= {MAX_METRICS} metrics at "
          f"{PAYLOADS_PER_SECOND}/s = {payloads / PAYLOADS_PER_SECOND:.0f} s ({encode:.1f} s CPU to encode); "
          f"live rows never wait for it (the feed's live lane: see --parts latency)")  # fmt: skip


def rebirth() -> None:
    rng = random.Random(4)
    points = sdm630_points()
    s, conn, model = session()
    for d in range(100):
        carry(s, model, reading_event(points, f"meter-{d:03d}", 1, START, rng))
    conn.sent.clear()
    started = time.perf_counter()
    s.birth_all()
    took = time.perf_counter() - started
    size = sum(n for _, n in conn.sent)
    print(f"rebirth: NBIRTH + {len(conn.sent) - 1} DBIRTHs of {len(points)} metrics built in {took * 1000:.0f} ms "
          f"({size / 1024:.0f} KiB)")  # fmt: skip


PARTS = {"bytes": bytes_per_reading, "cpu": cpu_per_change, "rebirth": rebirth, "backlog": backlog}
PATH_PARTS = ("latency", "path-cpu")  # bench/sparkplug_path.py: through the store, paho and Mosquitto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts",
        default=",".join([*PARTS, *PATH_PARTS]),
        help=f"comma-separated, of {', '.join([*PARTS, *PATH_PARTS])} (default: all)",
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds of the drain the latency is measured in")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS and p not in PATH_PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}")
    print(f"# bench/sparkplug.py on {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    for name, part in PARTS.items():
        if name in parts:
            part()
    if "latency" in parts:
        with sparkplug_path.mosquitto() as port:
            asyncio.run(sparkplug_path.backlog_latency(port, window=args.window))
    if "path-cpu" in parts:
        with sparkplug_path.mosquitto() as port:
            sparkplug_path.cpu_per_change(port)


if __name__ == "__main__":
    main()
