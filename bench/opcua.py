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
from datetime import UTC, datetime
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


# ---- child processes -----------------------------------------------------------------------------
def serve_main(port: int, variables: int, rate: float, stats: Path) -> None:
    """The PLC process: SimulatedPlc, writing ``scans changes`` to ``stats`` every 0.5 s."""
    sys.path.insert(0, str(ROOT))
    from drivers.opcua.driver import quiet_library_logs
    from drivers.opcua.simulator import SimulatedPlc

    _skip_server_value_copy()

    async def main() -> None:
        quiet_library_logs()
        plc = SimulatedPlc(port, variables=variables, rate=rate, analog_only=True, seed=1)
        await plc.start()
        while True:
            stats.write_text(f"{plc.scans} {plc.changes} {time.time()}\n")
            await asyncio.sleep(0.5)

    asyncio.run(main())


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
    """Logs ``receive_time event_time measurements`` per meter event (QoS 1)."""
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
        line = f"{now:.6f} {_epoch(event['time']):.3f} {len(event['data']['measurements'])}\n"
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


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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


# ---- driver only ---------------------------------------------------------------------------------
def driver_only(args: argparse.Namespace, work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from agent.driver_api import DriverContext
    from drivers.opcua.config import OpcUaConfig
    from drivers.opcua.driver import OpcUaDriver

    class Recorder(DriverContext):
        device_id = "plc"
        failures: list[str] = []  # noqa: RUF012 - one instance

        def poll_ok(self) -> None:
            pass

        def poll_failed(self, reason: str) -> None:
            self.failures.append(reason)

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
        await asyncio.sleep(args.seconds)
        s1, t1, c1, p1 = _plc_stats(stats), time.monotonic(), time.process_time(), plc_cpu.cpu()
        counted["on"] = False
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
    ok = r["received"] >= 0.98 * r["made"] and r["cpu"] <= TARGET_CPU
    print("\n## driver only: PLC process -> OpcUaDriver.stream() in this process (no agent, no MQTT)")
    print(f"PLC made        {r['made']:>9,.0f} changes/s ({r['scans']:.1f} scans/s; PLC CPU {r['plc_cpu']:.0f}%)")
    print(f"driver received {r['received']:>9,.0f} changes/s in {r['events']:,.0f} events/s "
          f"({r['received'] / max(r['made'], 1) * 100:.1f}% of made; connection losses {r['losses']})")  # fmt: skip
    print(f"driver CPU      {r['cpu']:>9.0f}% of one core (this process: asyncua decoding + mapping)")
    print(f"latency         source timestamp -> event out of stream(): p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms")
    print(f"target          {TARGET_CHANGES:,} changes/s with <= 1 core: "
          f"{'met' if ok and r['made'] >= 0.98 * TARGET_CHANGES else 'NOT met'} at this load")  # fmt: skip


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
        t0, s0 = time.time(), _plc_stats(stats)
        c0 = sum(proc.cpu_times()[:2])
        p0 = sum(plc_proc.cpu_times()[:2])
        time.sleep(args.seconds)
        t1, s1 = time.time(), _plc_stats(stats)
        c1 = sum(proc.cpu_times()[:2])
        p1 = sum(plc_proc.cpu_times()[:2])
        time.sleep(2)  # let the window's last events arrive
    finally:
        pl._stop(agent)
        pl._stop(sub)
        pl._stop(plc)
        broker.stop()
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    window = [(float(a), float(b), int(n)) for a, b, n in rows if t0 <= float(b) < t1]
    changes = sum(n for _, _, n in window)
    latencies = [(recv - made) * 1000 for recv, made, n in window for _ in range(n)]
    span = t1 - t0
    made = (s1[1] - s0[1]) / span
    cpu = (c1 - c0) / span * 100
    print("\n## whole pipeline: PLC process -> agent (driver: opcua) -> Mosquitto -> subscriber")
    print(f"PLC made           {made:>9,.0f} changes/s (PLC CPU {(p1 - p0) / span * 100:.0f}%)")
    print(f"delivered to MQTT  {changes / span:>9,.0f} changes/s (source time in the window) in "
          f"{len(window) / span:,.0f} events/s")  # fmt: skip
    print(f"agent CPU          {cpu:>9.0f}% of one core")
    print(f"latency            source timestamp -> broker -> subscriber: p50 {_percentile(latencies, 50):.0f} ms, "
          f"p99 {_percentile(latencies, 99):.0f} ms")  # fmt: skip
    met = changes / span >= 0.98 * TARGET_CHANGES and cpu <= TARGET_CPU
    print(f"target             {TARGET_CHANGES:,} changes/s with <= 1 core: {'met' if met else 'NOT met'}")


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
