#!/usr/bin/env python3
"""End-to-end pipeline benchmark: virtual devices -> agent (SQLite outbox) -> MQTT QoS 1 -> subscriber.

Everything is real: a Mosquitto broker on a free loopback port, the agent as a subprocess
(``python -m agent run -c site.yaml``) and an independent paho subscriber in its own process
that logs, per message, its receive wall time and the event's gateway/device/seq/time/type.
The agent's buffer file is read read-only (``mode=ro``) for its counters; its CPU and RSS come
from psutil. This prints figures; it is not a test. See bench/README.md for what they mean.

Scenario 0 measures a bare paho-mqtt QoS 1 publisher (its own process) on the same broker first;
agent throughput (scenarios 1 and 5) is also printed as a ratio to it (``xpaho``), because the
machine is shared and absolute figures vary by up to 4x between runs.

    .venv/bin/python bench/pipeline.py            # full run, about 8 minutes
    .venv/bin/python bench/pipeline.py --quick    # everything, smaller, about 100-120 s
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOPIC_PREFIX = "ioc/v1"
INTERVAL_MS = 10  # every virtual device polls every 10 ms; the rate is set with devices x burst
LIVE_LAG = 0.25  # s: an event received within this of its `time` counts as "live"

_children: list[subprocess.Popen[bytes]] = []


# ---------------------------------------------------------------------------------------------
# plumbing: processes, ports, the buffer file
# ---------------------------------------------------------------------------------------------
def exit_cleanly(kill: Callable[[], None] | None = None) -> None:
    """Kill the child processes at exit, and exit (so that this runs) on SIGTERM and SIGHUP."""
    atexit.register(kill or _kill_children)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def _kill_children() -> None:
    for proc in _children:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)


def _spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, **kw)
    _children.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_quiet(path: Path, quiet: float, timeout: float) -> None:
    """Wait until ``path`` has stopped growing for ``quiet`` seconds (a subscriber's log has settled)."""
    deadline = time.monotonic() + timeout
    last, since = path.stat().st_size, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = path.stat().st_size
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        sys.exit("bench: mosquitto is not installed (apt-get install mosquitto, or ./dev bench)")
    return found


class Mosquitto:
    """A broker on a fixed loopback port that can be stopped and started again on that port.

    ``persistent`` keeps the subscriber's session (its subscription and queued QoS 1 messages)
    across a graceful restart; it is saved only at shutdown (autosave_interval is far off).
    """

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "log_dest none",
        ]
        if persistent:
            lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 86400"]
        else:
            lines += ["persistence false"]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = _spawn(
            [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def accepting() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}")
            return False

        wait_for(accepting, 10, "mosquitto to accept connections", 0.01)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, 10)
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


