#!/usr/bin/env python3
"""Bundle push benchmark (issue 16): one ~5 MB signed bundle to N real agents over one Mosquitto, events flowing.

Everything is real: one Mosquitto on a free loopback port, N agents (``python -m agent run``, gw-001 .. gw-N, a
virtual meter every 100 ms each, the fleet channel on with a key of scope ``bundle``), ``python -m agent fleet
push-bundle`` as the operator (default rate 1 MB/s per gateway, 64 KiB chunks), and the bench's own subscriber on
``ioc/v1/#`` stamping every event as it arrives. Printed: MB/s per gateway (from the push's own figures: bundle
size over the time from its first ask to its last chunk received), how long until every gateway applied it, and
the events' latency (arrival minus the event's ``time``) p50/p99/max in the seconds before the push and during it.
Plain MQTT on loopback, no TLS. It asserts nothing; exit 0 whenever it could measure.

    .venv/bin/python bench/bundle_push.py                 # 20 agents, a 5 MB bundle, about 45 s on 2 vCPUs
    .venv/bin/python bench/bundle_push.py --gateways 5 --size 2000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pipeline as pl
import yaml

ROOT = pl.ROOT
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Events:
    """Every event's latency (ms) and arrival time, from a plain paho subscriber."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.samples: list[tuple[float, float]] = []  # (arrival, latency ms)
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bundle-events-{os.getpid()}")

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe("ioc/v1/+/+/+", 1)
            ready.set()

        self.client.on_connect = on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        now = time.time()
        if message.retain:
            return
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        for event in doc if isinstance(doc, list) else [doc]:
            stamp = event.get("time") if isinstance(event, dict) else None
            if isinstance(stamp, str):
                sent = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                with self.lock:
                    self.samples.append((now, (now - sent) * 1000))

    def between(self, start: float, end: float) -> dict[str, float]:
        with self.lock:
            lat = sorted(ms for at, ms in self.samples if start <= at < end)
        return {"n": len(lat), "p50": pl.percentile(lat, 50), "p99": pl.percentile(lat, 99),
                "max": lat[-1] if lat else float("nan")}  # fmt: skip


def make_bundle(work: Path, size: int, key: Path) -> Path:
    """A bundle of one model of ``size`` random bytes and a config (meter-1 as it runs), signed."""
    src = work / "src"
    (src / "models").mkdir(parents=True)
    model = os.urandom(size)
    manifest = yaml.safe_load((ROOT / "models/centerface.yaml").read_text())
    manifest.update(file="big.onnx", sha256=hashlib.sha256(model).hexdigest(), size_bytes=size)
    (src / "models/big.onnx").write_bytes(model)
    (src / "models/big.yaml").write_text(yaml.safe_dump(manifest))
    (src / "config.yaml").write_text(
        "gateway: {id: gw-any}\ndevices:\n  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
    )
    out = work / "site.bundle"
    _run(["bundle", "build", str(src), "--version", "2", "--target", "group:bench", "--out", str(out),
          "--key", str(key), "--key-id", "ops", "--health-window", "2"])  # fmt: skip
    return out


def _run(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"bench: edge-agent {' '.join(args[:2])} failed: {done.stderr}")
    return done.stdout


def site(gateway: str, port: int, state: Path, public: str) -> str:
    keys = [{"id": "ops", "public_key": public, "scopes": ["bundle"]}]
    fleet = {"enabled": True, "clock": "trusted", "groups": ["bench"], "keys": keys}
    return (
        f"gateway: {{id: {gateway}, site: bench}}\n"
        f"uplink:\n  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1}}\n"
        f"buffer: {{path: {state / 'buffer.db'}}}\n"
        f"fleet: {json.dumps(fleet)}\n"
        "devices:\n  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--size", type=int, default=5_000_000, help="bytes of model in the bundle")
    parser.add_argument("--rate", type=float, default=1_000_000, help="push-bundle --rate (bytes/s per gateway)")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of event latency before the push")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    broker = pl.Mosquitto(work / "broker")
    agents: list[subprocess.Popen[bytes]] = []
    try:
        broker.start()
        keygen = json.loads(_run(["fleet", "keygen", "--out", str(work / "ops.pem"), "--id", "ops", "--json"]))
        bundle = make_bundle(work, args.size, work / "ops.pem")
        gateways = [f"gw-{i:03d}" for i in range(1, args.gateways + 1)]
        events = Events(broker.port)
        for gw in gateways:
            state = work / gw
            state.mkdir(mode=0o700)
            (state / "site.yaml").write_text(site(gw, broker.port, state, keygen["public_key"]))
            with (state / "agent.log").open("ab") as log:
                agents.append(pl._spawn([sys.executable, "-m", "agent", "run", "-c", str(state / "site.yaml")],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))  # fmt: skip
        pl.wait_for(lambda: all(any(e.startswith(gw) for e in _inboxes(work, gw)) for gw in gateways), 120,
                    "every agent's bundle inbox", 0.2)  # fmt: skip
        time.sleep(args.baseline)
        t0 = time.time()
        push = subprocess.run(
            [sys.executable, "-m", "agent", "fleet", "push-bundle", str(bundle), "--to", f"gw-001..{gateways[-1]}",
             "--rate", str(args.rate), "--port", str(broker.port), "--json", "--wait", "300"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        t1 = time.time()
        if not push.stdout:
            sys.exit(f"bench: push-bundle printed nothing: {push.stderr}")
        result = json.loads(push.stdout)
        rates = sorted(g["mb_per_s"] or 0.0 for g in result["gateways"])
        applied = sum(g["status"] == "applied" for g in result["gateways"])
        before, during = events.between(t0 - args.baseline, t0), events.between(t0, t1)
        size = result["size"] / 1e6
        print(
            f"bundle {size:.2f} MB to {args.gateways} gateways at --rate {args.rate / 1e6:g} MB/s each:"
            f" {applied}/{args.gateways} applied in {t1 - t0:.1f} s (push-bundle exit {push.returncode})"
        )
        print(
            f"  MB/s per gateway: min {rates[0]:.2f}, median {rates[len(rates) // 2]:.2f}, max {rates[-1]:.2f}"
            f" (aggregate {size * args.gateways / (t1 - t0):.1f} MB/s through the broker, health window included)"
        )
        for name, lat in (("before the push", before), ("during the push", during)):
            print(f"  event latency {name}: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms,"
                  f" max {lat['max']:.1f} ms ({lat['n']} events)")  # fmt: skip
        return 0
    finally:
        for proc in agents:
            pl._stop(proc)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _inboxes(work: Path, gw: str) -> list[str]:
    folder = work / gw / "fleet" / "bundles" / "inbox"
    return [gw] if (folder / "agent.pid").exists() else []


if __name__ == "__main__":
    sys.exit(main())
