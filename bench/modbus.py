#!/usr/bin/env python3
"""Modbus benchmark: simulated Modbus devices -> agent (driver: modbus) -> MQTT QoS 1 -> subscriber.

Everything is real and in its own process: pymodbus simulators (``drivers.modbus.simulator``),
the agent (``python -m agent run -c site.yaml``), a Mosquitto broker on a free loopback port and
a paho subscriber that logs the receive time of every event. Figures are printed, never asserted.

1. Neuron's published workload: 500 Modbus TCP devices x 30 tags every 1 s (15,000 tags/s);
   polls/s, tags/s delivered, requests per poll, agent CPU and RSS, read-to-publish latency.
2. One RS-485 bus (a pseudo-terminal) with 8 units at 9600 baud, one of them absent: the
   period each good unit achieves and the absent unit's offline status.
3. Coalescing: planned requests for every shipped profile.

    .venv/bin/python bench/modbus.py            # full run, about 1.5 minutes
    .venv/bin/python bench/modbus.py --quick    # 100 devices, shorter windows, about 35 s

See bench/README.md ("Modbus benchmark") for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file is run: the broker, process and buffer-file helpers of the
# pipeline benchmark are reused as they are.
import pipeline as pl

ROOT = pl.ROOT
HERE = Path(__file__).resolve()
TOPIC_PREFIX = pl.TOPIC_PREFIX
METER = "city.meter.reading"
STATUS = "city.device.status"
INTERVAL = 1.0  # s: every device of scenarios 1 and 2 is polled every second
TAG_PROFILE = "bench-tags"  # scenario 1's device profile, written next to the agent's site file

# Scenario 1 targets (the Neuron comparison)
TARGET_TAGS = 15_000
TARGET_CPU = 60.0  # % of one core
TARGET_P99 = 100.0  # ms
NEURON = "Neuron (C) reports 124% CPU on a 4-core server for this workload"

# Scenario 2: one RS-485 bus
RTU_UNITS = 8  # units 1..8 are configured; 1..7 answer, the last one is absent
RTU_BAUD = 9600
RTU_TIMEOUT = 0.2  # s
RTU_PROFILE = "eastron-sdm630"
RTU_POINTS = 6  # "a handful": the profile's first points by address (one request)
RTU_BITS_PER_CHAR = 10  # 8N1: start + 8 data + stop
COALESCE_TARGET = 5.0  # scenario 3: points per request


# ---------------------------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Child side of every spawn: SIGTERM when the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """A child process the bench kills on exit (atexit, signals) and that dies with the bench."""
    return pl._spawn(args, preexec_fn=_die_with_parent, cwd=ROOT, **kw)


class Mosquitto(pl.Mosquitto):
    """pipeline.py's broker, spawned so that it too dies with the bench (even on SIGKILL)."""

    def start(self) -> None:
        self.proc = spawn(
            [pl.mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def accepting() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode} (config {self.conf})")
            return False

        pl.wait_for(accepting, 10, "mosquitto to accept connections", 0.01)


def raise_fd_limit() -> None:
    """Children inherit it: 500 devices are 500 sockets in the agent and 1,000 in the simulators."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def tail(path: Path, n: int = 12) -> str:
    with contextlib.suppress(OSError):
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-n:])
    return "    (no output)"


def read_json_line(proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> dict[str, Any]:
    """The first JSON line a child prints on stdout (its 'ready' message), or a clear error."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                line = buf.split(b"\n", 1)[0]
                try:
                    doc: dict[str, Any] = json.loads(line)
                except ValueError as exc:
                    raise RuntimeError(f"{what} printed {line[:200]!r} instead of its ready line") from exc
                if "error" in doc:
                    raise RuntimeError(f"{what} failed to start: {doc['error']}\n{tail(log)}")
                return doc
        elif proc.poll() is not None:
            break
    code = proc.poll()
    state = f"exited with {code}" if code is not None else f"not ready after {timeout:.0f} s"
    raise RuntimeError(f"{what} {state}; its log ({log}):\n{tail(log)}")


def percentile(values: list[float], q: float) -> float:
    return pl.percentile(values, q)


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return pl.fmt(v, spec)


def pymodbus_version() -> str:
    try:
        import pymodbus
        import serial

        return f"pymodbus {pymodbus.__version__}, pyserial {getattr(serial, '__version__', '?')}"
    except ImportError:
        return "pymodbus ?"


# ---------------------------------------------------------------------------------------------
# the device model of scenario 1: N tags at adjacent input registers
# ---------------------------------------------------------------------------------------------
_QUANTITIES = [  # (quantity, phase) for the float32 tags, cycled
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
    ("active_energy_export", None),
    ("reactive_energy", None),
    ("flow", None),
    ("pressure", None),
    ("voltage", None),
    ("current", None),
]


def bench_points(tags: int) -> list[dict[str, Any]]:
    """``tags`` points: two thirds float32 then uint16, back to back from input register 0.

    30 tags = 20 float32 (40 registers) + 10 uint16 (10 registers): 50 registers, one request.
    """
    floats = (2 * tags + 2) // 3
    points: list[dict[str, Any]] = []
    address = 0
    for i in range(tags):
        point: dict[str, Any] = {"name": f"t{i:03d}", "table": "input", "address": address}
        if i < floats:
            quantity, phase = _QUANTITIES[i % len(_QUANTITIES)]
            point |= {"type": "float32", "quantity": quantity}
            if phase:
                point["phase"] = phase
            address += 2
        else:
            # alternately a temperature in 0.1 degC and an event counter
            point |= (
                {"type": "uint16", "quantity": "temperature", "scale": 0.1}
                if i % 2 == 0
                else {"type": "uint16", "quantity": "counter"}
            )
            address += 1
        points.append(point)
    return points


def tag_profile_yaml(tags: int) -> str:
    lines = [
        f"profile: {TAG_PROFILE}",
        "vendor: bench",
        f"model: {tags} tags at adjacent input registers",
        "kind: meter",
        "points:",
    ]
    lines += [f"  - {json.dumps(p)}" for p in bench_points(tags)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# child: Modbus TCP simulators (one pymodbus ModbusTcpServer per port, one unit per port)
# ---------------------------------------------------------------------------------------------
def _write_stats(path: Path, requests: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"t": time.time(), "requests": requests}))
    tmp.replace(path)


