"""Ingestion benchmark: events/s per worker into PostgreSQL, and the commit latency (docs/ingest.md).

Real parts: a private PostgreSQL cluster (Debian's postgresql package, fsync on, defaults
otherwise), Mosquitto on a loopback port, ``edge-agent ingest`` worker processes on a shared
subscription. The broker is loaded first: the workers' sessions exist, the workers are stopped,
N events (built by the agent's own code) are queued for them; then the workers start and the
clock runs until the database holds N events. So the figure is the consumer's, not the
publisher's. Scenarios: 1 and 2 workers on per-device topics, 2 workers on the batch topic.

    .venv/bin/python bench/ingest.py [--events 20000]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file is run: pipeline.py's broker and process helpers are reused.
import pipeline as pl

ROOT = pl.ROOT
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
import psycopg  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.contract.events import Reading, make_event  # noqa: E402
from tests.ingest.postgres import PrivatePostgres  # noqa: E402

PREFIX = "ioc/v1"
EPOCH = "5f0c2a9e81d34b17"


def events(n: int, batch: int) -> list[tuple[str, bytes]]:
    """``n`` meter readings over 5 gateways x 10 devices; ``batch`` > 1: JSON arrays on the batch topic."""
    t0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    per_gateway: dict[str, list[bytes]] = {}
    singles = []
    for i in range(n):
        gateway, device, seq = f"gw-{i % 5}", f"meter-{(i // 5) % 10}", i // 50 + 1
        data = {"measurements": [
            {"quantity": "active_power", "value": i / 10, "unit": "kW", "quality": "good"},
            {"quantity": "voltage", "value": 230.1, "unit": "V", "quality": "good", "phase": "L1"},
            {"quantity": "active_energy", "value": 1000.0 + i, "unit": "kWh", "quality": "good"},
        ]}  # fmt: skip
        reading = Reading("city.meter.reading", data, time=t0 + timedelta(seconds=seq))
        payload = make_event(gateway=gateway, device=device, seq=seq, reading=reading, now=t0, epoch=EPOCH)
        singles.append((f"{PREFIX}/{gateway}/{device}/reading", payload))
        per_gateway.setdefault(gateway, []).append(payload)
    if batch <= 1:
        return singles
    return [
        (f"{PREFIX}/{gateway}/batch", b"[" + b",".join(items[i : i + batch]) + b"]")
        for gateway, items in per_gateway.items()
        for i in range(0, len(items), batch)
    ]


def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-ingest-pub")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    pl.wait_for(lambda: all(i.is_published() for i in infos), 300, "every PUBACK", 0.05)
    client.disconnect()
    client.loop_stop()


def worker(dsn: str, port: int, n: int, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "agent", "ingest", "--dsn", dsn, "--port", str(port), "--worker", str(n),
            "--group", "bench", "--stats-interval", "3600"]  # fmt: skip
    with log.open("ab") as err:
        return pl._spawn(args, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)


def count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0]) if row else 0


def scenario(pg: PrivatePostgres, broker: pl.Mosquitto, work: Path, workers: int, n: int, batch: int) -> dict[str, Any]:
    name = f"bench_{workers}_{batch}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = pg.dsn.replace("dbname=postgres", f"dbname={name}")
    subprocess.run([sys.executable, "-m", "agent", "ingest", "--dsn", dsn, "--init-db"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    # Sessions first (a shared subscription per worker), then the load queued for them while they are away.
    procs = [worker(dsn, broker.port, k, work / f"worker-{name}-{k}.log") for k in range(1, workers + 1)]
    logs = [work / f"worker-{name}-{k}.log" for k in range(1, workers + 1)]
    pl.wait_for(lambda: all("connected" in log.read_text() for log in logs), 20, "the workers' sessions", 0.05)
    time.sleep(0.5)  # the SUBACKs
    for proc in procs:
        pl._stop(proc, signal.SIGTERM, 20)
    messages = events(n, batch)
    publish(broker.port, messages)
    began = time.monotonic()
    procs = [worker(dsn, broker.port, k, work / f"worker-{name}-{k}.log") for k in range(1, workers + 1)]
    pl.wait_for(lambda: count(dsn) >= n, 600, f"{n} events in the database", 0.05)
    elapsed = time.monotonic() - began  # includes the workers' start-up (about 0.3 s each, in parallel)
    stats = []
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        stats.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert count(dsn) == n
    return {"workers": workers, "batch": batch, "messages": len(messages), "events": n, "seconds": elapsed,
            "events_per_s": n / elapsed, "stats": stats}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000, help="events per scenario (default 20000)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    pg = PrivatePostgres(durable=True)
    broker = pl.Mosquitto(work / "broker")
    try:
        pg.start()
        broker.start()
        results = [scenario(pg, broker, work, w, args.events, b) for w, b in ((1, 1), (2, 1), (2, 50))]
    finally:
        pl._kill_children()
        pg.remove()
    print(f"ingestion into PostgreSQL ({args.events} meter readings of 3 measurements each; fsync on)")
    print(f"{'workers':>7} {'topic':>10} {'events/s':>9} {'per worker':>10} {'commits':>8} {'p50 ms':>7} {'p95 ms':>7}")
    for r in results:
        per = ", ".join(f"{s['inserted'] / r['seconds']:,.0f}" for s in r["stats"])
        p50 = max(s["commit_ms_p50"] or 0 for s in r["stats"])
        p95 = max(s["commit_ms_p95"] or 0 for s in r["stats"])
        commits = sum(s["transactions"] for s in r["stats"])
        topic = "device" if r["batch"] == 1 else f"batch/{r['batch']}"
        rate = f"{r['events_per_s']:>9,.0f}"
        print(f"{r['workers']:>7} {topic:>10} {rate} {per:>10} {commits:>8} {p50:>7.1f} {p95:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
