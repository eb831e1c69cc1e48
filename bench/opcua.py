#!/usr/bin/env python3
"""OPC UA benchmark: one simulated PLC, 1,000 monitored items changing at 10 Hz (10,000 changes/s).

Prints figures, asserts nothing. Two modes:

``--driver-only`` (works today): the PLC in its own process, ``OpcUaDriver`` in this process
with a recording context (no agent, no MQTT). Prints value changes/s received and mapped to
events, this process's CPU (% of one core) and the latency from source timestamp to the
event leaving ``stream()``.

Default (the whole pipeline): the PLC process -> ``python -m agent run -c site.yaml``
(``driver: opcua``) -> Mosquitto (own process, free loopback port) -> a paho subscriber process
that logs every event's receive time. Prints value changes/s delivered to MQTT, agent CPU %,
and p50/p99 latency from source timestamp to arrival at the subscriber. Needs the ``opcua``
entry point (``opcua = "drivers.opcua:PLUGIN"`` under ``[project.entry-points."edge_agent.drivers"]``
in pyproject.toml, then ``pip install -e .``); it stops with a clear message when
``edge-agent drivers`` does not list it.

Both modes account per variable, by source timestamp: the PLC process logs which variables
each scan changed, and which queued values its server discarded (an item's queue holds
``queue_size`` values between publishes, DiscardOldest); the receiving side logs which points
arrived with which source timestamp. Every change made in the window is then delivered, or
coalesced by the server (legitimate OPC UA behaviour: a newer value of the same variable
replaced it), or lost after the server (driver, agent, broker or subscriber).

Target: 10,000 changes/s sustained with <= 1 core for the agent.

    .venv/bin/python bench/opcua.py --driver-only
    .venv/bin/python bench/opcua.py [--variables 1000 --rate 10 --seconds 15]

Everything shares the machine's CPUs (the PLC simulator needs most of a core for 10,000
writes/s in pure Python): its CPU is printed next to the driver's/agent's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file runs: reuse the pipeline bench's broker and process helpers.
import pipeline as pl

ROOT = pl.ROOT
HERE = Path(__file__).resolve()
TARGET_CHANGES = 10_000
TARGET_CPU = 100.0  # % of one core
KINDS = ["Flow", "Pressure", "Speed", "Energy"]
QUANTITIES = {"Flow": "flow", "Pressure": "pressure", "Speed": "counter", "Energy": "active_energy"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(moment: datetime) -> int:
    """Milliseconds since the epoch, truncated as the event envelope's ``time`` is."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


# ---- child processes -----------------------------------------------------------------------------
def serve_main(port: int, variables: int, rate: float, stats: Path) -> None:
    """The PLC process: SimulatedPlc, writing ``scans changes`` to ``stats`` every 0.5 s.

    For the per-variable accounting it also writes ``stats.scans`` (one line per scan: its source
    timestamp in ms and the indices of the variables it did not change, ``-`` if none) and
    ``stats.discards`` (one line per value the server's queue discarded: source ms and index).
    """
    sys.path.insert(0, str(ROOT))
    from drivers.opcua.driver import quiet_library_logs
    from drivers.opcua.simulator import SimulatedPlc

    _skip_server_value_copy()
    discards: list[str] = []
    scans_log = stats.with_suffix(".scans").open("w")

    class LoggedPlc(SimulatedPlc):
        async def scan(self) -> datetime:
            signals = list(self.signals.values())  # index i: variable i, in the order _points() names them
            before = [sig.changes for sig in signals]
            stamp = await super().scan()
            unchanged = [str(i) for i, sig in enumerate(signals) if sig.changes == before[i]]
            scans_log.write(f"{_ms(stamp)} {','.join(unchanged) or '-'}\n")
            return stamp

    async def main() -> None:
        quiet_library_logs()
        plc = LoggedPlc(port, variables=variables, rate=rate, analog_only=True, seed=1)
        await plc.start()
        index = {sig.node.Identifier: i for i, sig in enumerate(plc.signals.values())}
        _count_discards(lambda node, source: discards.append(f"{_ms(source)} {index[node]}\n"))
        with stats.with_suffix(".discards").open("w") as dropped:
            while True:
                scans_log.flush()
                dropped.write("".join(discards))
                dropped.flush()
                discards.clear()
                stats.write_text(f"{plc.scans} {plc.changes} {time.time()}\n")
                await asyncio.sleep(0.5)

    asyncio.run(main())


