#!/usr/bin/env python3
"""Chaos benchmark: the real agent under crashes, broker flaps, lost PUBACKs, a full disk and a truncated buffer.

Everything is real: a Mosquitto broker with persistence (the subscriber's queue survives its restarts), the agent as
a subprocess (``python -m agent run -c site.yaml``) with virtual devices in three delivery classes, and an independent
counting subscriber process (persistent session, QoS 1) that logs every event it receives. Four phases, each with
its own gateway id and buffer file:

1. crash loop: SIGKILL the agent at uniformly random times, restart it at once, while the broker is flapped now and
   then; after a long outage the kill lands during the backlog drain;
2. lost PUBACKs: the agent talks to the broker through an MQTT-aware proxy that drops 5 % of the PUBACKs;
3. foreign disk filler: the buffer on a 16 MiB tmpfs, another process fills the disk during an outage;
4. live truncation: buffer.db cut to a third of its size while the agent runs, during an outage.

It prints figures next to their targets; it asserts nothing and exits 0 whenever it could measure. See
bench/README.md ("Chaos benchmark") for what each figure means.

    .venv/bin/python bench/chaos.py            # full run (200 kills), about 6 minutes on 2 vCPUs (8 at most)
    .venv/bin/python bench/chaos.py --quick    # every phase, smaller (40 kills), about 2 minutes
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import errno
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file is run: the broker and process helpers of the pipeline benchmark are reused
# as they are. The fault proxy lives with the tests (tests/mqtt_proxy.py, no pytest in it): the repository root goes
# on the path for it.
import pipeline as pl

ROOT = pl.ROOT
HERE = Path(__file__).resolve()
TOPIC_PREFIX = pl.TOPIC_PREFIX
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Delivery classes of the event types (agent/contract/events.py DEFAULT_PRIORITIES) and of the priority numbers in the
# buffer; the bench's crosswalk sensor is moved to class alarm per device (see DEVICE_CLASS).
CLASS_OF_TYPE = {
    "city.meter.reading": "telemetry",
    "city.parking.occupancy": "event",
    "city.crosswalk.presence": "event",
    "city.device.status": "alarm",
    "city.gateway.health": "alarm",
    "city.camera.snapshot": "media",
}
CLASS_OF_PRIORITY = {2: "alarm", 1: "event", 0: "telemetry", -1: "media"}
HEALTH = "city.gateway.health"

# Targets printed next to the figures (the brief; R5, R8, R10 in /work/shared/reliability-targets.md).
TARGET_DUP_P95 = 20  # duplicates per kill, p95
TARGET_STALL = 10.0  # s: no delivery stall longer than this after any single fault
TARGET_PUBACK_DUP = 5.5  # % duplicates under 5 % lost PUBACKs (R10)
TARGET_RESUME = 1.0  # s: commits resume this soon after the disk has room again (R8)
LIVE_BACKLOG = 100  # rows: a buffer above this with the broker up is "draining" (live: ~0-20 rows)

_children: list[subprocess.Popen[bytes]] = []


# ---------------------------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Child side of every spawn: SIGKILL when the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    _children[:] = [p for p in _children if p.poll() is None]  # the crash loop makes hundreds
    proc = subprocess.Popen(args, preexec_fn=_die_with_parent, cwd=ROOT, **kw)
    _children.append(proc)
    return proc


def kill_children() -> None:
    for proc in _children:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
    pl._kill_children()  # the brokers


def kill_children_but(*keep: Any) -> None:
    """After a phase failed: kill its agent, filler ... but not the broker and the subscriber."""
    pids = {getattr(k, "pid", None) for k in keep} | {getattr(getattr(k, "proc", None), "pid", None) for k in keep}
    for proc in _children:
        if proc.poll() is None and proc.pid not in pids:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)


def ro_connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)


def dropped_total(counters: dict[str, int]) -> int:
    """Every ``dropped_*`` counter, whatever reasons this buffer version has."""
    return sum(v for k, v in counters.items() if k.startswith("dropped_"))


def read_counters(db: Path) -> dict[str, int] | None:
    """The buffer's ``counters`` table, read-only (None if unreadable right now)."""
    if not db.exists():
        return None
    try:
        con = ro_connect(db)
        try:
            counters = {str(k): int(v) for k, v in con.execute("SELECT name, value FROM counters")}
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return counters if "accepted" in counters and "delivered" in counters else None


def backlog(counters: dict[str, int]) -> int:
    return counters["accepted"] - counters["delivered"] - dropped_total(counters)


@dataclass
class DbState:
    """One read-only look at a buffer file."""

    counters: dict[str, int]
    rows: int  # count(*) of the outbox
    by_class: dict[str, int]
    seqs: dict[tuple[str, str | None], int] = field(default_factory=dict)  # (device, epoch or None) -> last seq
    left: set[tuple[str, int]] = field(default_factory=set)  # (device, seq) still buffered
    check: str | None = None  # PRAGMA quick_check, when asked
    epoch: str | None = None  # the file's sequence epoch (a `meta` table), if this buffer version has one
    t: float = field(default_factory=time.time)  # when it was read

    @property
    def identity(self) -> int:
        """accepted - delivered - buffered - dropped_*: 0 when the accounting holds."""
        return self.counters["accepted"] - self.counters["delivered"] - self.rows - dropped_total(self.counters)


