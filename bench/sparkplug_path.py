"""Sparkplug B through the agent's own path: the store file, the feed's live lane, the edge node,
paho, a real Mosquitto. Part of bench/sparkplug.py (``--path``); needs ``mosquitto`` installed.

- Live latency during a 24 h backlog drain: 86,400 readings of 10 metrics (1 Hz, one device)
  committed to a real buffer file, then the edge node connects; while it drains them as
  historical DDATA, the same device produces live readings (10 a second) and a subscriber in
  this process notes when each live one arrives. Latency: from ``submit`` (before the commit)
  to the subscriber's callback. The drain itself takes about 3 minutes at 10 payloads a second;
  the window measured is its first ``--window`` seconds, when most of the backlog is still ahead.
- CPU for 15,000 metric changes/s: 100 devices of 20 metrics, 750 readings a second, submitted
  to the store (its writer commits them), taken by the edge node from the live lane, encoded,
  published QoS 0 by paho to Mosquitto (a ``mosquitto_sub`` process counts the DDATA that
  arrive). The process's CPU is measured with and without the edge node; the difference is the
  Sparkplug path (store read, parse, encode, paho, acks), the rest is producing and committing.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from payload import Point, sdm630_points, tag_points, value

from agent.contract.data import measurement, meter_reading
from agent.contract.events import METER_READING, Priority, Reading
from agent.errors import DriverWriteError
from agent.store.event_store import EventStore
from agent.store.outbox import Outbox
from agent.uplinks import api
from agent.uplinks.sparkplug.config import SparkplugConfig
from agent.uplinks.sparkplug.proto import payload_class
from agent.uplinks.sparkplug.uplink import SparkplugUplink

GROUP, GATEWAY = "substation-north", "gw-demo-01"


class NoWrites:
    """The core's inbound side (no command is sent in these runs)."""

    async def write(self, device: str, point: str, value: Any, *, origin: str) -> None:
        raise DriverWriteError("no writes in the benchmark", "unavailable")

    async def command(self, command: api.Command) -> api.Reply:
        return api.Reply("unsupported")

    async def request(self, name: str, request_id: str, data: bytes, *, origin: str) -> api.Reply:
        return api.Reply("unsupported")

    def refused(self, code: str, *, origin: str) -> None:
        pass

    async def document(self, kind: str, data: bytes, *, origin: str) -> None:
        pass