def _count_discards(record: Any) -> None:
    """PLC process only: ``record(node identifier, source time)`` for each value a monitored item's
    queue discards (asyncua keeps ``queue_size`` values per item between publishes and drops the
    oldest): the server's coalescing, counted where it happens."""
    from asyncua.server.internal_subscription import InternalSubscription

    enqueue = InternalSubscription._enqueue_event

    async def _enqueue_event(self: InternalSubscription, mid: int, eventdata: Any, size: int,
                             queue: dict[int, list[Any]]) -> None:  # fmt: skip
        if size != 0 and len(queue.get(mid, ())) >= size:
            item = self.monitored_item_srv._monitored_items.get(mid)
            oldest = queue[mid][0]
            source = getattr(getattr(oldest, "Value", None), "SourceTimestamp", None)
            if item is not None and item.read_value_id is not None and source is not None:
                record(item.read_value_id.NodeId.Identifier, source)
        await enqueue(self, mid, eventdata, size, queue)

    InternalSubscription._enqueue_event = _enqueue_event  # type: ignore[method-assign]


def _skip_server_value_copy() -> None:
    """PLC process only: asyncua's server deep-copies each value of a monitored item (~0.4 ms).

    That copy guards against values mutated after a write; the simulator writes fresh floats,
    so sharing them is safe, and without the copy one simulator process can offer 10,000
    changes/s. It is the simulated server's cost, not the driver's: a real PLC does this in C.
    """
    from asyncua.server.monitored_item_service import MonitoredItemValues

    def set_current_datavalue(self: MonitoredItemValues, cur_val: Any) -> None:
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = cur_val

    MonitoredItemValues.set_current_datavalue = set_current_datavalue  # type: ignore[method-assign]