async def _sim_tcp(spec: dict[str, Any]) -> None:
    from drivers.modbus.config import PointConfig
    from drivers.modbus.simulator import SimulatedUnit, Simulator

    points = [PointConfig.model_validate(p) for p in spec["points"]]
    count, host, stats = int(spec["count"]), str(spec["host"]), Path(spec["stats"])

    async def serve(index: int, port: int) -> tuple[Simulator, int]:
        for _attempt in range(3):
            unit = SimulatedUnit(1, points, seed=spec["seed"] + index)
            # --response-spread: device k of N answers after k/N of the spread, every time
            unit.faults.delay = float(spec.get("spread", 0.0)) * (spec["seed"] + index) / max(1, spec["total"])
            sim = Simulator([unit], period=spec["period"])
            try:
                await sim.serve_tcp(host, port)
                return sim, port
            except (OSError, RuntimeError):
                await sim.stop()
                port = pl.free_port()  # taken in between: another one
        raise OSError(f"could not listen on {host} after 3 ports")

    # Hold every port at once while choosing, so they are distinct; release just before serving.
    holders = []
    for _ in range(count):
        s = socket.socket()
        s.bind((host, 0))
        holders.append(s)
    ports = [int(s.getsockname()[1]) for s in holders]
    for s in holders:
        s.close()
    sims = await asyncio.gather(*(serve(i, p) for i, p in enumerate(ports)))
    print(json.dumps({"ports": [p for _, p in sims]}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        _write_stats(stats, sum(s.requests for s, _ in sims))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    await asyncio.gather(*(s.stop() for s, _ in sims), return_exceptions=True)


def sim_tcp_main(spec_file: str) -> int:
    """Entry point of ``modbus.py --sim-tcp SPEC.json``: prints ``{"ports": [...]}`` when listening."""
    try:
        asyncio.run(_sim_tcp(json.loads(Path(spec_file).read_text())))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        raise
    return 0


# ---------------------------------------------------------------------------------------------
# child: an RS-485 bus on a pseudo-terminal, units 1..7 present
# ---------------------------------------------------------------------------------------------
async def _sim_rtu(spec: dict[str, Any]) -> None:
    from drivers.modbus.config import PointConfig
    from drivers.modbus.pty import PtyPair
    from drivers.modbus.simulator import SimulatedUnit, Simulator

    points = [PointConfig.model_validate(p) for p in spec["points"]]
    units = [
        SimulatedUnit(u, points, byte_order=spec["byte_order"], word_order=spec["word_order"]) for u in spec["units"]
    ]
    for unit in units:
        # The kernel does not pace a pty at its baudrate: the answer would come back in
        # microseconds. The unit waits for the frames' time on a real 9600 baud line instead.
        unit.faults.delay = float(spec["wire_delay"])
    line = PtyPair()
    sim = Simulator(units, period=spec["period"])
    try:
        await sim.serve_serial(line.device, baudrate=int(spec["baudrate"]))
        print(json.dumps({"port": line.client}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stats = Path(spec["stats"])
        while not stop.is_set():
            _write_stats(stats, sim.requests)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        await sim.stop()
        line.close()


def sim_rtu_main(spec_file: str) -> int:
    """Entry point of ``modbus.py --sim-rtu SPEC.json``: prints ``{"port": <agent's end>}`` when open."""
    try:
        asyncio.run(_sim_rtu(json.loads(Path(spec_file).read_text())))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        raise
    return 0


class SimProcess:
    """The parent's handle on one simulator process: its ready line, request counter and CPU."""

    def __init__(self, work: Path, name: str, mode: str, spec: dict[str, Any], timeout: float = 60) -> None:
        self.name = name
        self.stats = work / f"{name}.stats"
        self.log = work / f"{name}.log"
        spec_file = work / f"{name}.json"
        spec_file.write_text(json.dumps({**spec, "stats": str(self.stats)}))
        with self.log.open("ab") as log:
            self.proc = spawn([sys.executable, str(HERE), mode, str(spec_file)], stdout=subprocess.PIPE, stderr=log)
        self.ready = read_json_line(self.proc, timeout, f"simulator {name}", self.log)
        self.ps = pl.Proc(self.proc.pid)

    def requests(self) -> tuple[float, int]:
        """(when, requests served so far), as last written by the simulator (every 0.5 s)."""
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(self.stats.read_text())
            return float(doc["t"]), int(doc["requests"])
        return time.time(), 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        pl._stop(self.proc, signal.SIGTERM, 5)


def request_rate(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> float:
    """Requests/s served by all simulators between two snapshots of their counters."""
    rate = 0.0
    for (t0, r0), (t1, r1) in zip(before, after, strict=True):
        if t1 > t0:
            rate += (r1 - r0) / (t1 - t0)
    return rate


# ---------------------------------------------------------------------------------------------
# child: the subscriber (as pipeline.py's, plus measurements per reading and status details)
# ---------------------------------------------------------------------------------------------
def subscriber_main(port: int, out: Path, client_id: str, ready: Path) -> None:
    """Entry point of ``modbus.py --subscriber``: one line per event, with its receive time.

    ``recv  gateway  device  seq  time  type  measurements  status:reason``
    """

    def line(now: float, e: dict[str, Any], _msg: Any) -> str:
        data = e.get("data") or {}
        n = len(data.get("measurements") or ()) if e.get("type") == METER else 0
        extra = f"{data.get('status')}:{data.get('reason') or ''}" if e.get("type") == STATUS else ""
        return (
            f"{now:.6f}\t{e.get('gateway')}\t{e.get('device')}\t{e.get('seq')}"
            f"\t{e.get('time')}\t{e.get('type')}\t{n}\t{extra}\n"
        )

    pl.run_event_subscriber(port, out, client_id, ready, line)


@dataclass(slots=True)
class Rec:
    recv: float
    device: str
    seq: int
    time: float  # the event's `time` (when the reading was taken), epoch s, ms resolution
    type: str
    n: int  # measurements in a meter reading
    extra: str  # status:reason of a status event


class Subscriber:
    """The parent's handle on the subscriber process and its log."""

    def __init__(self, work: Path, port: int) -> None:
        self.out = work / "sub.log"
        self.ready = work / "sub.ready"
        self.out.touch()
        self.proc = spawn(
            [
                sys.executable,
                str(HERE),
                "--subscriber",
                str(port),
                str(self.out),
                f"bench-modbus-sub-{os.getpid()}",
                str(self.ready),
            ]
        )

        def subscribed() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the subscriber exited with {self.proc.returncode}")
            return self.ready.exists()

        pl.wait_for(subscribed, 20, "the subscriber to subscribe")
        self.offset = 0
        self.ps = pl.Proc(self.proc.pid)

    def settle(self, quiet: float = 0.5, timeout: float = 20.0) -> None:
        """Until the log has stopped growing for ``quiet`` seconds."""
        pl.wait_quiet(self.out, quiet, timeout)

    def take(self, gateway: str) -> list[Rec]:
        """Every event logged since the last take, of one gateway."""
        with self.out.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        recs = []
        for line in data[:end].decode().splitlines():
            recv, gw, dev, seq, t, typ, n, extra = line.split("\t")
            if gw == gateway:
                recs.append(Rec(float(recv), dev, int(seq), pl._parse_time(t), typ, int(n), extra))
        return recs

    def close(self) -> None:
        pl._stop(self.proc, signal.SIGTERM, 5)


# ---------------------------------------------------------------------------------------------
# the agent under test
# ---------------------------------------------------------------------------------------------
class Agent:
    """``python -m agent run -c site.yaml`` with its own directory, buffer file and log."""

    def __init__(
        self, work: Path, gateway: str, broker_port: int, devices_yaml: str, profiles: dict[str, str] | None = None
    ) -> None:
        self.dir = work / gateway
        (self.dir / "profiles").mkdir(parents=True, exist_ok=True)
        for name, text in (profiles or {}).items():
            (self.dir / "profiles" / f"{name}.yaml").write_text(text)
        self.gateway, self.broker_port = gateway, broker_port
        self.db = self.dir / "buffer.db"
        self.config = self.dir / "site.yaml"
        self.log = self.dir / "agent.log"
        self.config.write_text(self._site(devices_yaml))
        with self.log.open("ab") as log:
            self.proc = spawn(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        self.ps = pl.Proc(self.proc.pid)

    def _site(self, devices_yaml: str) -> str:
        # The default buffer (max_bytes 256MiB), no batching, default max_inflight: as shipped.
        return (
            f"gateway: {{id: {self.gateway}, site: bench, health_interval: 60s}}\n"
            "uplink:\n"
            f"  mqtt: {{host: 127.0.0.1, port: {self.broker_port}, topic_prefix: {TOPIC_PREFIX},"
            " reconnect_min: 200ms, reconnect_max: 1s}\n"
            f"buffer: {{path: {self.db}}}\n" + (f"devices:\n{devices_yaml}" if devices_yaml else "devices: []\n")
        )

    def counters(self) -> dict[str, int] | None:
        return pl.read_counters(self.db)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Until the first event was delivered (PUBACKed)."""

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(
                    f"agent {self.gateway} exited with {self.proc.returncode}; its log:\n{tail(self.log, 25)}"
                )
            c = self.counters()
            return c is not None and c["delivered"] > 0

        try:
            pl.wait_for(ready, timeout, f"agent {self.gateway} to deliver its first event")
        except RuntimeError as exc:
            if not self.alive():
                raise
            raise RuntimeError(f"{exc}; its log ({self.log}):\n{tail(self.log, 25)}") from None

    def stop_producing(self, timeout: float = 15) -> float | None:
        """Reload a config without devices (SIGHUP) and wait until the reload is done: polling
        stops, delivery goes on. (A SIGTERM during a reload would race the reload.) Seconds the
        reload took, or None if the agent did not say "config reloaded" within ``timeout``."""

        def reloads() -> int:
            with contextlib.suppress(OSError):
                text = self.log.read_text(errors="replace")
                return text.count("config reloaded from") + text.count("reload refused")
            return 0

        before = reloads()
        self.config.write_text(self._site(""))
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGHUP)
        try:
            pl.wait_for(lambda: reloads() > before or not self.alive(), timeout, "the reload", 0.05)
        except RuntimeError:
            return None
        return time.monotonic() - t0

    def drain(self, timeout: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            c = self.counters()
            if c is not None and c["rows"] == 0:
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def stop(self, timeout: float = 10) -> str:
        """SIGTERM, then SIGKILL after ``timeout``; what happened, for the output."""
        if not self.alive():
            return f"had exited ({self.proc.returncode})"
        t0 = time.monotonic()
        pl._stop(self.proc, signal.SIGTERM, timeout)
        if self.proc.returncode == -signal.SIGKILL:
            return f"did NOT exit within {timeout:.0f} s of SIGTERM: killed"
        return f"exited ({self.proc.returncode}) {time.monotonic() - t0:.1f} s after SIGTERM"

    def stop_note(self, reload_s: float | None, stopped: str) -> str:
        reload = f"took {reload_s:.1f} s" if reload_s is not None else "NOT done after 15 s"
        return f"reload to no devices (SIGHUP) {reload}; agent {stopped}"

    def problems(self) -> list[str]:
        """WARNING/ERROR/Traceback lines of the agent's log (uplink notices excluded)."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                if ("WARNING" in line or "ERROR" in line or "Traceback" in line) and "uplink" not in line:
                    out.append(line)
        return out


def cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of the whole machine so far, from /proc/stat (0, 0 if unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return fields[7], sum(fields)
    return 0, 0


@dataclass(slots=True)
class Sample:
    t: float
    rss: int
    delivered: int | None
    rows: int | None


class WindowSampler:
    """Every 0.5 s in a thread: the agent's RSS and its buffer counters; CPU steal over the window."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.steal = (0, 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            c = self.agent.counters()
            self.samples.append(
                Sample(time.time(), self.agent.ps.rss(), c["delivered"] if c else None, c["rows"] if c else None)
            )
            self._stop.wait(0.5)

    def __enter__(self) -> WindowSampler:
        self._steal0 = cpu_steal()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(2)
        s1 = cpu_steal()
        self.steal = (s1[0] - self._steal0[0], s1[1] - self._steal0[1])

    @property
    def peak(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    def steal_pct(self) -> float:
        return 100 * self.steal[0] / self.steal[1] if self.steal[1] else float("nan")

    def acked_per_second(self) -> list[float]:
        """Events PUBACKed in each ~1 s span (samples two apart): shows uplink stalls."""
        pts = [s for s in self.samples if s.delivered is not None]
        out = []
        for a, b in itertools.pairwise(pts[::2]):
            if b.t > a.t and a.delivered is not None and b.delivered is not None:
                out.append((b.delivered - a.delivered) / (b.t - a.t))
        return out

    def rows_max(self) -> int:
        return max((s.rows for s in self.samples if s.rows is not None), default=0)


def losses(recs: list[Rec], db: Path) -> dict[str, Any]:
    """Per device: seqs the agent gave out (sequences table) that the subscriber never received and
    that are no longer in the buffer; plus the buffer's own counters (drops)."""
    seqs, left, rows = pl.read_final(db)
    got: dict[str, set[int]] = {}
    for r in recs:
        got.setdefault(r.device, set()).add(r.seq)
    lost = 0
    gappy = 0
    for device, last in seqs.items():
        have = got.get(device, set())
        missing = sum(1 for s in range(1, last + 1) if s not in have and (device, s) not in left)
        lost += missing
        gappy += missing > 0
    unique = sum(len(s) for s in got.values())
    c = pl.read_counters(db) or {}
    return {
        "received": len(recs),
        "duplicates": len(recs) - unique,
        "lost": lost,
        "devices_with_gaps": gappy,
        "undrained": rows,
        "accepted": c.get("accepted", 0),
        "delivered": c.get("delivered", 0),
        "dropped": sum(v for k, v in c.items() if k.startswith("dropped_")),
    }


# Where a py-spy sample's time goes: the innermost frame that belongs to one of these (file path
# fragments, checked from the innermost frame outwards); stacks with none of them are the loop's own.
_AREAS = [
    ("pymodbus client (framing, transactions, transport)", ("pymodbus/",)),
    ("driver: decoding registers (codec, decode_point)", ("drivers/modbus/codec.py", "decode_point (")),
    ("driver: poll bookkeeping, event data (driver.py)", ("drivers/modbus/",)),
    ("event envelope + JSON (agent/contract/events.py)", ("agent/contract/events.py",)),
    (
        "SQLite outbox: commit, read back, delete (agent/store/outbox.py and its parts)",
        tuple(
            f"agent/store/{m}.py"
            for m in ("outbox", "records", "schema", "accounting", "writes", "evict", "disk", "repair")
        ),
    ),
    ("event store: sequencing, queues (agent/store/event_store.py)", ("agent/store/event_store.py",)),
    ("MQTT uplink + paho (agent/uplink, paho)", ("agent/uplinks/", "paho/")),
    (
        "device runner, runtime (agent/devices/runner.py, runtime.py)",
        ("agent/devices/runner.py", "agent/runtime/agent.py"),
    ),
    ("thread pools waiting for work", ("concurrent/futures/thread.py", "threading.py")),
]


def py_spy_top(agent: Agent, seconds: float, out: Path, n: int = 10) -> list[str] | str:
    """Sample the agent with ``py-spy record -f raw``: time per area, and the hottest frames."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        return "py-spy is not installed in the venv"
    try:
        done = subprocess.run(
            [
                str(exe),
                "record",
                "-d",
                str(max(1, round(seconds))),
                "-r",
                "100",
                "-f",
                "raw",
                "-o",
                str(out),
                "--pid",
                str(agent.proc.pid),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy failed: {exc}"
    if done.returncode != 0 or not out.exists():
        return f"py-spy failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in out.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf.split(" (", 1)[0] + " (" + leaf.rsplit("/", 1)[-1] if " (" in leaf else leaf] += k
        area = "asyncio event loop itself (scheduling, selector, callbacks)"
        for frame in reversed(frames):
            hit = next((name for name, keys in _AREAS if any(key in frame for key in keys)), None)
            if hit is not None:
                area = hit
                break
        areas[area] += k
    if not total:
        return "py-spy recorded no samples"
    lines = [
        f"{total:,} non-idle samples at 100 Hz over {seconds:.0f} s (all threads; shares of those samples);"
        " by area (innermost matching frame):"
    ]
    lines += [f"      {100 * k / total:5.1f}%  {a}" for a, k in areas.most_common()]
    lines.append("    hottest frames (self time):")
    lines += [f"      {100 * k / total:5.1f}%  {f}" for f, k in own.most_common(n)]
    return lines


# ---------------------------------------------------------------------------------------------
# scenario 1: many Modbus TCP devices
# ---------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    devices: int
    tags: int
    window: float  # scenario 1 measured seconds
    warmup: float
    rtu_window: float  # scenario 2 measured seconds
    rtu_warmup: float  # must cover offline_after (3) polls of the absent unit


FULL = Sizes(devices=500, tags=30, window=25, warmup=6, rtu_window=20, rtu_warmup=5)
QUICK = Sizes(devices=100, tags=30, window=10, warmup=4, rtu_window=8, rtu_warmup=4.5)


def sim_processes(devices: int) -> int:
    """Simulator processes for scenario 1: up to 250 ports each, at most the CPUs (>= 1)."""
    return max(1, min(len(os.sched_getaffinity(0)), math.ceil(devices / 250)))


def phase_window(times: list[float], period: float = INTERVAL) -> float:
    """Seconds (within each period) in which 98% of the readings are taken: the polls' phase spread."""
    if len(times) < 3:
        return float("nan")
    phases = sorted(t % period for t in times)
    gaps = [(phases[(i + 1) % len(phases)] - p) % period for i, p in enumerate(phases)]
    start = (gaps.index(max(gaps)) + 1) % len(phases)  # the phase after the widest gap
    rotated = sorted((p - phases[start]) % period for p in phases)
    return percentile(rotated, 99) - percentile(rotated, 1)


def scenario_tcp(
    work: Path, broker: pl.Mosquitto, sub: Subscriber, sz: Sizes, profile_s: float, spread: float = 0.0
) -> dict[str, Any]:
    from drivers.modbus.config import ModbusConfig
    from drivers.modbus.plan import plan

    gw = "mb-tcp"
    try:  # the same points as the profile the agent gets: what plan() makes of them
        planned = plan(
            ModbusConfig.model_validate(
                {"id": "d0000", "driver": "modbus", "host": "127.0.0.1", "points": bench_points(sz.tags)}
            )
        )
    except ValueError as exc:
        raise RuntimeError(f"scenario 1: {sz.tags} tags make no valid device: {exc}") from exc
    nproc = sim_processes(sz.devices)
    per = [sz.devices // nproc + (1 if i < sz.devices % nproc else 0) for i in range(nproc)]
    print(
        f"   starting {nproc} simulator process(es): {', '.join(map(str, per))} ports, one pymodbus"
        f" ModbusTcpServer and one unit per port, {sz.tags} tags each",
        flush=True,
    )
    sims: list[SimProcess] = []
    seed = 0
    for i, count in enumerate(per):
        sims.append(
            SimProcess(
                work,
                f"sim-tcp-{i}",
                "--sim-tcp",
                {
                    "count": count,
                    "host": "127.0.0.1",
                    "points": bench_points(sz.tags),
                    "period": INTERVAL,
                    "seed": seed,
                    "total": sz.devices,
                    "spread": spread,
                },
            )
        )
        seed += count
    ports = [p for s in sims for p in s.ready["ports"]]
    devices_yaml = "".join(
        f"  - {{id: d{i:04d}, driver: modbus, host: 127.0.0.1, port: {port}, profile: {TAG_PROFILE}, interval: 1s}}\n"
        for i, port in enumerate(ports)
    )
    agent = Agent(work, gw, broker.port, devices_yaml, {TAG_PROFILE: tag_profile_yaml(sz.tags)})
    mosq = pl.Proc(broker.pid)
    profile: list[str] | str | None = None
    try:
        t_start = time.monotonic()
        agent.wait_ready(90)
        print(
            f"   agent delivering {time.monotonic() - t_start:.1f} s after start; warm-up {sz.warmup:.0f} s,"
            f" then {sz.window:.0f} s measured",
            flush=True,
        )
        time.sleep(sz.warmup)
        with WindowSampler(agent) as smp:
            c0, t0 = agent.counters(), time.time()
            cpu0, m0, s0 = agent.ps.cpu(), mosq.cpu(), sub.ps.cpu()
            sim_cpu0, req0 = [s.ps.cpu() for s in sims], [s.requests() for s in sims]
            time.sleep(sz.window)
            c1, t1 = agent.counters(), time.time()
            cpu1, m1, s1 = agent.ps.cpu(), mosq.cpu(), sub.ps.cpu()
            sim_cpu1, req1 = [s.ps.cpu() for s in sims], [s.requests() for s in sims]
        rss_end, hwm = agent.ps.rss(), agent.ps.hwm()
        if c0 is None or c1 is None:
            raise RuntimeError(f"cannot read the agent's buffer {agent.db}")
        if not agent.alive():
            raise RuntimeError(f"agent exited during the window; its log:\n{tail(agent.log, 25)}")
        dead = [s.name for s in sims if not s.alive()]
        if dead:
            raise RuntimeError(f"simulator(s) {', '.join(dead)} exited; log:\n{tail(work / f'{dead[0]}.log')}")
        if profile_s > 0:
            print(
                f"   profiling the agent with py-spy for {profile_s:.0f} s (after the window, not in the figures)",
                flush=True,
            )
            profile = py_spy_top(agent, profile_s, work / "agent-profile.txt")
        reload_s: float | None = agent.stop_producing()
        drained = agent.drain(20)
    finally:
        stopped = agent.stop()
        time.sleep(0.6)  # the simulators write their counters every 0.5 s
        served_total = sum(s.requests()[1] for s in sims)
        for s in sims:
            s.stop()
    sub.settle()
    recs = sub.take(gw)
    dt = t1 - t0
    readings = [r for r in recs if r.type == METER]
    taken = [r for r in readings if t0 <= r.time < t1]  # readings taken in the window
    recv_in = [r for r in readings if t0 <= r.recv < t1]  # readings delivered in the window
    lat = sorted((r.recv - r.time) * 1000 for r in taken)
    per_device = Counter(r.device for r in taken)
    expected = dt / INTERVAL
    statuses = [r for r in recs if r.type == STATUS and not r.extra.startswith("online")]
    served = request_rate(req0, req1)
    polls = len(taken) / dt
    acked_1s = smp.acked_per_second()
    res: dict[str, Any] = {
        "devices": sz.devices,
        "tags": sz.tags,
        "window": dt,
        "sim_procs": nproc,
        "offered_polls": sz.devices / INTERVAL,
        "offered_tags": sz.devices * sz.tags / INTERVAL,
        "polls": polls,
        "tags_taken": sum(r.n for r in taken) / dt,
        "tags_delivered": sum(r.n for r in recv_in) / dt,
        "readings_delivered": len(recv_in) / dt,
        "tags_per_reading": (sum(r.n for r in taken) / len(taken)) if taken else float("nan"),
        "planned": len(planned),
        "plan": [(q.table, q.address, q.count, len(q.points)) for q in planned],
        "served": served,
        "served_total": served_total,
        "readings_total": len(readings),
        "req_per_poll": served_total / len(readings) if readings else float("nan"),
        "acked_min_1s": min(acked_1s, default=float("nan")),
        "acked_max_1s": max(acked_1s, default=float("nan")),
        "rows_max": smp.rows_max(),
        "steal": smp.steal_pct(),
        "spread": spread,
        "cpu": (cpu1 - cpu0) / dt * 100,
        "rss_end": rss_end,
        "rss_peak": max(smp.peak, rss_end),
        "hwm": hwm,
        "mosq_cpu": (m1 - m0) / dt * 100,
        "sub_cpu": (s1 - s0) / dt * 100,
        "sim_cpu": sum(b - a for a, b in zip(sim_cpu0, sim_cpu1, strict=True)) / dt * 100,
        "accepted_rate": (c1["accepted"] - c0["accepted"]) / dt,
        "acked_rate": (c1["delivered"] - c0["delivered"]) / dt,
        "backlog": (c0["rows"], c1["rows"]),
        "n_lat": len(lat),
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": lat[-1] if lat else float("nan"),
        "phase": phase_window([r.time for r in taken]),
        "short_devices": sum(1 for i in range(sz.devices) if per_device.get(f"d{i:04d}", 0) < expected * 0.9),
        "silent_devices": sum(1 for i in range(sz.devices) if per_device.get(f"d{i:04d}", 0) == 0),
        "not_online": len(statuses),
        "status_sample": [f"{r.device} {r.extra}" for r in statuses[:3]],
        "drained": drained,
        **losses(recs, agent.db),
        "problems": agent.problems(),
        "profile": profile,
        "stop": agent.stop_note(reload_s, stopped),
        "stop_ok": reload_s is not None and "killed" not in stopped,
    }
    return res


def print_tcp(r: dict[str, Any]) -> None:
    full = r["devices"] * r["tags"] >= TARGET_TAGS
    print(
        f"   offered    : {r['devices']} devices x {r['tags']} tags every {INTERVAL:.0f} s = {r['offered_tags']:,.0f}"
        f" tags/s ({r['offered_polls']:,.0f} polls/s); window {r['window']:.1f} s"
        + (
            f"; device k of N answers after k/N x {r['spread'] * 1000:.0f} ms (--response-spread)"
            if r["spread"]
            else "; every simulator answers at once"
        )
    )
    print(
        f"   polls/s    : {r['polls']:,.1f} readings taken/s ({100 * r['polls'] / r['offered_polls']:.1f}% of"
        f" offered); {r['tags_per_reading']:.1f} tags per reading; devices below 90% of their polls:"
        f" {r['short_devices']} (none at all: {r['silent_devices']})"
    )
    verdict = ("met" if r["tags_delivered"] >= 0.99 * TARGET_TAGS else "NOT met") if full else "n/a at this size"
    print(
        f"   tags/s     : {r['tags_delivered']:,.0f} delivered to MQTT (received in the window;"
        f" {r['tags_taken']:,.0f} taken) -- target all {TARGET_TAGS:,} tags/s: {verdict}"
    )
    print(
        f"   requests   : {r['planned']} planned per device per poll by plan() (table, address, count, points):"
        f" {r['plan']}; measured {r['req_per_poll']:.2f} per poll ({r['served_total']:,} requests served by the"
        f" simulators / {r['readings_total']:,} readings over the whole run; {r['served']:,.0f} requests/s in"
        " the window)"
    )
    if full:
        cpu_note = f"target <= {TARGET_CPU:.0f}%: {'met' if r['cpu'] <= TARGET_CPU else 'NOT met'}"
    elif r["offered_tags"] >= TARGET_TAGS / 10:
        cpu_note = (
            f"~{r['cpu'] * TARGET_TAGS / max(1.0, r['tags_delivered']):.0f}% at {TARGET_TAGS:,} tags/s"
            " if linear (extrapolated, not measured)"
        )
    else:
        cpu_note = f"target <= {TARGET_CPU:.0f}% at {TARGET_TAGS:,} tags/s: n/a at this size"
    print(
        f"   agent CPU  : {r['cpu']:.1f}% of one core ({cpu_note}; {NEURON});"
        f" {r['cpu'] / 100 * 1e6 / max(1.0, r['tags_delivered']):.1f} µs per tag,"
        f" {r['cpu'] / 100 * 1e3 / max(1.0, r['polls']):.2f} ms per poll"
    )
    print(
        f"   agent RSS  : {pl.mb(r['rss_end']):.1f} MB at the end, peak sampled {pl.mb(r['rss_peak']):.1f} MB,"
        f" VmHWM {pl.mb(r['hwm']):.1f} MB"
    )
    verdict = ("met" if r["p99"] <= TARGET_P99 else "NOT met") if full else "n/a at this size"
    print(
        f"   latency    : read -> subscriber p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms,"
        f" max {r['max']:.1f} ms over {r['n_lat']:,} readings (target p99 <= {TARGET_P99:.0f} ms: {verdict});"
        f" 98% of readings are taken within a {1000 * r['phase']:.0f} ms slice of each second"
    )
    print(
        f"   uplink     : PUBACKed per ~1 s span in the window: min {fmt(r['acked_min_1s'])}, max"
        f" {fmt(r['acked_max_1s'])} ev/s (a min far below {r['offered_polls']:,.0f} means a stall); most buffered"
        f" rows sampled {r['rows_max']:,}; machine CPU steal {fmt(r['steal'], '.1f')}%"
    )
    print(
        f"   others     : mosquitto {r['mosq_cpu']:.0f}%, subscriber {r['sub_cpu']:.0f}%, simulators"
        f" {r['sim_cpu']:.0f}% ({r['sim_procs']} processes) of one core; buffer accepted {r['accepted_rate']:,.0f}"
        f" ev/s, acked {r['acked_rate']:,.0f} ev/s, backlog {r['backlog'][0]:,} > {r['backlog'][1]:,} rows"
    )
    print(
        f"   losses     : lost {r['lost']} (devices with seq gaps: {r['devices_with_gaps']}), duplicates"
        f" {r['duplicates']}, dropped by the buffer {r['dropped']}, undrained {r['undrained']};"
        f" {r['received']:,} events received; status events other than online: {r['not_online']}"
        + (f" e.g. {'; '.join(r['status_sample'])}" if r["status_sample"] else "")
    )
    print(f"   stopping   : {r['stop']}")
    for p in r["problems"][:5]:
        print(f"    agent log: {p}")
    if len(r["problems"]) > 5:
        print(f"    agent log: ... {len(r['problems']) - 5} more WARNING/ERROR lines")
    if isinstance(r["profile"], list):
        print("   py-spy (agent, after the window): " + r["profile"][0])
        for line in r["profile"][1:]:
            print(f"  {line}")
    elif r["profile"]:
        print(f"   py-spy: {r['profile']}")
    print(flush=True)


# ---------------------------------------------------------------------------------------------
# scenario 2: one RS-485 bus, 8 units, one absent
# ---------------------------------------------------------------------------------------------
def rtu_devices(port: str) -> tuple[str, Any, list[dict[str, Any]], dict[str, Any]]:
    """The devices' YAML, one device's config, and the profile's points and defaults for the simulator."""
    from drivers.modbus import profiles
    from drivers.modbus.config import ModbusConfig

    prof = profiles.load(RTU_PROFILE)
    points = list(prof["points"])
    keep = {p["name"] for p in sorted(points, key=lambda p: (p.get("table", "holding"), p["address"]))[:RTU_POINTS]}
    exclude = sorted(p["name"] for p in points if p["name"] not in keep)
    raw = {
        "driver": "modbus",
        "transport": "rtu",
        "serial": {"port": port, "baudrate": RTU_BAUD},
        "profile": RTU_PROFILE,
        "exclude": exclude,
        "timeout": f"{RTU_TIMEOUT * 1000:.0f}ms",
        "interval": "1s",
    }
    yaml = "".join(f"  - {json.dumps({'id': f'rs485-u{u}', **raw, 'unit': u})}\n" for u in range(1, RTU_UNITS + 1))
    config = ModbusConfig.model_validate({"id": "rs485-u1", **raw, "unit": 1})
    return yaml, config, points, prof.get("defaults") or {}


def scenario_rtu(work: Path, broker: pl.Mosquitto, sub: Subscriber, sz: Sizes) -> dict[str, Any]:
    from drivers.modbus.bus import inter_frame_gap
    from drivers.modbus.plan import plan

    gw = "mb-rtu"
    # The planned request of one device, to emulate its time on the wire at 9600 8N1.
    _, config, points, defaults = rtu_devices("/dev/null")
    requests = plan(config)
    frame_bytes = [8 + 5 + 2 * q.count for q in requests]  # request 8 B; answer: unit fc n data crc
    wire = [b * RTU_BITS_PER_CHAR / RTU_BAUD for b in frame_bytes]
    gap = inter_frame_gap(RTU_BAUD, RTU_BITS_PER_CHAR)
    sim = SimProcess(
        work,
        "sim-rtu",
        "--sim-rtu",
        {
            "units": list(range(1, RTU_UNITS)),
            "points": points,
            "baudrate": RTU_BAUD,
            "byte_order": defaults.get("byte_order", "big"),
            "word_order": defaults.get("word_order", "big"),
            "wire_delay": sum(wire) / len(wire),
            "period": INTERVAL,
        },
    )
    port = sim.ready["port"]
    devices_yaml, _, _, _ = rtu_devices(port)
    agent = Agent(work, gw, broker.port, devices_yaml)
    try:
        agent.wait_ready(60)
        time.sleep(sz.rtu_warmup)
        t0, cpu0, req0 = time.time(), agent.ps.cpu(), sim.requests()
        time.sleep(sz.rtu_window)
        t1, cpu1, req1 = time.time(), agent.ps.cpu(), sim.requests()
        rss = agent.ps.rss()
        if not agent.alive():
            raise RuntimeError(f"agent exited during the window; its log:\n{tail(agent.log, 25)}")
        if not sim.alive():
            raise RuntimeError(f"the RTU simulator exited; its log:\n{tail(sim.log)}")
        reload_s: float | None = agent.stop_producing()
        agent.drain(10)
    finally:
        stopped = agent.stop()
        sim.stop()
    sub.settle()
    recs = sub.take(gw)
    dt = t1 - t0
    first = min((r.time for r in recs), default=float("nan"))  # about when the devices started
    units: list[dict[str, Any]] = []
    for u in range(1, RTU_UNITS + 1):
        dev = f"rs485-u{u}"
        times = sorted(r.time for r in recs if r.device == dev and r.type == METER)
        inside = [t for t in times if t0 <= t < t1]
        # periods between consecutive readings, for readings taken in the window
        periods = [b - a for a, b in itertools.pairwise(times) if t0 <= b < t1]
        status = [r for r in recs if r.device == dev and r.type == STATUS and r.time < t1]
        after = [r for r in recs if r.device == dev and r.time >= t1]  # while the agent was being stopped
        last = status[-1] if status else None
        units.append(
            {
                "device": dev,
                "unit": u,
                "readings": len(inside),
                "mean": sum(periods) / len(periods) if periods else float("nan"),
                "min": min(periods, default=float("nan")),
                "max": max(periods, default=float("nan")),
                "missed": sum(1 for p in periods if p > 1.5 * INTERVAL),
                "status": last.extra if last else "-",
                "status_at": (last.time - first) if last else float("nan"),
                "status_events": [r.extra for r in status],
                "after_status": [r.extra for r in after if r.type == STATUS],
                "readings_all": sum(1 for r in recs if r.device == dev and r.type == METER),
                "readings_after": sum(1 for r in after if r.type == METER),
            }
        )
    good = units[:-1]
    per_poll_busy = sum(w + 2 * gap for w in wire)  # one good unit's poll on the line
    return {
        "window": dt,
        "units": units,
        "frame_bytes": frame_bytes,
        "wire_ms": [1000 * w for w in wire],
        "gap_ms": 1000 * gap,
        "points": len(config.points),
        "requests": len(requests),
        "busy": (RTU_UNITS - 1) * per_poll_busy + RTU_TIMEOUT + 8 * RTU_BITS_PER_CHAR / RTU_BAUD,
        "served": (req1[1] - req0[1]) / (req1[0] - req0[0]) if req1[0] > req0[0] else float("nan"),
        "cpu": (cpu1 - cpu0) / dt * 100,
        "rss": rss,
        "good_mean": sum(u["mean"] for u in good) / len(good),
        "good_max": max(u["max"] for u in good),
        "good_min": min(u["min"] for u in good),
        "good_missed": sum(u["missed"] for u in good),
        **losses(recs, agent.db),
        "problems": agent.problems(),
        "stop": agent.stop_note(reload_s, stopped),
        "stop_ok": reload_s is not None and "killed" not in stopped,
    }


def show_status(extra: str) -> str:
    """``offline:timeout`` -> ``offline (timeout)``; ``online:`` -> ``online``."""
    status, _, reason = extra.partition(":")
    return f"{status} ({reason})" if reason else (status or "-")


def print_rtu(r: dict[str, Any]) -> None:
    print(
        f"   bus        : {RTU_UNITS} units on one pty at {RTU_BAUD} baud 8N1, {r['points']} points each from"
        f" {RTU_PROFILE} ({r['requests']} request of {r['frame_bytes']} bytes incl. the answer), timeout"
        f" {RTU_TIMEOUT * 1000:.0f} ms, interval {INTERVAL:.0f} s; units 1-{RTU_UNITS - 1} present,"
        f" unit {RTU_UNITS} absent (never answers)"
    )
    print(
        f"   note       : the kernel does not enforce a pty's baudrate; the simulator delays each answer by"
        f" the frames' time on a real {RTU_BAUD} baud line ({', '.join(f'{w:.1f}' for w in r['wire_ms'])} ms"
        f" per request) and the driver adds its 3.5-character gap ({r['gap_ms']:.1f} ms)"
    )
    print(
        f"   line budget: ~{1000 * r['busy']:.0f} ms busy per second ({RTU_UNITS - 1} answered polls + one"
        f" {RTU_TIMEOUT * 1000:.0f} ms timeout): {100 * r['busy']:.0f}% of the line; the simulator saw"
        f" {fmt(r['served'], '.1f')} requests/s on the line (the absent unit's included)"
    )
    print(f"   {'device':<10} {'readings':>8} {'period mean':>11} {'min':>7} {'max':>7} {'missed':>6}  status")
    for u in r["units"]:
        print(
            f"   {u['device']:<10} {u['readings']:>8} {fmt(u['mean'], '.3f'):>9} s {fmt(u['min'], '.3f'):>7}"
            f" {fmt(u['max'], '.3f'):>7} {u['missed']:>6}  {show_status(u['status'])}"
            + (
                f", {fmt(u['status_at'], '.1f')} s after the bus's first reading; status events:"
                f" {' -> '.join(map(show_status, u['status_events'])) or 'none'}"
                if u["unit"] == RTU_UNITS
                else ""
            )
        )
    absent = r["units"][-1]
    ok = abs(r["good_mean"] - INTERVAL) < 0.02 and r["good_missed"] == 0
    print(
        f"-> units 1-{RTU_UNITS - 1}: mean period {r['good_mean']:.3f} s (min {r['good_min']:.3f}, max"
        f" {r['good_max']:.3f}), missed slots {r['good_missed']}: "
        f"{'they keep their 1 s period' if ok else 'they do NOT keep their 1 s period'};"
        f" unit {RTU_UNITS}: {show_status(absent['status'])} ({absent['readings']} readings); agent CPU"
        f" {r['cpu']:.1f}%, RSS {pl.mb(r['rss']):.1f} MB; lost {r['lost']}, duplicates {r['duplicates']}"
    )
    stray = absent["readings_all"]
    print(
        f"   stopping   : {r['stop']}; after the window the absent unit {RTU_UNITS} reported"
        f" {' -> '.join(map(show_status, absent['after_status'])) or 'no status change'} and"
        f" {absent['readings_after']} reading(s)"
        + (
            f" -- {stray} reading(s) in all were attributed to a unit that does not exist (see bench/README.md,"
            " 'Known effects')"
            if stray
            else ""
        )
    )
    for p in r["problems"][:4]:
        print(f"    agent log: {p}")
    print(flush=True)


# ---------------------------------------------------------------------------------------------
# scenario 3: coalescing of the shipped profiles
# ---------------------------------------------------------------------------------------------
def scenario_coalescing() -> dict[str, Any]:
    from drivers.modbus import profiles
    from drivers.modbus.config import ModbusConfig
    from drivers.modbus.plan import plan

    rows: list[dict[str, Any]] = []  # per profile: its planning figures, or the error that stopped it
    shipped = {n: p for n, p in profiles.available().items() if p.parent == profiles.BUILTIN_DIR}
    for name in sorted(shipped):
        try:
            cfg = ModbusConfig.model_validate({"id": "x", "driver": "modbus", "host": "127.0.0.1", "profile": name})
            reqs = plan(cfg)
            # A unit that refuses reads through unlisted registers gets each such read split at its
            # holes by the driver (drivers.modbus.plan.split): the same as planning with max_gap 0.
            strict = plan(cfg.model_copy(update={"max_gap": 0}))
        except Exception as exc:
            rows.append({"profile": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            continue
        rows.append(
            {
                "profile": name,
                "points": len(cfg.points),
                "requests": len(reqs),
                "strict": len(strict),
                "max_registers": cfg.max_registers,
                "max_gap": cfg.max_gap,
            }
        )
    ok = [r for r in rows if "error" not in r]
    points = sum(r["points"] for r in ok)
    requests = sum(r["requests"] for r in ok)
    return {
        "rows": rows,
        "points": points,
        "requests": requests,
        "ratio": points / requests if requests else float("nan"),
        "strict_ratio": points / sum(r["strict"] for r in ok) if ok else float("nan"),
        "dir": str(profiles.BUILTIN_DIR),
    }


def print_coalescing(r: dict[str, Any]) -> None:
    print(
        f"   {'profile':<22} {'points':>6} {'requests':>8} {'ratio':>6}   limits (max_registers, max_gap)"
        "   requests if holes are refused"
    )
    for row in r["rows"]:
        if "error" in row:
            print(f"   {row['profile']:<22} cannot plan: {row['error']}")
            continue
        ratio = row["points"] / row["requests"]
        print(
            f"   {row['profile']:<22} {row['points']:>6} {row['requests']:>8} {ratio:>5.1f}x"
            f"   {row['max_registers']:>3}, {row['max_gap']:<27} {row['strict']:>3}"
        )
    verdict = "met" if r["ratio"] >= COALESCE_TARGET else "NOT met"
    print(
        f"-> total {r['points']} points in {r['requests']} requests: {r['ratio']:.1f}x (target >="
        f" {COALESCE_TARGET:.0f}x: {verdict}); {r['strict_ratio']:.1f}x on units that refuse every read through"
        " unlisted registers (the driver splits those reads at the first poll)\n",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    sz = QUICK if args.quick else FULL
    if args.devices is not None:
        sz.devices = args.devices
    if args.tags is not None:
        sz.tags = args.tags
    if args.seconds is not None:
        sz.window = sz.rtu_window = float(args.seconds)
    only = set(args.only.split(",")) if args.only else {"1", "2", "3"}
    unknown = only - {"1", "2", "3"}
    if unknown:
        sys.exit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))} (1, 2, 3)")
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-modbus-", dir=args.workdir))
    started = time.monotonic()
    info = [*pl.machine_info(work), f"modbus    : {pymodbus_version()}"]
    print("\n".join(info), flush=True)
    print(
        f"mode      : {'quick' if args.quick else 'full'}; scenario 1: {sz.devices} devices x {sz.tags} tags,"
        f" {sz.window:.0f} s window; scenario 2: {sz.rtu_window:.0f} s window\n",
        flush=True,
    )
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    broker: pl.Mosquitto | None = None
    sub: Subscriber | None = None
    failed = True
    try:
        if only & {"1", "2"}:
            broker = Mosquitto(work / "broker")
            broker.start()
            sub = Subscriber(work, broker.port)
        if "1" in only and broker is not None and sub is not None:
            mark = time.monotonic()
            print(
                f"== 1. Neuron's workload: {sz.devices} Modbus TCP devices x {sz.tags} tags every 1 s"
                f" ({sz.devices * sz.tags:,} tags/s); deadband unset, default buffer; each device its own"
                " port (its own connection)",
                flush=True,
            )
            results["1"] = scenario_tcp(work, broker, sub, sz, args.profile, args.response_spread / 1000)
            print_tcp(results["1"])
            timings["1"] = time.monotonic() - mark
        if "2" in only and broker is not None and sub is not None:
            mark = time.monotonic()
            print(
                f"== 2. one RS-485 bus: {RTU_UNITS} units at {RTU_BAUD} baud on a pseudo-terminal, one"
                f" absent; {sz.rtu_window:.0f} s measured after {sz.rtu_warmup:.0f} s",
                flush=True,
            )
            results["2"] = scenario_rtu(work, broker, sub, sz)
            print_rtu(results["2"])
            timings["2"] = time.monotonic() - mark
        if sub is not None:
            sub.close()
            sub = None
        if broker is not None:
            broker.stop()
            broker = None
        if "3" in only:
            mark = time.monotonic()
            results["3"] = scenario_coalescing()
            print(
                "== 3. coalescing: requests planned (drivers.modbus.plan.plan) for every shipped profile"
                f" ({results['3']['dir']})",
                flush=True,
            )
            print_coalescing(results["3"])
            timings["3"] = time.monotonic() - mark
        failed = False
    finally:
        if sub is not None:
            sub.close()
        if broker is not None:
            broker.stop()
        pl._kill_children()
        if args.keep or failed:
            print(f"(kept {work}{'' if args.keep else ': logs of the failed run'})", flush=True)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    summary(results, info, time.monotonic() - started, timings)
    return 0


def summary(results: dict[str, Any], info: list[str], elapsed: float, timings: dict[str, float]) -> None:
    per = ", ".join(f"{k}: {v:.0f} s" for k, v in sorted(timings.items()))
    lines = ["", "=" * 100, "SUMMARY (bench/modbus.py)", "=" * 100, *info, f"elapsed   : {elapsed:.0f} s ({per})", ""]
    if "1" in results:
        r = results["1"]
        full = r["devices"] * r["tags"] >= TARGET_TAGS
        tgt = "" if full else "  [smaller than the target workload]"
        lines += [
            f"1. {r['devices']} TCP devices x {r['tags']} tags @1 s ({r['offered_tags']:,.0f} tags/s offered,"
            f" {r['window']:.0f} s window){tgt}",
            f"   polls/s {r['polls']:,.1f} of {r['offered_polls']:,.0f}   tags/s delivered {r['tags_delivered']:,.0f}"
            f"   (target {TARGET_TAGS:,})",
            f"   requests per poll: planned {r['planned']}, measured {r['req_per_poll']:.2f}"
            + (f"   [--response-spread {r['spread'] * 1000:.0f} ms]" if r["spread"] else ""),
            f"   agent CPU {r['cpu']:.1f}% of one core (target <= {TARGET_CPU:.0f}%; {NEURON})"
            f"   RSS {pl.mb(r['rss_end']):.1f} MB (peak {pl.mb(r['rss_peak']):.1f} MB)",
            f"   read-to-publish p50 {r['p50']:.1f} ms  p95 {r['p95']:.1f} ms  p99 {r['p99']:.1f} ms  max"
            f" {r['max']:.1f} ms   (target p99 <= {TARGET_P99:.0f} ms)",
            f"   lost {r['lost']}  duplicates {r['duplicates']}  dropped {r['dropped']}  devices with seq gaps"
            f" {r['devices_with_gaps']}   (mosquitto {r['mosq_cpu']:.0f}%, subscriber {r['sub_cpu']:.0f}%,"
            f" simulators {r['sim_cpu']:.0f}% of one core; CPU steal {fmt(r['steal'], '.1f')}%; PUBACKed per 1 s"
            f" min {fmt(r['acked_min_1s'])})",
        ]
        if not r["stop_ok"]:
            lines.append(f"   STOP PROBLEM: {r['stop']}")
    if "2" in results:
        r = results["2"]
        absent = r["units"][-1]
        lines += [
            f"2. RS-485 bus, {RTU_UNITS} units @{RTU_BAUD} baud (pty: baudrate not enforced by the kernel; wire"
            f" time emulated), timeout {RTU_TIMEOUT * 1000:.0f} ms",
            f"   units 1-{RTU_UNITS - 1}: period mean {r['good_mean']:.3f} s, min {r['good_min']:.3f} s, max"
            f" {r['good_max']:.3f} s, missed slots {r['good_missed']}   (target: 1 s kept)",
            f"   unit {RTU_UNITS} (absent): {show_status(absent['status'])}, {absent['readings']} readings in the"
            f" window; agent CPU {r['cpu']:.1f}%; lost {r['lost']}",
        ]
        if absent["readings_all"]:
            lines.append(
                f"   ABSENT UNIT {RTU_UNITS} PUBLISHED {absent['readings_all']} READING(S) (another unit's"
                f" answer), {absent['readings_after']} of them while the agent was being stopped"
            )
        if not r["stop_ok"]:
            lines.append(f"   STOP PROBLEM: {r['stop']}")
    if "3" in results:
        r = results["3"]
        each = ", ".join(
            f"{row['profile']} {row['points']}/{row['requests']}" for row in r["rows"] if "error" not in row
        )
        lines += [
            f"3. coalescing: {r['points']} points / {r['requests']} requests = {r['ratio']:.1f}x"
            f" (target >= {COALESCE_TARGET:.0f}x)   [{each}]"
        ]
    print("\n".join(lines), flush=True)


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number > 0."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--subscriber":
        port, out, cid, ready = sys.argv[2:6]
        subscriber_main(int(port), Path(out), cid, Path(ready))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-tcp":
        return sim_tcp_main(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-rtu":
        return sim_rtu_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 devices, shorter windows (about 35 s)")
    parser.add_argument("--only", help="comma-separated scenarios to run: 1, 2, 3 (default all)")
    parser.add_argument("--devices", type=positive(int), help="scenario 1: Modbus TCP devices (default 500; quick 100)")
    parser.add_argument("--tags", type=positive(int), help="scenario 1: tags (registers) per device (default 30)")
    parser.add_argument(
        "--seconds", type=positive(float), help="measured window of scenarios 1 and 2 (default 25 and 20 s)"
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="S",
        help="scenario 1: after the window, sample the agent with py-spy for S seconds and print the hottest frames",
    )
    parser.add_argument(
        "--response-spread",
        type=float,
        default=0,
        metavar="MS",
        help="scenario 1: device k of N answers k/N x MS milliseconds late (spreads the agent's work"
        " over the second instead of one burst; read-to-publish latency starts after the answer)",
    )
    parser.add_argument("--workdir", help="where to put buffers and logs (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, buffers, profiles)")
    args = parser.parse_args()
    pl.exit_cleanly()
    try:
        return run(args)
    except RuntimeError as exc:
        print(f"\nbench: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