@contextmanager
def mosquitto() -> Iterator[int]:
    """A Mosquitto on a free loopback port, stopped afterwards."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest none\nmax_queued_messages 0\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))  # fmt: skip
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def edge_node(port: int, state: Path) -> SparkplugUplink:
    config = SparkplugConfig.model_validate({"enabled": True, "group_id": GROUP,
                                             "servers": [{"host": "127.0.0.1", "port": port}]})  # fmt: skip
    return SparkplugUplink(config, api.UplinkContext("sparkplug", "Sparkplug", GATEWAY, NoWrites(), state))


@asynccontextmanager
async def delivering(store: EventStore, uplink: SparkplugUplink | None) -> AsyncIterator[None]:
    """The store's writer and, if given, the edge node on its feed; both stopped and the store
    closed afterwards."""
    writer = asyncio.create_task(store.run_writer())
    task = asyncio.create_task(uplink.run(store.feeds["sparkplug"])) if uplink is not None else None
    try:
        yield
    finally:
        if task is not None and uplink is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await uplink.goodbye()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.close()


def reading(points: list[Point], at: datetime, rng: random.Random) -> Reading:
    values = [measurement(p.quantity, value(p, rng), p.unit, point=p.name, phase=p.phase) for p in points]
    return Reading(METER_READING, meter_reading(values), at)


def millis(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class LiveArrivals:
    """Subscribes to DDATA; notes when each live (not historical) metric timestamp first arrives."""

    def __init__(self, port: int) -> None:
        self.seen: dict[int, float] = {}
        self.historical = 0
        self._payload = payload_class()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-live")
        self.client.on_connect = lambda c, *_: c.subscribe(f"spBv1.0/{GROUP}/DDATA/#", qos=0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        at = time.monotonic()
        payload = self._payload.FromString(msg.payload)
        for m in payload.metrics:
            if m.is_historical:
                self.historical += 1
            else:
                self.seen.setdefault(m.timestamp, at)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def backlog_latency(port: int, hours: int = 24, window: float = 20.0, rate: float = 10.0) -> None:
    """Live latency while a backlog of ``hours`` of one device (10 metrics, 1 Hz) drains."""
    rng = random.Random(5)
    points = sdm630_points()[:10]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "buffer.sparkplug.db"
        store = EventStore({"sparkplug": lambda: Outbox(path, 4 << 30)}, gateway=GATEWAY)
        await store.open()
        events = hours * 3600
        start = datetime.now(UTC) - timedelta(seconds=events)
        began = time.perf_counter()
        for i in range(events):
            store.submit("meter-001", reading(points, start + timedelta(seconds=i), rng), Priority.TELEMETRY)
            if i % 5000 == 4999:
                await store.flush()
        await store.flush()
        print(f"path/backlog: {events:,} readings of {len(points)} metrics committed to {path.name} in "
              f"{time.perf_counter() - began:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")  # fmt: skip
        arrivals = LiveArrivals(port)
        uplink = edge_node(port, Path(tmp))
        connected_at = time.monotonic()
        sent: dict[int, float] = {}
        try:
            async with delivering(store, uplink):
                while not uplink.status.connected:
                    await asyncio.sleep(0.01)
                online = time.monotonic() - connected_at
                end = time.monotonic() + window
                tick = 1.0 / rate
                next_at = time.monotonic()
                while time.monotonic() < end:
                    at = datetime.now(UTC)
                    if millis(at) not in sent:
                        sent[millis(at)] = time.monotonic()
                        store.submit("meter-001", reading(points, at, rng), Priority.TELEMETRY)
                    next_at += tick
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                await asyncio.sleep(2.0)  # the last live ones arrive
                left = (await store.feeds["sparkplug"].stats()).rows
        finally:
            arrivals.close()
        got = sorted(arrivals.seen[ts] - t for ts, t in sent.items() if ts in arrivals.seen)
        missing = len(sent) - len(got)
        p95 = got[min(len(got) - 1, int(0.95 * len(got)))] if got else float("nan")
        print(f"path/backlog: edge node online {online:.2f} s after start; {len(sent)} live readings in the first "
              f"{window:.0f} s of the drain: latency p50 {statistics.median(got):.3f} s, p95 {p95:.3f} s, max "
              f"{got[-1]:.3f} s ({missing} not seen); {arrivals.historical:,} historical metrics arrived meanwhile, "
              f"{left:,} rows still buffered (the drain goes on for about "
              f"{events * len(points) / 5000:.0f} s)")  # fmt: skip


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by Python thread name (others by id)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), f"thread {task.name}")
        name = name.split("_")[0] if name.startswith("edge-agent-") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def _produce(store: EventStore, points: list[Point], seconds: float, rate: float, rng: random.Random) -> int:
    """``rate`` readings a second, the 100 devices in turn, in 10 slices a second."""
    sent, per_slice = 0, round(rate / 10)
    next_at = time.monotonic()
    end = next_at + seconds
    while time.monotonic() < end:
        at = datetime.now(UTC)
        for _ in range(per_slice):
            store.submit(f"meter-{sent % 100:03d}", reading(points, at, rng), Priority.TELEMETRY)
            sent += 1
        next_at += 0.1
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def cpu_run(port: int | None, seconds: float, changes: int = 15000, registers: int = 20) -> tuple[float, int]:
    """Process CPU % of one core while ``changes`` metric changes a second go through (with the
    edge node when ``port`` is given); returns it and the readings produced."""
    rng = random.Random(6)
    points = tag_points(registers)
    rate = changes / registers
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore({"sparkplug": lambda: Outbox(Path(tmp) / "buffer.db", 4 << 30)}, gateway=GATEWAY)
        await store.open()
        uplink = edge_node(port, Path(tmp)) if port is not None else None
        async with delivering(store, uplink):
            await _produce(store, points, 3.0, rate, rng)  # warm-up: births, the first commits
            before, threads, wall = time.process_time(), thread_cpu(), time.monotonic()
            produced = await _produce(store, points, seconds, rate, rng)
            cpu, wall = time.process_time() - before, time.monotonic() - wall
            after = thread_cpu()
        share = {name: (after[name] - threads.get(name, 0.0)) / wall * 100 for name in after}
        busy = ", ".join(f"{n} {p:.0f} %" for n, p in sorted(share.items(), key=lambda x: -x[1]) if p >= 1)
        label = "with the edge node" if port is not None else "producer and store only"
        print(f"path/cpu: {label}: {produced * registers / wall:,.0f} metric changes/s for {wall:.0f} s, process CPU "
              f"{cpu / wall * 100:.0f} % of one core ({busy})")  # fmt: skip
        return cpu / wall * 100, produced


COUNTER = """
import sys, paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
count = 0
def on_message(*_):
    global count
    count += 1
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-count")
c.on_connect = lambda c, *_: (c.subscribe(sys.argv[2], qos=0), print("ready", flush=True))
c.on_message = on_message
c.connect("127.0.0.1", int(sys.argv[1]))
c.loop_start()
sys.stdin.read()
print(count, flush=True)
"""


def cpu_per_change(port: int, seconds: float = 10.0) -> None:
    """15,000 changes/s with and without the edge node; the difference is the Sparkplug path."""
    # The subscriber counting what arrives runs in a process of its own, out of the figures.
    counter = subprocess.Popen([sys.executable, "-c", COUNTER, str(port), f"spBv1.0/{GROUP}/DDATA/#"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    if counter.stdout is None or counter.stdout.readline().strip() != "ready":
        raise RuntimeError("the counting subscriber did not connect")
    try:
        base, _ = asyncio.run(cpu_run(None, seconds))
        full, produced = asyncio.run(cpu_run(port, seconds))
    finally:
        out, _ = counter.communicate("", timeout=10)
    print(f"path/cpu: the Sparkplug path (live lane read, parse, encode, paho publish to Mosquitto, acks) takes "
          f"{full - base:.0f} % of one core for 15,000 changes/s; {int(out.strip() or 0):,} DDATA reached a "
          f"subscriber (warm-up included; {produced:,} readings in the measured window)")  # fmt: skip