def read_counters(db: Path) -> dict[str, int] | None:
    """The outbox counters, read-only; ``rows`` = accepted - delivered - dropped (exact)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            counters = dict(con.execute("SELECT name, value FROM counters"))
        finally:
            con.close()
    except sqlite3.Error:
        return None
    if "accepted" not in counters:
        return None
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped_"))  # every reason, new ones too
    counters["rows"] = counters["accepted"] - counters["delivered"] - dropped
    return counters


def read_final(db: Path) -> tuple[dict[str, int], set[tuple[str, int]], int]:
    """After the agent stopped: last seq per device, the (device, seq) still buffered, count(*)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        seqs = dict(con.execute("SELECT device, seq FROM sequences"))
        left = {(d, s) for d, s in con.execute("SELECT device, seq FROM outbox")}
        rows = int(con.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        con.close()
    return seqs, left, rows


class Proc:
    """CPU seconds (user+sys, all threads) and RSS of a process, via psutil."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self.p = psutil.Process(pid) if pid is not None else None

    def cpu(self) -> float:
        if self.p is None:
            return 0.0
        try:
            t = self.p.cpu_times()
        except Exception:
            return 0.0
        return float(t.user + t.system)

    def rss(self) -> int:
        try:
            return int(self.p.memory_info().rss) if self.p is not None else 0
        except Exception:
            return 0

    def hwm(self) -> int:
        """Peak RSS of the process's life (VmHWM)."""
        if self.p is None:
            return 0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


def mb(n: float) -> float:
    return n / 1e6


# ---------------------------------------------------------------------------------------------
# the subscriber: its own process, logging one line per message
# ---------------------------------------------------------------------------------------------
def run_event_subscriber(
    port: int, out: Path, client_id: str, ready: Path, line: Callable[[float, dict[str, Any], Any], str]
) -> None:
    """A subscriber process (the benches' ``--subscriber``): ``line(received, event, msg)`` per event.

    Persistent session, QoS 1, everything under the topic prefix; a single event or a batch
    (CloudEvents JSON batch format) gives one line per event, all with the message's receive
    time; the retained availability and anything not JSON is skipped. Writes ``ready`` once
    subscribed; SIGTERM disconnects.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    lines: deque[str] = deque()  # appended by paho's thread, popped by the writer: thread-safe
    stop = threading.Event()

    def writer() -> None:
        with out.open("a", encoding="utf-8") as f:
            while True:
                done = stop.wait(0.05)
                batch = [lines.popleft() for _ in range(len(lines))]
                if batch:
                    f.write("".join(batch))
                    f.flush()
                if done:
                    return

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            c.subscribe(f"{TOPIC_PREFIX}/#", qos=1)

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, _r: Any, _p: Any) -> None:
        ready.write_text("subscribed\n")

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        if msg.payload[:1] not in (b"{", b"["):
            return  # retained online/offline availability
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        events = doc if isinstance(doc, list) else [doc]
        lines.append("".join(line(now, e, msg) for e in events if isinstance(e, dict)))

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.reconnect_delay_set(0.05, 0.25)  # type: ignore[arg-type] # floats work
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect_async("127.0.0.1", port, keepalive=30)
    try:
        client.loop_forever(retry_first_connection=True)
    finally:
        stop.set()
        t.join(2)


def subscriber_main(port: int, out: Path, client_id: str, ready: Path) -> None:
    """Entry point of ``pipeline.py --subscriber``: subscribe to everything, log every event."""

    def line(now: float, e: dict[str, Any], _msg: Any) -> str:
        return f"{now:.6f}\t{e.get('gateway')}\t{e.get('device')}\t{e.get('seq')}\t{e.get('time')}\t{e.get('type')}\n"

    run_event_subscriber(port, out, client_id, ready, line)


# ---------------------------------------------------------------------------------------------
# scenario 0: the bare paho-mqtt yardstick, its own process
# ---------------------------------------------------------------------------------------------
BASELINE_TOPIC = "bench-paho/s0/m00/reading"  # outside the subscriber's ioc/v1/#: no fan-out
BASELINE_WINDOW = 100  # QoS 1 messages in flight, as the agent's default uplink.mqtt.max_inflight
BASELINE_SMALL = 300  # bytes
BASELINE_WARMUP = 0.5  # s before the measured window (connection, first round trips)


def paho_baseline_main(port: int, size: int, seconds: float, window: int) -> None:
    """Entry point of ``pipeline.py --paho-baseline``: one paho client, one thread, QoS 1.

    Keeps ``window`` messages in flight: publish until ``window`` are unacknowledged, then
    ``client.loop()`` (select, ``loop_read`` -> PUBACKs -> on_publish, ``loop_write``,
    ``loop_misc``). Outside a callback paho writes each publish at once. Prints one JSON
    line: acked messages and the process's own CPU (user+sys) over the measured window.
    """
    import resource

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    acked = 0
    connected = False

    def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        nonlocal connected
        if reason.is_failure:
            raise RuntimeError(f"broker refused the connection: {reason}")
        connected = True

    def on_publish(_c: paho.Client, _u: Any, _mid: int, _r: Any, _p: Any) -> None:
        nonlocal acked
        acked += 1

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{os.getpid()}", clean_session=True)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=30)
    deadline = time.monotonic() + 10
    while not connected:
        if time.monotonic() > deadline:
            raise RuntimeError("no CONNACK within 10 s")
        client.loop(0.1)
    payload = bytes(size)  # content is irrelevant to the broker (no subscriber for this topic)
    published = 0
    t_measure = time.monotonic() + BASELINE_WARMUP
    t_end = t_measure + seconds
    a0, c0, t0 = 0, 0.0, 0.0
    measuring = False
    while True:
        now = time.monotonic()
        if not measuring and now >= t_measure:
            a0, c0, t0, measuring = acked, cpu(), now, True
        if now >= t_end:
            break
        while published - acked < window:
            info = client.publish(BASELINE_TOPIC, payload, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
            published += 1
        rc = client.loop(1.0)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"loop failed: {paho.error_string(rc)}")
    a1, c1, t1 = acked, cpu(), time.monotonic()
    client.disconnect()
    print(json.dumps({"size": size, "acked": a1 - a0, "seconds": t1 - t0, "cpu": c1 - c0}), flush=True)


def meter_event_size() -> int:
    """Bytes of one of the agent's virtual meter events, built with the agent's own code."""
    try:
        import asyncio

        sys.path.insert(0, str(ROOT))
        from agent.contract.events import make_event
        from agent.devices.api import DriverContext
        from drivers.virtual.config import VirtualConfig
        from drivers.virtual.driver import VirtualDriver

        class _Ctx(DriverContext):
            device_id = "m00"

            def poll_ok(self) -> None:
                pass

            def poll_failed(self, reason: str) -> None:
                pass

        cfg = VirtualConfig.model_validate(
            {"id": "m00", "driver": "virtual", "kind": "meter", "interval": f"{INTERVAL_MS}ms", "seed": 0}
        )
        reading = asyncio.run(VirtualDriver(cfg, _Ctx()).read())[0]
        return len(
            make_event(gateway="s1-10000", device="m00", seq=123_456, reading=reading, now=datetime.now().astimezone())
        )
    except Exception:  # the yardstick must not depend on agent internals staying put
        return 560


def scenario_baseline(broker: Mosquitto, size: int, seconds: float) -> dict[str, Any]:
    mosq = Proc(broker.pid)
    m0, w0 = mosq.cpu(), time.monotonic()
    proc = _spawn(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--paho-baseline",
            str(broker.port),
            str(size),
            str(seconds),
            str(BASELINE_WINDOW),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=seconds + 30)
    m1, w1 = mosq.cpu(), time.monotonic()
    if proc.returncode != 0:
        raise RuntimeError(f"paho baseline exited with {proc.returncode}")
    r: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    r["rate"] = r["acked"] / r["seconds"]
    r["cpu_us"] = r["cpu"] / max(1, r["acked"]) * 1e6
    r["cpu_pct"] = r["cpu"] / r["seconds"] * 100
    r["mosq_cpu"] = (m1 - m0) / (w1 - w0) * 100  # over the whole child (connect included)
    return r


def ratio(rate: float | None, base: float | None) -> str:
    """``rate`` as a multiple of the bare paho baseline, e.g. ``0.45x``; ``-`` without one."""
    if rate is None or not base or rate != rate:
        return "-"
    return f"{rate / base:.2f}x"


@dataclass
class Rec:
    recv: float
    device: str
    seq: int
    time: float  # the event's `time`, epoch seconds (ms resolution)
    type: str


class Subscriber:
    """The parent's handle on a subscriber process and its log."""

    def __init__(self, workdir: Path, port: int, name: str) -> None:
        self.out = workdir / f"sub-{name}.log"
        self.ready = workdir / f"sub-{name}.ready"
        self.out.touch()
        self.proc = _spawn(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--subscriber",
                str(port),
                str(self.out),
                f"bench-sub-{name}-{os.getpid()}",
                str(self.ready),
            ],
            cwd=ROOT,
        )
        wait_for(self.ready.exists, 15, "the subscriber to subscribe")
        self.offset = 0
        self.cpu = Proc(self.proc.pid)

    def settle(self, quiet: float = 0.4, timeout: float = 15.0) -> None:
        """Wait until the log has stopped growing for ``quiet`` seconds."""
        wait_quiet(self.out, quiet, timeout)

    def take(self, gateway: str) -> list[Rec]:
        """Every event logged since the last take, of one gateway (others are discarded)."""
        with self.out.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        recs: list[Rec] = []
        parse = _parse_time
        for line in data[:end].decode().splitlines():
            recv, gw, dev, seq, t, typ = line.split("\t")
            if gw == gateway:
                recs.append(Rec(float(recv), dev, int(seq), parse(t), typ))
        return recs

    def close(self) -> None:
        _stop(self.proc, signal.SIGTERM, 5)