def read_state(db: Path, *, full: bool = False, check: bool = False) -> DbState | str:
    """Counters, rows (and with ``full`` the sequences and the rows left); an error text if unreadable."""
    if not db.exists():
        return "no buffer file"
    try:
        con = ro_connect(db)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check")] if check else None
            counters = {str(k): int(v) for k, v in con.execute("SELECT name, value FROM counters")}
            by_prio = dict(con.execute("SELECT priority, count(*) FROM outbox GROUP BY priority"))
            st = DbState(
                counters,
                sum(by_prio.values()),
                {CLASS_OF_PRIORITY.get(int(p), str(p)): int(n) for p, n in by_prio.items()},
                check="; ".join(problems[:3]) if problems is not None else None,
            )
            if full:
                cur = con.execute("SELECT * FROM sequences")
                cols = [d[0].lower() for d in cur.description]
                dev_i, seq_i = cols.index("device"), cols.index("seq")
                ep_i = next((i for i, c in enumerate(cols) if "epoch" in c), None)  # a seqepoch column, if any
                for row in cur:
                    st.seqs[(str(row[dev_i]), None if ep_i is None else str(row[ep_i]))] = int(row[seq_i])
                st.left = {(str(d), int(s)) for d, s in con.execute("SELECT device, seq FROM outbox")}
                with contextlib.suppress(sqlite3.Error):
                    row = con.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
                    st.epoch = str(row[0]) if row else None
        finally:
            con.close()
    except (sqlite3.Error, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if "accepted" not in st.counters:
        return "no accepted counter"
    return st


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# ---------------------------------------------------------------------------------------------
# child processes: the subscriber and the disk filler
# ---------------------------------------------------------------------------------------------
def subscriber_main(port: int, out: Path, client_id: str, ready: Path) -> None:
    """``chaos.py --subscriber``: persistent session, QoS 1; one line per event received.

    Line: receive time, gateway, device, seqepoch ("" if absent), seq, id, time, type, the MQTT DUP flag of the
    message (set when the *broker* re-sends it to us after a reconnect), and for health events a JSON digest.
    """

    def digest(e: dict[str, Any]) -> str:
        if e.get("type") != HEALTH or not isinstance(e.get("data"), dict):
            return ""
        d = e["data"]
        return json.dumps(
            {
                "u": d.get("uptime_s"),
                "acc": d.get("accounting"),
                "d": d.get("dropped_since_last_report"),
                "bc": (d.get("buffer") or {}).get("by_class"),
            },
            separators=(",", ":"),
        )

    def line(now: float, e: dict[str, Any], msg: Any) -> str:
        epoch = e.get("seqepoch")
        return (
            f"{now:.6f}\t{e.get('gateway')}\t{e.get('device')}\t{'' if epoch is None else epoch}\t{e.get('seq')}"
            f"\t{e.get('id')}\t{e.get('time')}\t{e.get('type')}\t{int(bool(msg.dup))}\t{digest(e)}\n"
        )

    pl.run_event_subscriber(port, out, client_id, ready, line)


def filler_main(path: Path, ready: Path) -> None:
    """``chaos.py --filler``: write ``path`` until ENOSPC (1 MiB, then 64 KiB, then 4 KiB writes), then hold it."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (1 << 20, 64 << 10, 4096, 512):
            chunk = os.urandom(size)
            while True:
                try:
                    n = f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n or 0
                if not n or n < size:
                    break
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    ready.write_text(f"{written}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# the subscriber's log, parsed
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Rec:
    recv: float
    dev: str
    epoch: str
    seq: int
    id: str
    time: float  # the event's `time`, epoch seconds (ms resolution)
    type: str
    dup: bool  # MQTT DUP flag: the broker re-sent it to the subscriber
    extra: str  # health digest (JSON) or ""


class Subscriber:
    """The parent's handle on the subscriber process and its log (all gateways)."""

    def __init__(self, work: Path, port: int) -> None:
        self.out = work / "sub.log"
        self.ready = work / "sub.ready"
        self.out.touch()
        self.proc = spawn(
            [sys.executable, str(HERE), "--subscriber", str(port), str(self.out), f"chaos-sub-{os.getpid()}",
             str(self.ready)]
        )  # fmt: skip
        pl.wait_for(self.ready.exists, 20, "the subscriber to subscribe")
        self.offset = 0
        self.by_gw: dict[str, list[Rec]] = defaultdict(list)

    def poll(self) -> None:
        with self.out.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        parse = pl._parse_time
        for line in data[:end].decode(errors="replace").splitlines():
            parts = line.split("\t", 9)
            if len(parts) != 10:
                continue
            recv, gw, dev, epoch, seq, eid, t, typ, dup, extra = parts
            try:
                rec = Rec(float(recv), dev, epoch, int(seq), eid, parse(t), typ, dup == "1", extra)
            except ValueError:
                continue
            self.by_gw[gw].append(rec)

    def settle(self, quiet: float = 0.8, timeout: float = 20.0) -> None:
        """Wait until the log has stopped growing for ``quiet`` seconds."""
        pl.wait_quiet(self.out, quiet, timeout)
        self.poll()

    def recs(self, gw: str) -> list[Rec]:
        self.poll()
        return self.by_gw[gw]

    def first_live(self, gw: str, since: float, until: float, agent: Agent | None = None) -> float | None:
        """Receive time of the first event made at or after ``since`` (a new live event), waiting until ``until``.

        Returns None at ``until``, or as soon as ``agent`` has exited.
        """
        done = 0
        while True:
            recs = self.recs(gw)
            for r in recs[done:]:
                if r.time >= since and r.recv >= since:
                    return r.recv
            done = len(recs)
            if time.time() >= until or (agent is not None and not agent.alive()):
                return None
            time.sleep(0.1)

    def close(self) -> None:
        pl._stop(self.proc, signal.SIGTERM, 5)


# ---------------------------------------------------------------------------------------------
# the agent under test
# ---------------------------------------------------------------------------------------------
METERS = 4  # class telemetry: virtual meters polled every 20 ms
METER_INTERVAL_MS = 20
DEVICE_CLASS = {"xw1": {"city.crosswalk.presence": "alarm"}}  # per-device override in the site file


def devices_yaml(rate: int) -> str:
    """~``rate`` ev/s of meter readings (telemetry), 10 ev/s of parking (event), 5 ev/s of crosswalk made class
    alarm, a flaky meter whose status flaps (alarm), plus the gateway's health every second (alarm)."""
    burst = max(1, round(rate * METER_INTERVAL_MS / 1000 / METERS))
    meters = "".join(
        f"  - {{id: m{i:02d}, driver: virtual, kind: meter, interval: {METER_INTERVAL_MS}ms, burst: {burst},"
        f" seed: {i}}}\n"
        for i in range(METERS)
    )
    return (
        meters + "  - {id: bay1, driver: virtual, kind: parking, bay: B1, interval: 100ms, seed: 10}\n"
        "  - {id: xw1, driver: virtual, kind: crosswalk, area: north, interval: 200ms, seed: 11,"
        " priorities: {city.crosswalk.presence: alarm}}\n"
        "  - {id: fl1, driver: virtual, kind: meter, interval: 250ms, fail_every: 4, offline_after: 1, seed: 12}\n"
    )


def class_of(dev: str, typ: str) -> str:
    return DEVICE_CLASS.get(dev, {}).get(typ) or CLASS_OF_TYPE.get(typ, "event")


class Agent:
    """``python -m agent run -c site.yaml`` as a subprocess; spawned again after every kill."""

    def __init__(self, work: Path, gateway: str, port: int, rate: int, db: Path | None = None) -> None:
        self.dir = work / gateway
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gateway, self.port, self.rate = gateway, port, rate
        self.db = db or self.dir / "buffer.db"
        self.config = self.dir / "site.yaml"
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawns = 0

    def site(self, devices: bool) -> str:
        # Reconnect backoff 200 ms -> 2 s (shipped: 1 s -> 30 s) so a stall measures the agent, not its backoff.
        return (
            f"gateway: {{id: {self.gateway}, site: chaos, health_interval: 1s}}\n"
            "uplink:\n"
            f"  mqtt: {{host: 127.0.0.1, port: {self.port}, topic_prefix: {TOPIC_PREFIX},"
            " reconnect_min: 200ms, reconnect_max: 2s}\n"
            f"buffer: {{path: {self.db}}}\n" + (f"devices:\n{devices_yaml(self.rate)}" if devices else "devices: []\n")
        )

    def spawn(self) -> float:
        self.config.write_text(self.site(devices=True))
        self.spawns += 1
        with self.log.open("ab") as log:
            log.write(f"=== chaos: start #{self.spawns} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = spawn([sys.executable, "-m", "agent", "run", "-c", str(self.config)], stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
        return time.time()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        assert self.proc is not None
        with contextlib.suppress(OSError):
            self.proc.send_signal(signal.SIGKILL)
        t = time.time()
        self.proc.wait(10)
        return t

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM; SIGKILL after ``timeout``. The exit code (negative: killed by that signal)."""
        if self.proc is None:
            return None
        pl._stop(self.proc, signal.SIGTERM, timeout)
        return self.proc.returncode

    def stop_producing(self) -> None:
        """Reload a config without devices (SIGHUP): production stops, delivery goes on (health events too)."""
        self.config.write_text(self.site(devices=False))
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def counters(self) -> dict[str, int] | None:
        return read_counters(self.db)

    def wait_delivering(self, timeout: float = 30.0) -> bool:
        """Until the ``delivered`` counter moves (the agent is up and connected)."""
        base: int | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            c = self.counters()
            if c is not None:
                if base is None:
                    base = c["delivered"]
                elif c["delivered"] > base:
                    return True
            time.sleep(0.05)
        return False

    def drain(self, timeout: float) -> float | None:
        """Seconds until the backlog is down to the odd health event (<= 2 rows, twice), or None."""
        t0 = time.monotonic()
        low = 0
        while time.monotonic() - t0 < timeout and self.alive():
            c = self.counters()
            low = low + 1 if c is not None and backlog(c) <= 2 else 0
            if low >= 2:
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def log_lines(self, pattern: str) -> list[str]:
        with contextlib.suppress(OSError):
            rx = re.compile(pattern)
            return [ln for ln in self.log.read_text(errors="replace").splitlines() if rx.search(ln)]
        return []


# ---------------------------------------------------------------------------------------------
# faults and the analysis of what the subscriber received
# ---------------------------------------------------------------------------------------------
@dataclass
class Fault:
    t: float  # when it began
    kind: str  # kill, broker, pubacks, disk, truncate
    recover: float  # from then on new live events should flow (kill: the kill itself; the restart is at once)
    note: str = ""
    stall: float | None = None  # first new live event received - recover
    censored: str = ""  # why no stall was measured
    dups: int = 0  # duplicates first seen after it (before the next fault)


@dataclass
class Analysis:
    received: int = 0
    unique: int = 0
    dups_agent: int = 0  # the agent sent it again (DUP flag clear)
    dups_broker: int = 0  # the broker re-sent it to the subscriber (DUP flag set)
    conflicts: int = 0  # same (device, seqepoch, seq) with a different event id: a reused key
    reorders: int = 0
    reorder_examples: list[str] = field(default_factory=list)
    missing: int = 0  # seqs issued, never received, not buffered
    missing_by_dev: dict[str, int] = field(default_factory=dict)
    reported_drops: int = 0  # from the health events' dropped_since_last_report
    drops_by_class: dict[str, int] = field(default_factory=dict)
    counter_drops: int = 0  # sum of the dropped_* counters (final buffer file)
    not_accepted: int = 0  # refused before acceptance (health events, summed over agent runs)
    lost_uncounted: int = 0
    epochs: dict[str, set[str]] = field(default_factory=dict)  # device -> seqepochs seen


def analyse(recs: list[Rec], faults: list[Fault], final: DbState | None, snapshots: list[DbState]) -> Analysis:
    """Duplicates, reorders, loss and the stall after each fault, from one gateway's records."""
    a = Analysis(received=len(recs))
    recs = sorted(recs, key=lambda r: r.recv)
    first: dict[tuple[str, str, int], Rec] = {}
    top: dict[tuple[str, str, str], int] = {}  # (device, epoch, class) -> highest first-occurrence seq
    disturb = sorted((f.t, i) for i, f in enumerate(faults))
    dtimes = [t for t, _ in disturb]
    health: list[Rec] = []
    for r in recs:
        key = (r.dev, r.epoch, r.seq)
        seen = first.get(key)
        a.epochs.setdefault(r.dev, set()).add(r.epoch)
        if seen is not None:
            if seen.id != r.id:
                a.conflicts += 1
            elif r.dup:
                a.dups_broker += 1
            else:
                a.dups_agent += 1
                fi = bisect.bisect_right(dtimes, r.recv) - 1
                if fi >= 0:
                    faults[disturb[fi][1]].dups += 1
            continue
        first[key] = r
        if r.type == HEALTH:
            health.append(r)
        ck = (r.dev, r.epoch, class_of(r.dev, r.type))
        if r.seq < top.get(ck, 0):
            a.reorders += 1
            if len(a.reorder_examples) < 5:
                a.reorder_examples.append(f"{r.dev}/{ck[2]} seq {r.seq} after {top[ck]}")
        else:
            top[ck] = r.seq
    a.unique = len(first)

    # Loss: per (device, epoch), seqs issued, never received and not still buffered. A device's epochs are taken
    # in the order of their events' `time`; the first counts from seq 1, a later one from where the one before it
    # ended (numbering goes on across an epoch change) unless its seqs went back (then from its lowest received).
    # Sequences read from the file count for the file's epoch (its `meta` table), else for the device's epoch
    # current at the time of the read.
    got: dict[tuple[str, str], set[int]] = defaultdict(set)
    for dev, epoch, seq in first:
        got[(dev, epoch)].add(seq)
    born: dict[tuple[str, str], float] = {}
    timeline: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in first.values():
        k = (r.dev, r.epoch)
        born[k] = min(born.get(k, math.inf), r.time)
        timeline[r.dev].append((r.time, r.epoch))
    for tl in timeline.values():
        tl.sort()
    issued: dict[tuple[str, str], int] = {k: max(v) for k, v in got.items()}
    for st in [*snapshots, *([final] if final else [])]:
        for (dev, row_epoch), seq in st.seqs.items():
            known = row_epoch if row_epoch is not None else st.epoch
            if known is None:
                tl = timeline.get(dev, [])
                i = bisect.bisect_right(tl, (st.t, chr(0x10FFFF))) - 1
                known = tl[i][1] if i >= 0 else (tl[-1][1] if tl else "")
            k = (dev, known)
            issued[k] = max(issued.get(k, 0), seq)
            born.setdefault(k, math.inf)
    left = final.left if final else set()
    by_dev: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for (dev, epoch), t in born.items():
        by_dev[dev].append((t, epoch))
    for dev, epochs in by_dev.items():
        prev_end = 0
        for _t, epoch in sorted(epochs):
            have = got.get((dev, epoch), set())
            n = issued.get((dev, epoch), 0)
            start = prev_end + 1 if not have or min(have) > prev_end else min(have)
            miss = sum(1 for s in range(start, n + 1) if s not in have and (dev, s) not in left)
            if miss:
                a.missing_by_dev[dev] = a.missing_by_dev.get(dev, 0) + miss
            prev_end = max(prev_end, n)
    a.missing = sum(a.missing_by_dev.values())

    # What the agent says it dropped (health events, first copies only) and refused (not_accepted, per run).
    reported: Counter[str] = Counter()
    runs: list[int] = []
    prev_up = math.inf
    for r in sorted(health, key=lambda r: r.time):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            d = json.loads(r.extra)
            for item in d.get("d") or []:
                reported[item["device"]] += int(item["count"])
                cls = class_of(item["device"], item["type"])
                a.drops_by_class[f"{cls}/{item['reason']}"] = a.drops_by_class.get(f"{cls}/{item['reason']}", 0) + int(
                    item["count"]
                )
            up = float(d.get("u") or 0)
            na = int((d.get("acc") or {}).get("not_accepted") or 0)
            if up < prev_up or not runs:
                runs.append(na)
            else:
                runs[-1] = max(runs[-1], na)
            prev_up = up
    a.reported_drops = sum(reported.values())
    a.not_accepted = sum(runs)
    a.counter_drops = dropped_total(final.counters) if final else 0
    uncovered = sum(max(0, m - reported.get(dev, 0)) for dev, m in a.missing_by_dev.items())
    pool = max(0, a.counter_drops - a.reported_drops) + a.not_accepted
    a.lost_uncounted = max(0, uncovered - pool)

    # Stall after each fault: the first event made at or after its end, if no other fault came first.
    recvs = [r.recv for r in recs]
    for i, f in enumerate(faults):
        if f.recover != f.recover:  # nan: never ended
            f.censored = "never ended"
            continue
        j = bisect.bisect_left(recvs, f.recover)
        d = next((recs[x].recv for x in range(j, len(recs)) if recs[x].time >= f.recover), None)
        if d is None:
            f.censored = "no new event received before the end"
            continue
        other = next(
            (
                g
                for k, g in enumerate(faults)
                if k != i and (f.recover < g.t <= d or (g.kind == "broker" and g.t < d and g.recover > f.recover))
            ),
            None,
        )
        if other is not None:
            f.censored = (
                f"{other.kind} at +{other.t - f.recover:.1f} s came first"
                if other.t > f.recover
                else "a broker outage overlapped it"
            )
            continue
        f.stall = d - f.recover
    return a


def stalls(faults: list[Fault]) -> tuple[Fault | None, int]:
    measured = [f for f in faults if f.stall is not None]
    worst = max(measured, key=lambda f: f.stall or 0.0) if measured else None
    return worst, len(faults) - len(measured)


def pctl(values: list[float], q: float) -> float:
    return pl.percentile(sorted(values), q)


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# ---------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    kills: int
    run: tuple[float, float]  # s an agent runs before its SIGKILL (uniform)
    up: tuple[float, float]  # s the broker stays up between flaps (uniform)
    short: tuple[float, float]  # s of a short broker outage
    long: tuple[float, float]  # s of a long outage (a backlog to drain)
    long_every: int  # every Nth flap is long
    puback_s: float  # s of 5 % lost PUBACKs
    puback_wait: float  # s to wait after healing for live events
    p3_pre: float  # s of outage before the disk is filled
    p3_hold: float  # s the disk stays full
    p4_pre: float  # s of outage before the clean restart and the truncation
    recover_cap: float  # s to wait for live events after a fault ends
    drain_cap: float  # s to wait for the final drain
    warmup: float


FULL = Sizes(kills=200, run=(0.3, 2.0), up=(4, 10), short=(0.5, 3), long=(6, 10), long_every=3, puback_s=30,
             puback_wait=75, p3_pre=15, p3_hold=15, p4_pre=8, recover_cap=30, drain_cap=30, warmup=3)  # fmt: skip
QUICK = Sizes(kills=40, run=(0.3, 2.0), up=(3, 6), short=(0.5, 2), long=(5, 7), long_every=2, puback_s=15,
              puback_wait=25, p3_pre=8, p3_hold=6, p4_pre=4, recover_cap=20, drain_cap=20, warmup=2)  # fmt: skip


@dataclass
class Ctx:
    work: Path
    broker: pl.Mosquitto
    sub: Subscriber
    sz: Sizes
    rate: int
    rng: random.Random


@dataclass
class Phase:
    name: str
    gateway: str
    seconds: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    final: DbState | None = None
    final_error: str = ""
    snapshots: list[DbState] = field(default_factory=list)
    an: Analysis | None = None
    lines: list[str] = field(default_factory=list)  # phase-specific figures
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.final.counters["accepted"] if self.final else 0


def finish(ctx: Ctx, ph: Phase, agent: Agent) -> None:
    """Stop producing, drain, SIGTERM; read the buffer; analyse what the subscriber got."""
    drained = None
    if agent.alive():
        agent.stop_producing()
        drained = agent.drain(ctx.sz.drain_cap)
    code = agent.stop()
    st = read_state(agent.db, full=True, check=True)
    if isinstance(st, DbState):
        ph.final = st
    else:
        ph.final_error = st
    ctx.sub.settle()
    ph.an = analyse(ctx.sub.recs(ph.gateway), ph.faults, ph.final, ph.snapshots)
    ph.extra["drain_s"] = drained
    ph.extra["exit"] = code
    tracebacks = agent.log_lines(r"Traceback|CRITICAL|uplink error")
    if tracebacks:
        ph.lines.append(f"agent log: {len(tracebacks)} traceback/critical/uplink-error line(s), first: {tracebacks[0]}")
    corrupt = agent.log_lines(r"corrupt")
    if corrupt:
        ph.lines.append(f"agent log: {len(corrupt)} line(s) about a corrupt buffer, first: {corrupt[0][:220]}")


def phase_crash(ctx: Ctx) -> Phase:
    """1. SIGKILL at random times, restart at once; broker flaps; some kills land during a backlog drain."""
    sz, rng, broker = ctx.sz, ctx.rng, ctx.broker
    ph = Phase("1 crash loop", "chaos-p1")
    agent = Agent(ctx.work, ph.gateway, broker.port, ctx.rate)
    st: dict[str, Any] = {"outage": None, "end": 0.0, "next": time.time() + rng.uniform(*sz.up), "flaps": 0,
                          "drain_from": None, "long": False}  # fmt: skip

    def tick() -> None:
        now = time.time()
        if st["outage"] is None and now >= st["next"]:
            long = st["flaps"] % sz.long_every == sz.long_every - 1
            dur = rng.uniform(*(sz.long if long else sz.short))
            t = time.time()
            broker.stop()
            f = Fault(t, "broker", math.nan, f"{'long' if long else 'short'} outage {dur:.1f} s")
            ph.faults.append(f)
            st.update(outage=f, end=t + dur, flaps=st["flaps"] + 1, long=long)
        elif st["outage"] is not None and now >= st["end"]:
            broker.start()
            st["outage"].recover = time.time()
            if st["long"]:
                st["drain_from"] = st["outage"].recover
            st.update(outage=None, next=time.time() + rng.uniform(*sz.up))

    kills: list[dict[str, Any]] = []
    exits: list[str] = []
    t0 = time.time()
    progress = max(1, sz.kills // 10)
    for k in range(sz.kills):
        tick()
        t_spawn = agent.spawn()
        deadline = t_spawn + rng.uniform(*sz.run)
        drain_kill = False
        peak: int | None = None  # backlog when the drain kill was armed
        kill_below = 0.0
        while True:
            tick()
            now = time.time()
            if not agent.alive():
                exits.append(
                    f"start #{agent.spawns} exited by itself with {agent.proc.returncode if agent.proc else '?'}"
                )
                break
            if st["drain_from"] is not None and st["outage"] is None and not drain_kill:
                drain_kill, deadline = True, max(deadline, now + 6.0)  # this kill goes into the drain
            if drain_kill:
                # Kill once a random 20-80 % of the backlog has been delivered (a drain takes about a second).
                c = agent.counters()
                if c is not None:
                    rows = backlog(c)
                    if peak is None:
                        peak, kill_below = rows, rows * rng.uniform(0.2, 0.8)
                    elif peak <= LIVE_BACKLOG or rows <= kill_below:
                        break
                if now >= deadline:
                    break
                time.sleep(0.01)
            else:
                if now >= deadline:
                    break
                time.sleep(min(0.02, deadline - now))
        before = agent.counters() if agent.alive() else None
        up = st["outage"] is None
        t_kill = agent.kill() if agent.alive() else time.time()
        ph.faults.append(Fault(t_kill, "kill", t_kill, f"#{k + 1} after {t_kill - t_spawn:.2f} s"))
        if drain_kill:
            st["drain_from"] = None
        after = read_state(agent.db, check=True)
        kills.append({
            "run": t_kill - t_spawn,
            "rows": backlog(before) if before else None,
            "drain": bool(up and before and backlog(before) > LIVE_BACKLOG),
            "drain_kill": drain_kill,
            "up": up,
            "check": after.check if isinstance(after, DbState) else after,
            "identity": after.identity if isinstance(after, DbState) else None,
        })  # fmt: skip
        if (k + 1) % progress == 0:
            print(f"   {k + 1:>4} kills, {time.time() - t0:5.0f} s, {st['flaps']} broker flaps", flush=True)
    if st["outage"] is not None:
        broker.start()
        st["outage"].recover = time.time()
    last_kill = ph.faults[-1].t if ph.faults else time.time()
    agent.spawn()
    ctx.sub.first_live(ph.gateway, last_kill, time.time() + sz.recover_cap, agent)
    time.sleep(2.0)
    finish(ctx, ph, agent)
    n = len(kills)
    checks_ok = sum(1 for x in kills if x["check"] == "ok")
    unreadable = sum(1 for x in kills if x["identity"] is None)
    ident_ok = sum(1 for x in kills if x["identity"] == 0)
    runs = [x["run"] for x in kills]
    per_kill = [float(f.dups) for f in ph.faults if f.kind == "kill"]
    kill_faults = [f for f in ph.faults if f.kind == "kill"]
    worst_kills = sorted(zip(kill_faults, kills, strict=False), key=lambda fk: -fk[0].dups)[:3]
    restarted = [f.stall for f in ph.faults if f.kind == "kill" and f.stall is not None]
    cut_short = [f for f in ph.faults if f.kind == "kill" and f.stall is None]
    ph.extra.update(kills=n, per_kill=per_kill, flaps=st["flaps"], exits=exits)
    ph.lines += [
        f"kills {n} (runtime before SIGKILL min {min(runs, default=0):.2f} / median {pctl(runs, 50):.2f} / max"
        f" {max(runs, default=0):.2f} s); broker flaps {st['flaps']}"
        f" ({sum(1 for f in ph.faults if f.kind == 'broker' and 'long' in f.note)} long: a backlog to drain);"
        f" kills that landed in a drain (backlog > {LIVE_BACKLOG} rows, broker up) {sum(x['drain'] for x in kills)}"
        f" (aimed: {sum(x['drain_kill'] for x in kills)})",
        f"after each kill (read-only): quick_check ok {checks_ok}/{n}, accounting identity exact {ident_ok}/{n}"
        + (f" ({unreadable} not readable read-only)" if unreadable else "")
        + (f"; first problem: {next(x['check'] for x in kills if x['check'] != 'ok')}" if checks_ok < n else ""),
        f"kill -> first new event of the restarted agent: {len(restarted)} measured, p50"
        f" {fmt(pctl(restarted, 50) if restarted else None, '.2f')} / p95"
        f" {fmt(pctl(restarted, 95) if restarted else None, '.2f')} / max {fmt(max(restarted, default=None), '.2f')} s;"
        f" {len(cut_short)} not measurable (the next kill or a broker outage came first)",
        "most duplicates after one kill: "
        + "; ".join(
            f"{f.dups} after kill {f.note} (backlog {fmt(k['rows'])} rows at the kill,"
            f" broker {'up' if k['up'] else 'down'})"
            for f, k in worst_kills
        ),
        f"agent exits without a kill: {len(exits)}" + (f" ({exits[0]})" if exits else ""),
    ]
    return ph


def phase_pubacks(ctx: Ctx) -> Phase:
    """2. 5 % of PUBACKs dropped by the proxy for a while: the longest delivery stall."""
    from tests.mqtt_proxy import MqttProxy

    sz, broker = ctx.sz, ctx.broker
    ph = Phase("2 lost PUBACKs", "chaos-p2")
    proxy = MqttProxy(broker.port).start()
    agent = Agent(ctx.work, ph.gateway, proxy.port, ctx.rate)
    try:
        agent.spawn()
        agent.wait_delivering()
        time.sleep(sz.warmup)
        t_on = time.time()
        proxy.drop_pubacks(0.05, seed=ctx.rng.randrange(1 << 30))
        f = Fault(t_on, "pubacks", math.nan, f"5 % PUBACKs dropped for {sz.puback_s:.0f} s")
        ph.faults.append(f)
        time.sleep(sz.puback_s)
        proxy.drop_pubacks(0.0)
        f.recover = time.time()
        live = ctx.sub.first_live(ph.gateway, f.recover, f.recover + sz.puback_wait, agent)
        if live is not None:
            time.sleep(2.0)
        t_end = time.time()
        stats = proxy.stats()
        finish(ctx, ph, agent)
    finally:
        proxy.stop()
    recvs = sorted(r.recv for r in ctx.sub.recs(ph.gateway) if t_on <= r.recv <= t_end)
    points = [t_on, *recvs, t_end]
    gaps = [(b - a_, a_) for a_, b in itertools.pairwise(points)]
    gap, at = max(gaps) if gaps else (0.0, t_on)
    an = ph.an
    assert an is not None
    dup_pct = 100 * (an.dups_agent + an.dups_broker) / max(1, an.unique)
    ph.extra.update(gap=gap, gap_open=at + gap >= t_end - 1e-6 and live is None, dup_pct=dup_pct)
    ph.lines += [
        f"proxy: {stats.pubacks_dropped} of {stats.pubacks_seen} PUBACKs dropped, {stats.connections} connection(s)"
        f" (reconnects {max(0, stats.connections - 1)})",
        f"longest gap between received events while producing: {gap:.1f} s, from +{at - t_on:.1f} s after the drops"
        f" began{' (still open at the end of the wait)' if ph.extra['gap_open'] else ''};"
        f" new live events after healing: {'+' + fmt(live - f.recover, '.1f') + ' s' if live else 'NONE'}"
        f" (waited {sz.puback_wait:.0f} s)",
        f"duplicates {an.dups_agent + an.dups_broker} = {dup_pct:.1f} % of unique events (R10 target <="
        f" {TARGET_PUBACK_DUP} %)",
    ]
    return ph


def phase_disk(ctx: Ctx) -> Phase:
    """3. Buffer on a 16 MiB tmpfs; a foreign process fills the disk during an outage, then its file is removed."""
    sz, broker = ctx.sz, ctx.broker
    ph = Phase("3 disk filler", "chaos-p3")
    if os.geteuid() != 0:
        ph.lines.append("SKIPPED: mounting a tmpfs needs root")
        return ph
    disk = ctx.work / "p3-disk"
    mount_tmpfs(disk, "16m")
    samples: list[tuple[float, dict[str, int], int]] = []  # (t, rows by class, free bytes)
    stop = threading.Event()
    agent = Agent(ctx.work, ph.gateway, broker.port, ctx.rate, db=disk / "buffer.db")

    def sampler() -> None:
        while not stop.wait(0.25):
            s = read_state(agent.db)
            vfs = os.statvfs(disk)
            if isinstance(s, DbState):
                samples.append((time.time(), s.by_class, vfs.f_bavail * vfs.f_frsize))

    thread = threading.Thread(target=sampler, daemon=True)
    filler: subprocess.Popen[bytes] | None = None
    filled = 0
    resume: float | None = None
    try:
        agent.spawn()
        agent.wait_delivering()
        time.sleep(sz.warmup)
        t_down = time.time()
        broker.stop()
        thread.start()
        time.sleep(sz.p3_pre)
        ready = ctx.work / "filler.ready"
        target = disk / "foreign.bin"
        filler = spawn([sys.executable, str(HERE), "--filler", str(target), str(ready)])
        pl.wait_for(ready.exists, 60, "the filler to fill the disk")
        t_full = time.time()
        filled = int(ready.read_text().strip() or 0)
        f = Fault(t_full, "disk", math.nan, f"disk filled ({filled / 2**20:.1f} MiB) during an outage")
        ph.faults.append(f)
        time.sleep(sz.p3_hold)
        alive_full = agent.alive()
        pl._stop(filler, signal.SIGTERM, 5)
        target.unlink()
        t_free = time.time()
        c0 = agent.counters()
        while time.time() - t_free < 10 and c0 is not None:
            c = agent.counters()
            if c is not None and c["accepted"] > c0["accepted"]:
                resume = time.time() - t_free
                break
            time.sleep(0.05)
        time.sleep(2.0)
        broker.start()
        f.recover = time.time()
        ctx.sub.first_live(ph.gateway, f.recover, f.recover + sz.recover_cap, agent)
        time.sleep(2.0)
        alive = agent.alive()
        stop.set()
        thread.join(5)
        finish(ctx, ph, agent)
    finally:
        stop.set()
        if filler is not None:
            pl._stop(filler, signal.SIGKILL, 5)
        agent.stop()
        umount(disk)
    an = ph.an
    assert an is not None

    # Alarm/event events missing: gaps in the seqs of the devices that make only alarm/event events (the gateway's
    # health, the crosswalk sensor, the parking bay). Whether any went while telemetry was still buffered:
    # - evicted: between two samples taken with the broker down (nothing delivered), the alarm+event rows went down
    #   although telemetry rows older than the interval survived it (more telemetry left than the meters can have
    #   added in the interval): eviction is oldest-lowest-class first, so these had to go first;
    # - refused: between two health events, not_accepted grew while both reported telemetry rows buffered.
    recs = ctx.sub.recs(ph.gateway)
    by_dev: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in recs:
        by_dev[(r.dev, r.epoch)].add(r.seq)
    high_gaps = 0
    for (dev, _epoch), seqs in by_dev.items():
        if dev in ("gateway", "xw1", "bay1"):
            ordered = sorted(seqs)
            high_gaps += sum(hi - lo - 1 for lo, hi in itertools.pairwise(ordered))
    down = [x for x in samples if t_down <= x[0] <= f.recover]
    evicted_high = evicted_intervals = 0
    for (t0, c0, _), (t1, c1, _) in itertools.pairwise(down):
        fell = c0.get("alarm", 0) + c0.get("event", 0) - c1.get("alarm", 0) - c1.get("event", 0)
        could_add = 2 * ctx.rate * (t1 - t0) + 50
        if fell > 0 and c1.get("telemetry", 0) > could_add:
            evicted_high += fell
            evicted_intervals += 1
    refused_high = 0
    prev: tuple[int, int] | None = None
    for r in sorted((r for r in recs if r.type == HEALTH and r.extra), key=lambda r: r.time):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            d = json.loads(r.extra)
            na = int((d.get("acc") or {}).get("not_accepted") or 0)
            tel = int((d.get("bc") or {}).get("telemetry") or 0)
            if prev is not None and na > prev[0] and prev[1] > 0 and tel > 0:
                refused_high += na - prev[0]
            prev = (na, tel)
    refused_log = agent.log_lines(r"not stored")
    tel_peak = max((x[1].get("telemetry", 0) for x in samples), default=0)
    tel_at_full = next((x[1].get("telemetry", 0) for x in samples if x[0] >= t_full), None)
    free_min = min((x[2] for x in samples), default=None)
    unitemised = max(0, an.counter_drops - an.reported_drops)
    ph.extra.update(evicted_high=evicted_high, refused_high=refused_high, resume=resume, alive=alive and alive_full)
    ph.lines += [
        f"outage began {t_full - t_down:.0f} s before the filler; filler wrote {filled / 2**20:.1f} MiB until ENOSPC"
        f" (free space seen by the sampler down to {fmt(free_min and free_min / 1024, ',.0f')} KiB);"
        f" disk full for {sz.p3_hold:.0f} s; agent alive throughout: {'yes' if alive and alive_full else 'NO'}",
        f"telemetry rows buffered: peak {tel_peak:,}, when the disk became full {fmt(tel_at_full)};"
        f" commits resumed {fmt(resume, '.2f')} s after the file was removed (R8 target <= {TARGET_RESUME:.0f} s)",
        f"drops itemised in health events by class/reason: {dict(sorted(an.drops_by_class.items())) or 'none'};"
        f" dropped_* counters {an.counter_drops:,}"
        + (f" ({unitemised:,} never itemised: the health events reporting them were lost)" if unitemised else "")
        + f"; not_accepted (refused) {an.not_accepted:,} ({len(refused_log)} 'not stored' log line(s))",
        f"alarm/event events missing (seq gaps of gateway health, crosswalk[alarm], parking[event]): {high_gaps:,};"
        f" evicted while older telemetry stayed buffered: {evicted_high:,} (in {evicted_intervals} sample"
        f" intervals); readings refused while telemetry was buffered: {refused_high:,} (a refused commit takes"
        " every class in it; targets 0)",
    ]
    if refused_log:
        ph.lines.append(f"first refusal logged: {refused_log[0][:200]}")
    return ph


def phase_truncate(ctx: Ctx) -> Phase:
    """4. buffer.db truncated to a third while the agent runs during an outage; time to live events again."""
    sz, broker = ctx.sz, ctx.broker
    ph = Phase("4 live truncation", "chaos-p4")
    agent = Agent(ctx.work, ph.gateway, broker.port, ctx.rate)
    restarts: list[str] = []
    agent.spawn()
    agent.wait_delivering()
    time.sleep(sz.warmup)
    broker.stop()
    time.sleep(sz.p4_pre)
    # A clean stop checkpoints the WAL into buffer.db, so the cut hits the events, not an empty main file.
    agent.stop()
    agent.spawn()
    pl.wait_for(lambda: agent.counters() is not None, 20, "the agent to reopen its buffer")
    time.sleep(2.0)
    snap = read_state(agent.db, full=True)
    if isinstance(snap, DbState):
        ph.snapshots.append(snap)
    size = agent.db.stat().st_size
    wal = Path(f"{agent.db}-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    os.truncate(agent.db, size // 3)
    t_cut = time.time()
    f = Fault(t_cut, "truncate", math.nan, f"buffer.db {size:,} -> {size // 3:,} bytes (WAL {wal_size:,})")
    ph.faults.append(f)
    time.sleep(2.0)
    alive_cut = agent.alive()
    broker.start()
    f.recover = time.time()
    live = None
    for _ in range(3):
        live = ctx.sub.first_live(ph.gateway, f.recover, time.time() + sz.recover_cap, agent)
        if live is not None:
            break
        if agent.alive():
            restarts.append(f"no live event {sz.recover_cap:.0f} s after the broker came back: restarted it")
            agent.stop()
        else:
            restarts.append(f"agent exited with {agent.proc.returncode if agent.proc else '?'}: restarted it")
        agent.spawn()
    time.sleep(2.0)
    finish(ctx, ph, agent)
    quarantined = sorted(p.name for p in agent.dir.glob("buffer.db.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
    ph.extra.update(live=live and live - f.recover, restarts=restarts)
    old = snap.counters if isinstance(snap, DbState) else {}
    ph.lines += [
        f"cut buffer.db from {size:,} to {size // 3:,} bytes (WAL {wal_size:,} bytes) with"
        f" {backlog(old) if old else '?'} rows buffered; agent alive 2 s later: {'yes' if alive_cut else 'NO'}",
        f"new live events {fmt(live and live - f.recover, '.1f')} s after the broker came back"
        f" (target <= {TARGET_STALL:.0f} s); restarts needed: {len(restarts)}"
        + (f" ({'; '.join(restarts)})" if restarts else ""),
        f"quarantined files: {', '.join(quarantined) or 'none'}; counters before the cut: accepted"
        f" {old.get('accepted', '?')}, delivered {old.get('delivered', '?')} (the final file's counters restart from"
        " what was salvaged)",
    ]
    return ph


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def phase_report(ph: Phase) -> list[str]:
    an = ph.an
    out = [f"== {ph.name} ({ph.gateway}, {ph.seconds:.0f} s)"]
    out += [f"   {ln}" for ln in ph.lines]
    if an is None:
        return out
    worst, censored = stalls(ph.faults)
    f = ph.final
    out += [
        f"   accepted {fmt(f.counters['accepted'] if f else None)},"
        f" delivered {fmt(f.counters['delivered'] if f else None)}, buffered {fmt(f.rows if f else None)},"
        f" dropped_* {fmt(dropped_total(f.counters) if f else None)}"
        f" ({', '.join(f'{k} {v}' for k, v in sorted((f.counters if f else {}).items()) if k.startswith('dropped_'))})"
        + (f"; final buffer NOT readable: {ph.final_error}" if f is None else f"; quick_check {f.check}"),
        f"   received {an.received:,} messages, {an.unique:,} unique events; duplicates: {an.dups_agent:,} re-sent by"
        f" the agent, {an.dups_broker:,} re-sent by the broker (DUP flag); same key with another id: {an.conflicts}",
        f"   seqs issued but never received nor buffered: {an.missing:,}"
        + (f" ({', '.join(f'{d} {n}' for d, n in sorted(an.missing_by_dev.items()))})" if an.missing_by_dev else "")
        + f"; counted: dropped_* {an.counter_drops:,} (health reports {an.reported_drops:,}), refused"
        f" (not_accepted) {an.not_accepted:,} -> lost uncounted {an.lost_uncounted:,}",
        f"   reorders within a class: {an.reorders}"
        + (f" (e.g. {'; '.join(an.reorder_examples)})" if an.reorders else ""),
        "   longest stall after a fault: "
        + (f"{worst.stall:.2f} s ({worst.kind} {worst.note})" if worst and worst.stall is not None else "-")
        + f"; {len(ph.faults) - censored} measured, {censored} not measurable"
        + (f" (e.g. {next(x.censored for x in ph.faults if x.censored)})" if censored else ""),
        f"   accounting difference (accepted - delivered - buffered - dropped_*): {fmt(f.identity if f else None)}",
        "   end: production stopped (SIGHUP), "
        + (
            f"backlog drained in {ph.extra['drain_s']:.1f} s"
            if ph.extra.get("drain_s") is not None
            else f"backlog NOT drained within the wait ({fmt(f.rows if f else None)} rows left)"
        )
        + (
            "; SIGTERM -> exit 0"
            if ph.extra.get("exit") == 0
            else f"; SIGTERM -> exit code {ph.extra.get('exit')} (negative: killed by that signal after 10 s)"
        ),
    ]
    multi = {d: e for d, e in an.epochs.items() if len(e) > 1}
    if multi:
        out.append(f"   seqepochs per device: {', '.join(f'{d} {sorted(e)}' for d, e in sorted(multi.items()))}")
    return out


def summary(phases: list[Phase], info: list[str], elapsed: float) -> list[str]:
    lines = ["", "=" * 110, "SUMMARY", "=" * 110, *info, f"elapsed   : {elapsed:.0f} s", ""]
    head = (
        f"{'phase':<20} {'accepted':>9} {'uniq recv':>9} {'lost unc.':>9} {'dup/kill mean/p95/max':>22}"
        f" {'reorders':>8} {'max stall':>10} {'acct diff':>9}"
    )
    lines.append(head)
    tot_acc = tot_uniq = tot_lost = tot_reo = 0
    diffs: list[int | None] = []
    worst_all: tuple[float, str] | None = None
    per_kill: list[float] = []
    unmeasured = 0
    for ph in phases:
        an = ph.an
        if an is None:
            lines.append(f"{ph.name:<20} skipped")
            continue
        worst, cens = stalls(ph.faults)
        unmeasured += cens
        stall = worst.stall if worst else None
        open_ = ""
        if ph.name.startswith("2") and ph.extra.get("gap") is not None:
            stall = max(stall or 0.0, ph.extra["gap"])  # the largest gap while producing, PUBACKs lost
            open_ = ">=" if ph.extra.get("gap_open") else ""
        if ph.name.startswith("4") and ph.extra.get("live") is None:
            stall = math.inf  # never live again within the waits
        if stall is not None and (worst_all is None or stall > worst_all[0]):
            worst_all = (stall, ph.name + (" (still stalled at the end of the wait)" if open_ else ""))
        pk = ph.extra.get("per_kill") or []
        per_kill += pk
        dpk = f"{sum(pk) / len(pk):.1f}/{pctl(pk, 95):.0f}/{max(pk):.0f}" if pk else "-"
        diff = ph.final.identity if ph.final else None
        diffs.append(diff)
        tot_acc += ph.accepted
        tot_uniq += an.unique
        tot_lost += an.lost_uncounted
        tot_reo += an.reorders
        lines.append(
            f"{ph.name:<20} {ph.accepted:>9,} {an.unique:>9,} {an.lost_uncounted:>9,} {dpk:>22} {an.reorders:>8}"
            f" {open_ + fmt(stall, '.1f') + ' s':>10} {fmt(diff):>9}"
        )
    dpk = f"{sum(per_kill) / len(per_kill):.1f}/{pctl(per_kill, 95):.0f}/{max(per_kill):.0f}" if per_kill else "-"
    stall_txt = f"{worst_all[0]:.1f} s" if worst_all else "-"
    lines.append(
        f"{'TOTAL':<20} {tot_acc:>9,} {tot_uniq:>9,} {tot_lost:>9,} {dpk:>22} {tot_reo:>8} {stall_txt:>10}"
        f" {fmt(sum(abs(d) for d in diffs if d is not None)):>9}"
    )
    p95 = pctl(per_kill, 95) if per_kill else None
    lines += [
        "",
        "targets:",
        f"  lost uncounted         0          -> {tot_lost:,} {mark(tot_lost == 0)}",
        f"  reorders within class  0          -> {tot_reo:,} {mark(tot_reo == 0)}",
        f"  duplicates per kill    p95 <= {TARGET_DUP_P95}  -> p95 {fmt(p95)}"
        f" {mark(p95 <= TARGET_DUP_P95) if p95 is not None else 'n/a (no kills)'}",
        f"  stall after any fault  <= {TARGET_STALL:.0f} s    -> {stall_txt}"
        + (f" ({worst_all[1]})" if worst_all else "")
        + f" {mark(worst_all is not None and worst_all[0] <= TARGET_STALL)}"
        + f" ({unmeasured} fault(s) not measurable, see the phases)",
        *[
            f"  disk full: alarm/event evicted or refused while telemetry was buffered  0 ->"
            f" {ph.extra['evicted_high'] + ph.extra['refused_high']:,}"
            f" {mark(ph.extra['evicted_high'] + ph.extra['refused_high'] == 0)}"
            for ph in phases
            if "evicted_high" in ph.extra
        ],
        f"  accounting difference  0          -> {', '.join(fmt(d) for d in diffs)}"
        f" {mark(all(d == 0 for d in diffs)) if diffs else 'n/a'}",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def code_state() -> str:
    """The commit under test and whether the agent's files differ from it (the working tree is what runs)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "agent", "drivers"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "?"
    changed = f" + uncommitted changes in {len(dirty)} file(s) of agent/, drivers/" if dirty else ""
    return f"commit {head or '?'}{changed}"


def run(args: argparse.Namespace) -> int:
    sz = QUICK if args.quick else FULL
    if args.kills is not None:
        sz.kills = args.kills
    if args.puback_seconds is not None:
        sz.puback_s = args.puback_seconds
    only = set(args.only.split(",")) if args.only else {"1", "2", "3", "4"}
    work = Path(tempfile.mkdtemp(prefix="edge-chaos-", dir=args.workdir))
    started = time.monotonic()
    info = pl.machine_info(work)
    info.append(
        f"load      : {METERS} virtual meters every {METER_INTERVAL_MS} ms (~{args.rate} ev/s, telemetry), a parking"
        " bay every 100 ms (event), a crosswalk sensor every 200 ms (made alarm), a flaky meter (status flaps,"
        " alarm), gateway health every 1 s (alarm); seed "
        f"{args.seed}; {'quick' if args.quick else 'full'} sizes, {sz.kills} kills"
    )
    info.append(f"agent code: {code_state()}")
    print("\n".join(info), flush=True)
    broker = pl.Mosquitto(work / "broker", persistent=True)
    broker.start()
    sub = Subscriber(work, broker.port)
    ctx = Ctx(work, broker, sub, sz, args.rate, random.Random(args.seed))
    phases: list[Phase] = []
    try:
        for key, fn in (("1", phase_crash), ("2", phase_pubacks), ("3", phase_disk), ("4", phase_truncate)):
            if key not in only:
                continue
            if broker.pid is None:
                broker.start()
            print(f"\n-- phase {key}: {fn.__doc__.splitlines()[0] if fn.__doc__ else ''}", flush=True)
            t0 = time.monotonic()
            try:
                ph = fn(ctx)
            except Exception as exc:  # one phase failing to run must not cost the others' figures
                ph = Phase(f"{key} FAILED", f"chaos-p{key}")
                ph.lines.append(f"the bench could not run this phase: {type(exc).__name__}: {exc}")
                kill_children_but(broker, sub)
            ph.seconds = time.monotonic() - t0
            phases.append(ph)
            print("\n".join(phase_report(ph)), flush=True)
    finally:
        sub.close()
        broker.stop()
        kill_children()
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summary(phases, info, time.monotonic() - started)), flush=True)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--subscriber":
        port, out, cid, ready = sys.argv[2:6]
        subscriber_main(int(port), Path(out), cid, Path(ready))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--filler":
        filler_main(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (40 kills ...), about 2 minutes")
    parser.add_argument("--only", help="comma-separated phases to run, e.g. 1,4 (default 1,2,3,4)")
    parser.add_argument("--kills", type=int, help="SIGKILLs in phase 1 (default 200, quick 40)")
    parser.add_argument("--puback-seconds", type=float, help="seconds of 5 %% lost PUBACKs (default 30, quick 15)")
    parser.add_argument("--rate", type=int, default=200, help="telemetry ev/s of the meters (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of kill times, flaps, PUBACK drops")
    parser.add_argument("--workdir", help="where to put buffers and logs (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, buffers)")
    args = parser.parse_args()
    pl.exit_cleanly(kill_children)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