def subscriber_main(port: int, out: Path) -> None:
    """Logs ``receive_time source_ms point,point,...`` per meter event (QoS 1)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    lines: list[str] = []
    lock = threading.Lock()

    def on_connect(c: paho.Client, *_: Any) -> None:
        c.subscribe("ioc/v1/+/+/reading", qos=1)
        out.with_suffix(".ready").write_text("1")

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        event = json.loads(msg.payload)
        points = ",".join(m["point"] for m in event["data"]["measurements"])
        line = f"{now:.6f} {_ms(_parse(event['time']))} {points}\n"
        with lock:
            lines.append(line)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-opcua-{os.getpid()}")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    with out.open("a") as handle:
        while True:
            time.sleep(0.25)
            with lock:
                chunk, lines[:] = "".join(lines), []
            handle.write(chunk)
            handle.flush()


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---- helpers -------------------------------------------------------------------------------------
def _points(variables: int) -> list[dict[str, Any]]:
    out = []
    for i in range(variables):
        pump, kind = i // 4 + 1, KINDS[i % 4]
        out.append({"name": f"p{pump}_{kind.lower()}", "node": f"ns=2;s=Pump{pump}.{kind}",
                    "quantity": QUANTITIES[kind]})  # fmt: skip
    return out


def _start_plc(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = pl.free_port()
    stats = work / "plc.stats"
    proc = pl._spawn([sys.executable, str(HERE), "--serve", str(port), str(args.variables), str(args.rate),
                      str(stats)], stderr=(work / "plc.log").open("wb"))  # fmt: skip
    pl.wait_for(lambda: stats.exists() or proc.poll() is not None, 60, "the PLC simulator")
    if proc.poll() is not None:
        sys.exit(f"the PLC simulator failed: {(work / 'plc.log').read_text()[-2000:]}")
    return proc, port, stats


def _plc_stats(stats: Path) -> tuple[int, int]:
    scans, changes, _ = stats.read_text().split()
    return int(scans), int(changes)


def _percentile(values: list[float], q: float) -> float:
    return pl.percentile(sorted(values), q) if values else float("nan")


def _header(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    print(f"# bench/opcua.py {' '.join(sys.argv[1:])}")
    cpu = platform.processor() or platform.machine()
    print(f"# nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, asyncua {version('asyncua')}")
    print(f"# load: {args.variables} monitored items x {args.rate:g} Hz = {args.variables * args.rate:,.0f} changes/s "
          f"offered; publishing interval {args.interval} ms, queue size {args.queue_size}")  # fmt: skip


# ---- per-variable accounting ---------------------------------------------------------------------
@dataclass
class Accounting:
    """The changes the PLC made in the window (by source timestamp) and what became of each."""

    scans: int
    made: int
    delivered: int  # distinct (variable, source time) pairs that arrived
    duplicates: int  # arrivals beyond the first of a pair (QoS 1 may redeliver)
    coalesced: int  # not delivered: the server's queue discarded them for a newer value
    lost: int  # not delivered, not discarded by the server: lost after it
    unmatched: int  # arrived with no change made at that source time (should be 0)
    variables: int
    short: list[tuple[str, int, int, int]]  # (point, made, coalesced, lost), worst first


def _lines(path: Path) -> list[list[str]]:
    """Whitespace-split lines of a log whose writer may have been stopped in the middle of one."""
    lines = path.read_text().split("\n")[:-1]  # the last piece is "" or a line cut short
    return [line.split() for line in lines if line]


def account(stats: Path, t0: float, t1: float, names: list[str], arrivals: list[tuple[int, str]]) -> Accounting:
    """Match every change made with a source time in [t0, t1) against the arrivals ``(source ms, point)``."""
    lo, hi = int(t0 * 1000), int(t1 * 1000)
    n = len(names)
    index = {name: i for i, name in enumerate(names)}
    made: set[tuple[int, int]] = set()
    scans = 0
    for fields in _lines(stats.with_suffix(".scans")):
        stamp = int(fields[0])
        if lo <= stamp < hi and len(fields) == 2:
            scans += 1
            unchanged = set() if fields[1] == "-" else {int(i) for i in fields[1].split(",")}
            made.update((i, stamp) for i in range(n) if i not in unchanged)
    discarded = {(int(i), int(stamp)) for stamp, i in _lines(stats.with_suffix(".discards"))}
    seen = Counter((index[point], stamp) for stamp, point in arrivals if lo <= stamp < hi)
    missing = made - seen.keys()
    coalesced = missing & discarded
    lost = missing - discarded
    per_made = Counter(i for i, _ in made)
    per_coalesced = Counter(i for i, _ in coalesced)
    per_lost = Counter(i for i, _ in lost)
    short = sorted(((names[i], per_made[i], per_coalesced[i], per_lost[i])
                    for i in per_coalesced.keys() | per_lost.keys()), key=lambda row: -(row[2] + row[3]))  # fmt: skip
    return Accounting(scans, len(made), len(made & seen.keys()), sum(c - 1 for c in seen.values()), len(coalesced),
                      len(lost), len(seen.keys() - made), n, short)  # fmt: skip


def print_accounting(a: Accounting, span: float, queue_size: int) -> None:
    """The classification of the shortfall, one line per outcome."""

    def pct(part: int) -> str:
        return f"{part / max(a.made, 1) * 100:.2f}%"

    print(f"per variable      source time in the window: {a.scans} scans, {a.variables:,} variables")
    print(f"  made            {a.made:>9,} changes ({a.made / span:,.0f}/s)")
    print(f"  delivered       {a.delivered:>9,} ({pct(a.delivered)}; duplicates {a.duplicates}, "
          f"arrivals matching no change {a.unmatched})")  # fmt: skip
    print(
        f"  coalesced       {a.coalesced:>9,} ({pct(a.coalesced)}) by the server: discarded from the item's queue "
        f"(queue_size {queue_size}, DiscardOldest) for a newer value of the same variable; OPC UA semantics"
    )
    print(f"  lost            {a.lost:>9,} ({pct(a.lost)}) after the server: driver, agent, broker or subscriber")
    if a.short:
        worst = ", ".join(f"{name} {c} coalesced/{lost} lost of {made}" for name, made, c, lost in a.short[:4])
        print(f"  short           {len(a.short):>9,} variables; most: {worst}")
    else:
        print(f"  short           {0:>9} variables: every change made arrived")
    verdict = ("no shortfall" if a.coalesced + a.lost == 0
               else "the shortfall is the server's coalescing; nothing is lost" if a.lost == 0
               else f"{a.lost:,} changes lost after the server")  # fmt: skip
    print(f"  classification  {verdict}")


# ---- driver only ---------------------------------------------------------------------------------
def driver_only(args: argparse.Namespace, work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from agent.devices.api import DriverContext
    from drivers.opcua.config import OpcUaConfig
    from drivers.opcua.driver import OpcUaDriver

    class Recorder(DriverContext):
        device_id = "plc"
        failures: list[str] = []  # noqa: RUF012 - one instance

        def poll_ok(self) -> None:
            pass

        def poll_failed(self, reason: str) -> None:
            self.failures.append(reason)

    arrivals: list[tuple[int, str]] = []  # (source ms, point) of every measurement out of stream()
    window = [0.0, 0.0]  # wall clock, as the PLC's source timestamps
    plc, port, stats = _start_plc(work, args)
    plc_cpu = pl.Proc(plc.pid)
    config = OpcUaConfig.model_validate({"id": "plc", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}",
                                         "interval": args.interval / 1000, "queue_size": args.queue_size,
                                         "points": _points(args.variables)})  # fmt: skip

    async def main() -> dict[str, Any]:
        driver = OpcUaDriver(config, Recorder())
        await driver.start()
        counted = {"on": False, "changes": 0, "events": 0}
        latencies: list[float] = []

        async def consume() -> None:
            async for batch in driver.stream():
                for r in batch:
                    if r.time is not None:
                        stamp = _ms(r.time)
                        arrivals.extend((stamp, m["point"]) for m in r.data.get("measurements", ()))
                if not counted["on"]:
                    continue
                now = datetime.now(UTC)
                for r in batch:
                    n = len(r.data.get("measurements", ()))
                    counted["changes"] += n
                    counted["events"] += 1
                    if r.time is not None:
                        latencies.extend([(now - r.time).total_seconds() * 1000] * n)

        task = asyncio.create_task(consume())
        await asyncio.sleep(args.warmup)
        counted["on"] = True
        s0, t0, c0, p0 = _plc_stats(stats), time.monotonic(), time.process_time(), plc_cpu.cpu()
        window[0] = time.time()
        await asyncio.sleep(args.seconds)
        s1, t1, c1, p1 = _plc_stats(stats), time.monotonic(), time.process_time(), plc_cpu.cpu()
        window[1] = time.time()
        counted["on"] = False
        await asyncio.sleep(2)  # the window's last changes are still on their way
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await driver.stop()
        span = t1 - t0
        return {"received": counted["changes"] / span, "events": counted["events"] / span,
                "made": (s1[1] - s0[1]) / span, "scans": (s1[0] - s0[0]) / span, "cpu": (c1 - c0) / span * 100,
                "plc_cpu": (p1 - p0) / span * 100, "p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                "losses": driver.stats["losses"]}  # fmt: skip

    try:
        r = asyncio.run(main())
    finally:
        pl._stop(plc)
    a = account(stats, window[0], window[1], [p["name"] for p in _points(args.variables)], arrivals)
    wall = window[1] - window[0]
    r["made"], r["received"], r["scans"] = a.made / wall, a.delivered / wall, a.scans / wall
    ok = r["received"] >= 0.98 * r["made"] and r["cpu"] <= TARGET_CPU
    print("\n## driver only: PLC process -> OpcUaDriver.stream() in this process (no agent, no MQTT)")
    print(f"PLC made        {r['made']:>9,.0f} changes/s ({r['scans']:.1f} scans/s; PLC CPU {r['plc_cpu']:.0f}%)")
    print(f"driver received {r['received']:>9,.0f} changes/s in {r['events']:,.0f} events/s "
          f"({r['received'] / max(r['made'], 1) * 100:.1f}% of made; connection losses {r['losses']})")  # fmt: skip
    print(f"driver CPU      {r['cpu']:>9.0f}% of one core (this process: asyncua decoding + mapping)")
    print(f"latency         source timestamp -> event out of stream(): p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms")
    print(f"target          {TARGET_CHANGES:,} changes/s with <= 1 core: "
          f"{'met' if ok and r['made'] >= 0.98 * TARGET_CHANGES else 'NOT met'} at this load")  # fmt: skip
    print_accounting(a, wall, args.queue_size)


# ---- the whole pipeline --------------------------------------------------------------------------
def full(args: argparse.Namespace, work: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "agent", "drivers"], cwd=ROOT, capture_output=True, text=True,
                            check=False)  # fmt: skip
    if "opcua" not in listed.stdout.split():
        sys.exit("error: `edge-agent drivers` does not list opcua: add opcua = \"drivers.opcua:PLUGIN\" under "
                 "[project.entry-points.\"edge_agent.drivers\"] in pyproject.toml and run "
                 "`.venv/bin/pip install -e .`; or run with --driver-only")  # fmt: skip
    import psutil

    plc, port, stats = _start_plc(work, args)
    broker = pl.Mosquitto(work)
    broker.start()
    log = work / "sub.log"
    sub = pl._spawn([sys.executable, str(HERE), "--subscriber", str(broker.port), str(log)])
    pl.wait_for(lambda: log.with_suffix(".ready").exists(), 20, "the subscriber")
    site = work / "site.yaml"
    device = {"id": "plc", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}",
              "interval": f"{args.interval}ms", "queue_size": args.queue_size,
              "points": _points(args.variables)}  # fmt: skip
    site.write_text(
        "gateway: {id: bench-opcua, health_interval: 60s}\n"
        f"uplink:\n  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1}}\n"
        f"buffer: {{path: {work / 'buffer.db'}}}\n"
        f"devices:\n  - {json.dumps(device)}\n"
    )
    agent = pl._spawn([sys.executable, "-m", "agent", "run", "-c", str(site)], cwd=ROOT,
                      stdout=(work / "agent.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        pl.wait_for(lambda: log.stat().st_size > 0 or agent.poll() is not None, 60, "the first delivered event")
        if agent.poll() is not None:
            sys.exit(f"the agent exited: {(work / 'agent.log').read_text()[-2000:]}")
        time.sleep(args.warmup)
        proc, plc_proc = psutil.Process(agent.pid), psutil.Process(plc.pid)
        t0 = time.time()
        c0 = sum(proc.cpu_times()[:2])
        p0 = sum(plc_proc.cpu_times()[:2])
        time.sleep(args.seconds)
        t1 = time.time()
        c1 = sum(proc.cpu_times()[:2])
        p1 = sum(plc_proc.cpu_times()[:2])
        time.sleep(2)  # let the window's last events arrive
    finally:
        pl._stop(agent)
        pl._stop(sub)
        pl._stop(plc)
        broker.stop()
    rows = [(float(recv), int(stamp), points.split(",")) for recv, stamp, points in _lines(log)]
    arrivals = [(stamp, point) for _, stamp, points in rows for point in points]
    span = t1 - t0
    a = account(stats, t0, t1, [p["name"] for p in _points(args.variables)], arrivals)
    lo, hi = int(t0 * 1000), int(t1 * 1000)
    window = [(recv, stamp, len(points)) for recv, stamp, points in rows if lo <= stamp < hi]
    latencies = [recv * 1000 - stamp for recv, stamp, n in window for _ in range(n)]
    made, delivered = a.made / span, a.delivered / span
    cpu = (c1 - c0) / span * 100
    print("\n## whole pipeline: PLC process -> agent (driver: opcua) -> Mosquitto -> subscriber")
    print(f"PLC made           {made:>9,.0f} changes/s in {a.scans / span:.1f} scans/s (PLC CPU "
          f"{(p1 - p0) / span * 100:.0f}%)")  # fmt: skip
    print(f"delivered to MQTT  {delivered:>9,.0f} changes/s (source time in the window) in "
          f"{len(window) / span:,.0f} events/s ({a.delivered / max(a.made, 1) * 100:.2f}% of made)")  # fmt: skip
    print(f"agent CPU          {cpu:>9.0f}% of one core")
    print(f"latency            source timestamp -> broker -> subscriber: p50 {_percentile(latencies, 50):.0f} ms, "
          f"p99 {_percentile(latencies, 99):.0f} ms")  # fmt: skip
    met = delivered >= 0.98 * TARGET_CHANGES and cpu <= TARGET_CPU
    print(f"target             {TARGET_CHANGES:,} changes/s with <= 1 core: {'met' if met else 'NOT met'}")
    print_accounting(a, span, args.queue_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver-only", action="store_true", help="driver in this process, no agent or MQTT")
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="PLC scans per second (every variable changes)")
    parser.add_argument("--interval", type=int, default=100, help="publishing interval, ms")
    parser.add_argument(
        "--queue-size",
        type=int,
        default=10,
        help="per monitored item: 1 keeps only the latest change per publish (OPC UA's default)",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "N", "RATE", "STATS"), help=argparse.SUPPRESS)
    parser.add_argument("--subscriber", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(int(args.serve[0]), int(args.serve[1]), float(args.serve[2]), Path(args.serve[3]))
        return
    if args.subscriber:
        subscriber_main(int(args.subscriber[0]), Path(args.subscriber[1]))
        return
    _header(args)
    work = Path(tempfile.mkdtemp(prefix="bench-opcua-"))
    try:
        (driver_only if args.driver_only else full)(args, work)
    finally:
        if args.keep:
            print(f"# work directory kept: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