_time_cache: dict[str, float] = {}


def _parse_time(text: str) -> float:
    # Many events share a millisecond; cache the string -> epoch conversion.
    value = _time_cache.get(text)
    if value is None:
        if len(_time_cache) > 200_000:
            _time_cache.clear()
        value = _time_cache[text] = datetime.fromisoformat(text).timestamp()
    return value


# ---------------------------------------------------------------------------------------------
# the agent under test
# ---------------------------------------------------------------------------------------------
def site_yaml(
    *,
    gateway: str,
    port: int,
    db: Path,
    devices: int,
    burst: int,
    max_bytes: str = "1GiB",
    max_inflight: int | None = None,
    batch: int | None = None,
) -> str:
    """The agent's config; ``batch`` = N turns on ``uplink.mqtt.batch`` with ``max_events: N``."""
    inflight = f", max_inflight: {max_inflight}" if max_inflight else ""
    if batch:
        inflight += f", batch: {{enabled: true, max_events: {batch}}}"
    head = (
        f"gateway: {{id: {gateway}, site: bench, health_interval: 60s}}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: {TOPIC_PREFIX},"
        f" reconnect_min: 200ms, reconnect_max: 1s{inflight}}}\n"
        f"buffer: {{path: {db}, max_bytes: {max_bytes}}}\n"
    )
    if devices == 0:
        return head + "devices: []\n"
    body = "".join(
        f"  - {{id: m{i:02d}, driver: virtual, kind: meter, interval: {INTERVAL_MS}ms, burst: {burst}, seed: {i}}}\n"
        for i in range(devices)
    )
    return head + "devices:\n" + body


class Agent:
    """``python -m agent run -c site.yaml`` as a subprocess, with its own buffer file."""

    def __init__(
        self,
        workdir: Path,
        gateway: str,
        port: int,
        devices: int,
        burst: int,
        max_bytes: str = "1GiB",
        max_inflight: int | None = None,
        batch: int | None = None,
    ) -> None:
        self.dir = workdir / gateway
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gateway, self.port, self.max_bytes = gateway, port, max_bytes
        self.max_inflight, self.batch = max_inflight, batch
        self.db = self.dir / "buffer.db"
        self.config = self.dir / "site.yaml"
        self.log = self.dir / "agent.log"
        self.config.write_text(
            site_yaml(
                gateway=gateway,
                port=port,
                db=self.db,
                devices=devices,
                burst=burst,
                max_bytes=max_bytes,
                max_inflight=max_inflight,
                batch=batch,
            )
        )
        with self.log.open("ab") as log:
            self.proc = _spawn(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.ps = Proc(self.proc.pid)
        self.started = time.time()

    def counters(self) -> dict[str, int] | None:
        return read_counters(self.db)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, key: str | None = "delivered", timeout: float = 30) -> None:
        """Until ``key`` counter is positive (with None: until the buffer file is readable)."""

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.tail()}")
            c = self.counters()
            return c is not None and (key is None or c[key] > 0)

        wait_for(ready, timeout, f"agent {self.gateway} to start ({key} > 0)", 0.05)

    def stop_producing(self) -> None:
        """Reload a config without devices (SIGHUP): production stops, delivery goes on."""
        self.config.write_text(
            site_yaml(
                gateway=self.gateway,
                port=self.port,
                db=self.db,
                devices=0,
                burst=1,
                max_bytes=self.max_bytes,
                max_inflight=self.max_inflight,
                batch=self.batch,
            )
        )
        self.proc.send_signal(signal.SIGHUP)

    def drain(self, timeout: float) -> float | None:
        """Wait until the buffer is empty; seconds it took, or None if it did not empty in time."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            c = self.counters()
            if c is not None and c["rows"] == 0:
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def stop(self, timeout: float = 8.0) -> None:
        _stop(self.proc, signal.SIGTERM, timeout)

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def problems(self) -> list[str]:
        """WARNING/ERROR lines of the agent's log (uplink up/down notices excluded)."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                if ("WARNING" in line or "ERROR" in line or "Traceback" in line) and "uplink" not in line:
                    out.append(line)
        return out


@dataclass
class Sampler:
    """Samples RSS (and optionally the backlog) of the agent in a thread."""

    agent: Agent
    every: float = 0.5
    samples: list[tuple[float, int, int | None]] = field(default_factory=list)  # (t, rss, rows)
    with_rows: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        def run() -> None:
            while not self._stop.is_set():
                c = self.agent.counters() if self.with_rows else None
                self.samples.append((time.time(), self.agent.ps.rss(), c["rows"] if c else None))
                self._stop.wait(self.every)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def rss_peak(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    def rows_slope(self) -> float:
        """Backlog growth in events/s (least squares over the samples)."""
        pts = [(t, r) for t, _, r in self.samples if r is not None]
        if len(pts) < 3:
            return 0.0
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        mr = sum(r for _, r in pts) / n
        den = sum((t - mt) ** 2 for t, _ in pts)
        return sum((t - mt) * (r - mr) for t, r in pts) / den if den else 0.0


def loss_report(recs: list[Rec], db: Path) -> dict[str, int]:
    """Lost = seqs the agent gave out, never received, and no longer in its buffer."""
    seqs, left, rows = read_final(db)
    got: dict[str, set[int]] = {}
    for r in recs:
        got.setdefault(r.device, set()).add(r.seq)
    unique = sum(len(s) for s in got.values())
    lost = 0
    for device, last in seqs.items():
        have = got.get(device, set())
        lost += sum(1 for s in range(1, last + 1) if s not in have and (device, s) not in left)
    return {"received": len(recs), "unique": unique, "duplicates": len(recs) - unique, "lost": lost, "undrained": rows}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# ---------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    rates: list[int]
    window: float  # scenario 1: measured seconds per step
    warmup: float
    drain: float  # most seconds to wait for the buffer to empty once production stops
    latency_window: float
    outage: float
    backlog_target: int
    backlog_cap: float  # most seconds for the fill run of scenario 4
    overload_s: float  # seconds of the overload run of scenario 4
    baseline_s: float  # scenario 0: measured seconds per payload size
    batch_rates: list[int]  # scenario 5: offered rates, batched uplink


FULL = Sizes(
    rates=[1000, 2000, 3000, 5000, 10000, 20000],
    window=10,
    warmup=2,
    drain=8,
    latency_window=20,
    outage=60,
    backlog_target=1_000_000,
    backlog_cap=150,
    overload_s=15,
    baseline_s=5,
    batch_rates=[5000, 10000, 20000, 40000],
)
QUICK = Sizes(
    rates=[1000, 10000],
    window=3,
    warmup=1,
    drain=4,
    latency_window=5,
    outage=15,
    backlog_target=200_000,
    backlog_cap=35,
    overload_s=5,
    baseline_s=3,
    batch_rates=[10000, 40000],
)
BATCH_EVENTS = 100  # scenario 5: uplink.mqtt.batch.max_events
FILL = (10, 8)  # scenario 4 fill run: 10 meters x burst 8 / 10 ms = 8,000 ev/s, below the ceiling
OVERLOAD = (4, 500)  # scenario 4 overload run: 4 meters x burst 500 / 10 ms = 200,000 ev/s
DEVICES = 10  # scenarios 1-3: ten meters at 10 ms; burst = rate / 1000


def scenario_throughput(
    work: Path,
    broker: Mosquitto,
    sub: Subscriber,
    rate: int,
    sz: Sizes,
    max_inflight: int | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """Scenario 1 (one MQTT message per event) and, with ``batch``, scenario 5 (batches)."""
    burst = max(1, rate // (DEVICES * 1000 // INTERVAL_MS))
    offered = DEVICES * burst * 1000 / INTERVAL_MS
    gw = (f"s5-{rate}-b{batch}" if batch else f"s1-{rate}") + (f"-w{max_inflight}" if max_inflight else "")
    agent = Agent(work, gw, broker.port, DEVICES, burst, max_inflight=max_inflight, batch=batch)
    mosq, subp = Proc(broker.pid), sub.cpu
    try:
        agent.wait_ready()
        time.sleep(sz.warmup)
        with Sampler(agent, with_rows=True, every=0.5) as smp:
            c0, t0 = agent.counters(), time.time()
            cpu0, m0, s0 = agent.ps.cpu(), mosq.cpu(), subp.cpu()
            time.sleep(sz.window)
            c1, t1 = agent.counters(), time.time()
            cpu1, m1, s1 = agent.ps.cpu(), mosq.cpu(), subp.cpu()
        rss_end = agent.ps.rss()
        rss_hwm = agent.ps.hwm()
        if c0 is None or c1 is None:
            raise RuntimeError(f"cannot read {agent.db}")
        agent.stop_producing()
        drained = agent.drain(sz.drain)
    finally:
        agent.stop()
    sub.settle()
    recs = sub.take(gw)
    dt = t1 - t0
    window_recv = [r.recv for r in recs if t0 <= r.recv < t1]
    in_window = len(window_recv)
    # Every event of one MQTT message is logged with that message's receive time.
    messages = len(set(window_recv))
    loss = loss_report(recs, agent.db)
    res: dict[str, Any] = {
        "rate": rate,
        "offered": offered,
        "max_inflight": max_inflight or 100,
        "generated": (c1["accepted"] - c0["accepted"]) / dt,
        "acked": (c1["delivered"] - c0["delivered"]) / dt,
        "delivered": in_window / dt,
        "batch": batch,
        "ev_per_msg": in_window / messages if messages else float("nan"),
        "cpu": (cpu1 - cpu0) / dt * 100,
        "cpu_per_10k": (cpu1 - cpu0) / max(1, in_window) * 10_000,
        "mosq_cpu": (m1 - m0) / dt * 100,
        "sub_cpu": (s1 - s0) / dt * 100,
        "rss_peak": max(smp.rss_peak(), rss_end),
        "rss_hwm": rss_hwm,
        "rss_end": rss_end,
        "backlog_start": c0["rows"],
        "backlog_end": c1["rows"],
        "backlog_slope": smp.rows_slope(),
        "drain_s": drained,
        **loss,
        "problems": agent.problems(),
    }
    res["sustained"] = res["delivered"] >= 0.98 * offered and res["backlog_slope"] <= max(50.0, 0.02 * offered)
    return res


def scenario_latency(
    work: Path, broker: Mosquitto, sub: Subscriber, sz: Sizes, max_inflight: int | None = None
) -> dict[str, Any]:
    gw = "s2-latency"
    agent = Agent(work, gw, broker.port, DEVICES, 1, max_inflight=max_inflight)
    try:
        agent.wait_ready()
        time.sleep(sz.warmup)
        cpu0, t0 = agent.ps.cpu(), time.time()
        time.sleep(sz.latency_window)
        cpu1, t1 = agent.ps.cpu(), time.time()
        rss = agent.ps.rss()
        agent.stop_producing()
        agent.drain(sz.drain)
    finally:
        agent.stop()
    sub.settle()
    recs = sub.take(gw)
    lat = sorted((r.recv - r.time) * 1000 for r in recs if t0 <= r.time < t1)
    loss = loss_report(recs, agent.db)
    return {
        "n": len(lat),
        "rate": len(lat) / (t1 - t0),
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": lat[-1] if lat else float("nan"),
        "min": lat[0] if lat else float("nan"),
        "cpu": (cpu1 - cpu0) / (t1 - t0) * 100,
        "rss": rss,
        **loss,
        "problems": agent.problems(),
    }


def scenario_drain(work: Path, sz: Sizes, max_inflight: int | None = None) -> dict[str, Any]:
    broker = Mosquitto(work / "broker-s3", persistent=True)
    broker.start()
    sub = Subscriber(work, broker.port, "s3")
    gw = "s3-drain"
    agent = Agent(work, gw, broker.port, DEVICES, 1, max_inflight=max_inflight)
    try:
        agent.wait_ready()
        time.sleep(sz.warmup)
        broker.stop()
        t_down = time.time()
        with Sampler(agent, every=0.5) as out_smp:
            time.sleep(sz.outage)
        c_up = agent.counters()
        broker.start()
        t_up = time.time()
        cpu0 = agent.ps.cpu()
        # Caught up: the backlog is down to live level (< 0.3 s of production) twice running.
        caught: float | None = None
        low = 0
        deadline = time.monotonic() + max(60.0, 3 * sz.outage)
        with Sampler(agent, every=0.5) as drain_smp:
            while time.monotonic() < deadline:
                c = agent.counters()
                low = low + 1 if c is not None and c["rows"] < 300 else 0
                if low >= 2:
                    caught = time.time()
                    break
                time.sleep(0.1)
        cpu1, t_cpu = agent.ps.cpu(), time.time()
        time.sleep(1.0)
        agent.stop_producing()
        agent.drain(sz.drain)
    finally:
        agent.stop()
        sub.settle()
        recs = sub.take(gw)
        sub.close()
        broker.stop()
    first: dict[tuple[str, int], Rec] = {}
    for r in recs:
        first.setdefault((r.device, r.seq), r)
    after = [r for r in first.values() if r.recv >= t_up]
    backlog = [r for r in after if r.time < t_up]
    t_first = min((r.recv for r in after), default=float("nan"))
    t_last_b = max((r.recv for r in backlog), default=float("nan"))
    live_after = sorted((r for r in recs if r.recv > t_last_b), key=lambda r: r.recv)
    t_live = next((r.recv for r in live_after if r.recv - r.time < LIVE_LAG), float("nan"))
    span = t_last_b - t_first
    loss = loss_report(recs, agent.db)
    return {
        "outage": t_up - t_down,
        "backlog_rows": c_up["rows"] if c_up else None,
        "backlog_events": len(backlog),
        "reconnect_s": t_first - t_up,
        "backlog_delivered_s": t_last_b - t_up,
        "drain_rate": len(backlog) / span if span > 0 else float("nan"),
        "gross_rate": sum(1 for r in recs if t_first <= r.recv <= t_last_b) / span if span > 0 else float("nan"),
        "live_s": t_live - t_up,
        "caught_rows_s": (caught - t_up) if caught else None,
        "cpu_drain": (cpu1 - cpu0) / (t_cpu - t_up) * 100,
        "rss_outage_peak": out_smp.rss_peak(),
        "rss_drain_peak": drain_smp.rss_peak(),
        **loss,
        "problems": agent.problems(),
    }


def scenario_backlog_rss(
    work: Path,
    *,
    devices: int,
    burst: int,
    target: int,
    cap: float,
    label: str,
    marks: tuple[int, ...] = (100_000, 250_000, 500_000, 1_000_000),
) -> dict[str, Any]:
    """Broker down (nothing listens on the port); sample RSS and the committed backlog each second."""
    dead_port = free_port()
    gw = f"s4-{devices}x{burst}"
    agent = Agent(work, gw, dead_port, devices, burst, max_bytes="2GiB")
    marks = tuple(m for m in marks if m <= target)
    at_mark: dict[int, tuple[float, int]] = {}
    samples: list[tuple[float, int, int]] = []  # (s since start, committed rows, rss)
    try:
        agent.wait_ready(None)  # buffer open; under overload the first commit can take long
        t0 = time.time()
        cpu0 = agent.ps.cpu()
        deadline = time.monotonic() + cap
        rows = 0
        while time.monotonic() < deadline and rows < target:
            time.sleep(1.0)
            if not agent.alive():
                raise RuntimeError(f"agent exited:\n{agent.tail()}")
            c = agent.counters()
            rows = c["rows"] if c else rows
            rss = agent.ps.rss()
            samples.append((time.time() - t0, rows, rss))
            for m in marks:
                if rows >= m and m not in at_mark:
                    at_mark[m] = (time.time() - t0, rss)
                    print(
                        f"   [{label}] backlog {rows:>9,} rows after {time.time() - t0:5.1f} s: RSS {mb(rss):6.1f} MB",
                        flush=True,
                    )
        cpu1, t1 = agent.ps.cpu(), time.time()
        hwm = agent.ps.hwm()
        rss_end = agent.ps.rss()
        db_bytes = sum(p.stat().st_size for p in agent.dir.glob("buffer.db*"))
        t_stop = time.monotonic()
    finally:
        agent.stop(timeout=15)
    stop_s = time.monotonic() - t_stop
    # RSS growth per 100k committed rows, after the first sample (least squares)
    pts = [(r, m) for _, r, m in samples]
    slope = 0.0
    if len(pts) >= 3 and pts[-1][0] - pts[0][0] >= 10_000:
        mr = sum(r for r, _ in pts) / len(pts)
        mm = sum(m for _, m in pts) / len(pts)
        den = sum((r - mr) ** 2 for r, _ in pts)
        slope = sum((r - mr) * (m - mm) for r, m in pts) / den * 100_000 if den else 0.0
    return {
        "label": label,
        "devices": devices,
        "burst": burst,
        "offered": devices * burst * 1000 / INTERVAL_MS,
        "rows": rows,
        "seconds": t1 - t0,
        "rate": rows / (t1 - t0) if t1 > t0 else 0.0,
        "marks": at_mark,
        "rss_first": samples[0][2] if samples else 0,
        "rss_end": rss_end,
        "rss_hwm": hwm,
        "rss_per_100k": slope,
        "cpu": (cpu1 - cpu0) / (t1 - t0) * 100,
        "db_bytes": db_bytes,
        "stop_s": stop_s,
        "exit": agent.proc.returncode,
        "problems": agent.problems(),
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def machine_info(work: Path) -> list[str]:
    import paho.mqtt

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        mosq = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mosq = "mosquitto ?"
    fs = "?"
    with contextlib.suppress(OSError, IndexError, subprocess.SubprocessError):
        fs = (
            subprocess.run(["df", "-T", str(work)], capture_output=True, text=True, timeout=5, check=False)
            .stdout.splitlines()[1]
            .split()[1]
        )
    return [
        f"command   : {' '.join([sys.executable, *sys.argv])}",
        f"machine   : {platform.node()} {platform.machine()}, nproc {os.cpu_count()}"
        f" (usable {len(os.sched_getaffinity(0))}), {cpu}",
        f"os        : {platform.platform()}",
        f"python    : {platform.python_version()} ({sys.executable})",
        f"libs      : sqlite {sqlite3.sqlite_version}, paho-mqtt {paho.mqtt.__version__}, {mosq}",
        f"workdir   : {work} ({fs})",
        f"date      : {datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def growth(r: dict[str, Any]) -> str:
    """RSS growth per 100k committed rows, or '-' when too few rows were committed to tell."""
    return f"{mb(r['rss_per_100k']):+.1f} MB" if r["rows"] >= 10_000 else "- MB"


def fmt(v: float | None, spec: str = ",.0f") -> str:
    if v is None or v != v:
        return "-"
    return format(v, spec)


def run(args: argparse.Namespace) -> int:
    sz = QUICK if args.quick else FULL
    if args.rates:
        sz.rates = [int(r) for r in args.rates.split(",")]
    if args.batch_rates:
        sz.batch_rates = [int(r) for r in args.batch_rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="edge-bench-", dir=args.workdir))
    started = time.monotonic()
    info = machine_info(work)
    print("\n".join(info), flush=True)
    print(
        f"mode      : {'quick' if args.quick else 'full'}; devices: virtual meters polled every"
        f" {INTERVAL_MS} ms, rate = devices x burst / interval; uplink.mqtt.max_inflight"
        f" {args.max_inflight or 'default (100)'}\n",
        flush=True,
    )
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        timings[name] = time.monotonic() - mark
        mark = time.monotonic()

    only = set(args.only.split(",")) if args.only else {"0", "1", "2", "3", "4", "5"}
    broker = sub = None

    def base() -> float | None:
        """The yardstick: bare paho acked msgs/s with meter-event-sized payloads (scenario 0)."""
        b = results.get("0")
        return float(b["meter"]["rate"]) if b else None

    def throughput_steps(name: str, broker: Mosquitto, sub: Subscriber, rates: list[int], batch: int | None) -> None:
        """Scenarios 1 and 5: one fresh agent per offered rate, a table row each."""
        head = (
            f"{'offered':>8} {'generated':>9} {'delivered':>9} {'xpaho':>6} {'acked':>8}"
            f" {'agentCPU':>8} {'CPUs/10k':>8} {'RSSpeak':>7} {'backlog':>15} {'grow/s':>7}"
            f" {'lost':>5} {'dup':>5} {'undrnd':>6} {'mosqCPU':>7} {'subCPU':>6}"
            + (f" {'ev/msg':>6}" if batch else "")
            + "  ok"
        )
        print(head, flush=True)
        steps = []
        for rate in rates:
            r = scenario_throughput(work, broker, sub, rate, sz, args.max_inflight, batch)
            r["x_paho"] = r["delivered"] / b if (b := base()) else None
            steps.append(r)
            print(
                f"{r['offered']:>8,.0f} {r['generated']:>9,.0f} {r['delivered']:>9,.0f}"
                f" {ratio(r['delivered'], base()):>6} {r['acked']:>8,.0f} {r['cpu']:>7.0f}%"
                f" {r['cpu_per_10k']:>8.2f} {mb(r['rss_peak']):>5.1f}MB"
                f" {r['backlog_start']:>7,}>{r['backlog_end']:<7,} {r['backlog_slope']:>7,.0f}"
                f" {r['lost']:>5} {r['duplicates']:>5} {r['undrained']:>6} {r['mosq_cpu']:>6.0f}%"
                f" {r['sub_cpu']:>5.0f}%"
                + (f" {fmt(r['ev_per_msg'], '.1f'):>6}" if batch else "")
                + f"  {'yes' if r['sustained'] else 'NO'}",
                flush=True,
            )
            for p in r["problems"][:3]:
                print(f"    agent log: {p}")
        ok = [s for s in steps if s["sustained"]]
        best = max(ok, key=lambda s: s["offered"]) if ok else None
        top = max(steps, key=lambda s: s["delivered"])
        results[name] = steps
        results[f"{name}_best"] = best["offered"] if best else None
        print(
            f"-> highest offered rate sustained (delivered >= 98% of offered, backlog not"
            f" growing): {fmt(best['offered'] if best else None)} ev/s"
            f" (delivered {fmt(best['delivered'] if best else None)} ev/s ="
            f" {ratio(best['delivered'] if best else None, base())} bare paho);"
            f" highest delivered {fmt(top['delivered'])} ev/s = {ratio(top['delivered'], base())}"
            " bare paho\n",
            flush=True,
        )

    try:
        if only & {"0", "1", "2", "5"}:
            broker = Mosquitto(work / "broker")
            broker.start()
        if "0" in only and broker is not None:
            meter = meter_event_size()
            print(
                f"== 0. bare paho-mqtt baseline: one paho {BASELINE_WINDOW}-in-flight QoS 1"
                f" publisher, one thread (client.loop), its own process, same broker, no"
                f" subscriber for its topic; {sz.baseline_s:.0f} s per payload size",
                flush=True,
            )
            base0: dict[str, Any] = {}
            for key, size in (("small", BASELINE_SMALL), ("meter", meter)):
                r = scenario_baseline(broker, size, sz.baseline_s)
                base0[key] = r
                print(
                    f"   {size:>4} B payload: {r['rate']:>8,.0f} msgs/s acked, {r['cpu_us']:5.1f} µs"
                    f" CPU per message (paho process {r['cpu_pct']:.0f}% of a core), mosqCPU"
                    f" {r['mosq_cpu']:.0f}%",
                    flush=True,
                )
            results["0"] = base0
            print(
                f"-> yardstick: {base0['meter']['rate']:,.0f} msgs/s with {meter} B payloads (the"
                " size of an agent meter event); every `xpaho` below is the agent's delivered"
                " ev/s divided by it\n",
                flush=True,
            )
            lap("0")
        if only & {"1", "2", "5"} and broker is not None:
            sub = Subscriber(work, broker.port, "main")
        if "1" in only and broker is not None and sub is not None:
            print(
                f"== 1. sustained throughput ({sz.window:.0f} s per step after"
                f" {sz.warmup:.0f} s warm-up; drain wait {sz.drain:.0f} s)",
                flush=True,
            )
            throughput_steps("1", broker, sub, sz.rates, None)
            lap("1")
        if "5" in only and broker is not None and sub is not None:
            print(
                f"== 5. batched throughput (uplink.mqtt.batch: {{enabled: true, max_events:"
                f" {BATCH_EVENTS}}}: JSON arrays on {TOPIC_PREFIX}/<gateway>/batch; {sz.window:.0f} s"
                f" per step after {sz.warmup:.0f} s warm-up; drain wait {sz.drain:.0f} s)",
                flush=True,
            )
            throughput_steps("5", broker, sub, sz.batch_rates, BATCH_EVENTS)
            lap("5")
        if "2" in only and broker is not None and sub is not None:
            print(
                f"== 2. latency at 1,000 ev/s for {sz.latency_window:.0f} s (event `time` ->"
                " subscriber receive, same clock; `time` has ms resolution)",
                flush=True,
            )
            r = scenario_latency(work, broker, sub, sz, args.max_inflight)
            results["2"] = r
            print(
                f"   {r['n']:,} events ({r['rate']:,.0f} ev/s): p50 {r['p50']:.1f} ms, p95"
                f" {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms (min"
                f" {r['min']:.1f}); agent CPU {r['cpu']:.0f}%, RSS {mb(r['rss']):.1f} MB; lost"
                f" {r['lost']}, duplicates {r['duplicates']}\n",
                flush=True,
            )
            lap("2")
        if sub is not None:
            sub.close()
            sub = None
        if broker is not None:
            broker.stop()
            broker = None
        if "3" in only:
            print(
                f"== 3. backlog drain after a {sz.outage:.0f} s broker outage at 1,000 ev/s"
                " (same port; broker persistence on so the subscriber's session survives)",
                flush=True,
            )
            r = scenario_drain(work, sz, args.max_inflight)
            results["3"] = r
            print(
                f"   outage {r['outage']:.1f} s, backlog at restart {fmt(r['backlog_rows'])} rows;"
                f" reconnect after {r['reconnect_s']:.2f} s",
                flush=True,
            )
            print(
                f"   backlog ({r['backlog_events']:,} events) delivered {r['backlog_delivered_s']:.1f}"
                f" s after restart: drain rate {fmt(r['drain_rate'])} ev/s net of live"
                f" ({fmt(r['gross_rate'])} ev/s gross at the subscriber)",
                flush=True,
            )
            print(
                f"   live again (lag < {LIVE_LAG * 1000:.0f} ms) {r['live_s']:.1f} s after restart;"
                f" buffer < 300 rows after {fmt(r['caught_rows_s'], '.1f')} s",
                flush=True,
            )
            print(
                f"   agent CPU while draining {r['cpu_drain']:.0f}%, RSS peak outage"
                f" {mb(r['rss_outage_peak']):.1f} MB / drain {mb(r['rss_drain_peak']):.1f} MB;"
                f" lost {r['lost']}, duplicates {r['duplicates']}, undrained {r['undrained']}\n",
                flush=True,
            )
            for p in r["problems"][:3]:
                print(f"    agent log: {p}")
            lap("3")
        if "4" in only:
            print(
                f"== 4. RSS with a {sz.backlog_target:,}-event backlog (broker down: nothing listens"
                " on the agent's port; buffer max_bytes 2GiB)",
                flush=True,
            )
            runs = []
            for label, (dev, burst), target, cap in (
                ("overload", OVERLOAD, 10**9, sz.overload_s),
                ("fill", FILL, sz.backlog_target, sz.backlog_cap),
            ):
                print(
                    f"   [{label}] {dev} meters x burst {burst} / {INTERVAL_MS} ms ="
                    f" {dev * burst * 1000 // INTERVAL_MS:,} ev/s offered, up to {cap:.0f} s",
                    flush=True,
                )
                r = scenario_backlog_rss(work, devices=dev, burst=burst, target=target, cap=cap, label=label)
                runs.append(r)
                print(
                    f"   [{label}] {r['rows']:,} rows committed in {r['seconds']:.0f} s"
                    f" ({r['rate']:,.0f} ev/s, agent CPU {r['cpu']:.0f}%); RSS first sample"
                    f" {mb(r['rss_first']):.1f} MB, end {mb(r['rss_end']):.1f} MB, peak (VmHWM)"
                    f" {mb(r['rss_hwm']):.1f} MB, growth {growth(r)} per 100k rows;"
                    f" buffer file {mb(r['db_bytes']):,.0f} MB; SIGTERM->exit"
                    f" {r['stop_s']:.1f} s (exit code {r['exit']})",
                    flush=True,
                )
                for p in r["problems"][:3]:
                    print(f"    agent log: {p}")
            results["4"] = runs
            print(flush=True)
            lap("4")
    finally:
        if sub is not None:
            sub.close()
        if broker is not None:
            broker.stop()
        _kill_children()
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary(results, sz, info, time.monotonic() - started, timings)
    return 0


def summary(results: dict[str, Any], sz: Sizes, info: list[str], elapsed: float, timings: dict[str, float]) -> None:
    per = ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items())
    lines = ["", "=" * 100, "SUMMARY", "=" * 100, *info, f"elapsed   : {elapsed:.0f} s ({per})", ""]
    base = float(results["0"]["meter"]["rate"]) if "0" in results else None
    if "0" in results:
        for key in ("small", "meter"):
            r = results["0"][key]
            lines.append(
                f"0. bare paho, QoS 1, {BASELINE_WINDOW} in flight, {r['size']:>3} B  "
                f"{r['rate']:>8,.0f} msgs/s acked, {r['cpu_us']:.1f} µs CPU/msg"
                + ("   <- yardstick (xpaho = agent delivered ev/s / this)" if key == "meter" else "")
            )
    for name, title in (("1", "throughput"), ("5", f"batched x{BATCH_EVENTS}")):
        if name not in results:
            continue
        lines.append(
            f"{name}. {title + f' ({sz.window:.0f} s windows)':<31} offered generated delivered"
            "  xpaho  CPU%  CPUs/10k  RSSpeak  lost  dup  ok"
        )
        for r in results[name]:
            lines.append(
                f"   {'':30}{r['offered']:>8,.0f} {r['generated']:>9,.0f}"
                f" {r['delivered']:>9,.0f} {ratio(r['delivered'], base):>6}"
                f" {r['cpu']:>5.0f} {r['cpu_per_10k']:>9.2f} {mb(r['rss_peak']):>6.1f}MB"
                f" {r['lost']:>5} {r['duplicates']:>4}  {'yes' if r['sustained'] else 'NO'}"
            )
        best = results[f"{name}_best"]
        top = max(results[name], key=lambda r: r["delivered"])
        best_del = next((r["delivered"] for r in results[name] if r["offered"] == best), None)
        lines.append(
            f"   highest sustained offered rate: {fmt(best)} ev/s (delivered {fmt(best_del)}"
            f" ev/s = {ratio(best_del, base)} bare paho); highest delivered"
            f" {fmt(top['delivered'])} ev/s = {ratio(top['delivered'], base)} bare paho"
        )
    if "2" in results:
        r = results["2"]
        lines.append(
            f"2. latency @1k ev/s ({r['n']:,} ev)     p50 {r['p50']:.1f} ms  p95"
            f" {r['p95']:.1f} ms  p99 {r['p99']:.1f} ms  max {r['max']:.1f} ms"
        )
    if "3" in results:
        r = results["3"]
        lines.append(
            f"3. drain after {r['outage']:.0f} s outage        backlog {fmt(r['backlog_rows'])}"
            f" rows, drain {fmt(r['drain_rate'])} ev/s net, backlog delivered in"
            f" {r['backlog_delivered_s']:.1f} s, live again after {r['live_s']:.1f} s;"
            f" lost {r['lost']}, dup {r['duplicates']}"
        )
    if "4" in results:
        for r in results["4"]:
            marks = ", ".join(f"{m // 1000}k: {mb(rss):.1f} MB" for m, (_, rss) in sorted(r["marks"].items()))
            verdict = "OK" if r["rss_hwm"] <= 80e6 else "OVER 80 MB"
            lines.append(
                f"4. RSS, backlog [{r['label']}: {r['offered']:,.0f} ev/s offered]"
                f" {r['rows']:,} rows committed at {r['rate']:,.0f} ev/s;"
                f" {marks + '; ' if marks else ''}peak {mb(r['rss_hwm']):.1f} MB,"
                f" {growth(r)}/100k rows -> {verdict}"
                " (target <= 80 MB, flat)"
            )
    print("\n".join(lines), flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--subscriber":
        port, out, cid, ready = sys.argv[2:6]
        subscriber_main(int(port), Path(out), cid, Path(ready))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--paho-baseline":
        port, size, seconds, window = sys.argv[2:6]
        paho_baseline_main(int(port), int(size), float(seconds), int(window))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about 100-120 s in all")
    parser.add_argument(
        "--only",
        help="comma-separated scenarios to run, e.g. 0,1,5 (default all,"
        " 0-5; without 0 no ratio to bare paho is printed)",
    )
    parser.add_argument("--rates", help="comma-separated offered rates for scenario 1 (ev/s)")
    parser.add_argument("--batch-rates", help="comma-separated offered rates for scenario 5 (ev/s)")
    parser.add_argument(
        "--max-inflight", type=int, help="uplink.mqtt.max_inflight for scenarios 1-3 and 5 (default: the agent's, 100)"
    )
    parser.add_argument("--workdir", help="where to put buffers and logs (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, buffers)")
    args = parser.parse_args()
    exit_cleanly()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
