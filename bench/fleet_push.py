"""The fleet benchmark's push-config phase: the operator's CLI as a process, timed from what the gateways report.

``python -m agent fleet push-config site-b.yaml --to gw-001..gw-N ...`` signs one document per gateway and
publishes them all; site-b.yaml adds a second virtual meter, so every gateway validates, reloads (meter-1 keeps
running, meter-2 starts), reports ``applying``, waits out the health window and reports ``applied``.

The times come from the bench's own paho client, not from the CLI: it subscribes to ``{root}/+/desired`` and
``{root}/+/reported`` before the CLI starts and stamps each message as it arrives. Time zero is the first
desired document of this version the broker hands it, i.e. when the CLI starts publishing (its start-up,
signing and connecting are left out). Per gateway, "committed" is the first report of this version saying
``applying`` (the gateway accepted the document and started applying it), "applied" the first saying
``applied``; applied cannot come before the health window ends, so applied minus the window is reported too.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pipeline as pl
from fleet_echo import no_delay

VERSION = 2  # above the gateways' 0 (the local file alone)
HEALTH_WINDOW = 10  # s: the least the agent takes (docs/fleet.md)
FINAL = ("applied", "rejected", "rolled_back")


def site_b(work: Path, port: int, site: str) -> Path:
    """The operator's site file: what the gateways run (``site``) plus a second meter."""
    folder = work / "push"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "site-b.yaml"
    path.write_text(site + "  - {id: meter-2, driver: virtual, kind: meter, interval: 1s}\n")
    return path


class Watcher:
    """A paho client stamping every desired and reported document of ``version`` as it arrives (monotonic)."""

    def __init__(self, port: int, root: str, version: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.root, self.version = root, version
        self.desired: dict[str, float] = {}  # gateway -> first live (not retained) desired document
        self.reports: dict[str, dict[str, float]] = {}  # gateway -> status -> first report of it, this version
        self.other: Counter[str] = Counter()  # reports of other versions seen meanwhile (retained ones, at start)
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-push-watch-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_socket_open = no_delay
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        topics = [(f"{root}/+/desired", 1), (f"{root}/+/reported", 1)]
        self.client.on_connect = lambda c, _u, _f, reason, _p: None if reason.is_failure else c.subscribe(topics)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the push watcher could not subscribe")

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        gateway, kind = parts[-2], parts[-1]
        with self.lock:
            if kind == "desired" and not msg.retain:
                self.desired.setdefault(gateway, now)
            elif kind == "reported":
                with contextlib.suppress(ValueError, AttributeError):
                    report = json.loads(msg.payload)
                    if report.get("version") == self.version:
                        self.reports.setdefault(gateway, {}).setdefault(str(report.get("status")), now)
                    else:
                        self.other[f"v{report.get('version')} {report.get('status')}"] += 1

    def answered(self, gateways: list[str]) -> int:
        with self.lock:
            return sum(1 for g in gateways if any(s in self.reports.get(g, {}) for s in FINAL))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def spread(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "n": len(s),
        "p50": pl.percentile(s, 50),
        "p95": pl.percentile(s, 95),
        "max": s[-1] if s else float("nan"),
    }


def push(work: Path, port: int, gateways: list[str], key: Path, key_id: str, site: str, root: str) -> dict[str, Any]:
    """Push site-b.yaml to ``gateways`` with the CLI; the committed and applied times, the outcomes, the CLI's say."""
    document = site_b(work, port, site)
    watcher = Watcher(port, root, VERSION)
    to = f"{gateways[0]}..{gateways[-1]}"
    wait = HEALTH_WINDOW + 50
    cli = [sys.executable, "-m", "agent", "fleet", "push-config", str(document), "--to", to, "--key", str(key)]
    cli += ["--key-id", key_id, "--version", str(VERSION), "--health-window", str(HEALTH_WINDOW)]
    cli += ["--wait", str(wait), "--json", "--port", str(port), "--root", root]
    launched = time.monotonic()
    try:
        proc = pl._spawn(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=pl.ROOT)
        try:
            out, err = proc.communicate(timeout=wait + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finished = time.monotonic()
        # The CLI stops at the last answer; the watcher may get that report a moment after it.
        with contextlib.suppress(RuntimeError):
            pl.wait_for(lambda: watcher.answered(gateways) >= len(gateways), 2.0, "the last report", 0.02)
    finally:
        watcher.close()
    with watcher.lock:
        desired = {g: t for g, t in watcher.desired.items() if g in gateways}
        reports = {g: dict(r) for g, r in watcher.reports.items() if g in gateways}
    t0 = min(desired.values(), default=launched)
    committed = [r["applying"] - t0 for r in reports.values() if "applying" in r]
    applied = [r["applied"] - t0 for r in reports.values() if "applied" in r]
    outcomes = Counter(next((s for s in FINAL if s in reports.get(g, {})), "no_answer") for g in gateways)
    cli_summary: dict[str, Any] = {}
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        cli_summary = json.loads(out)["summary"]
    return {
        "gateways": len(gateways),
        "version": VERSION,
        "health_window": HEALTH_WINDOW,
        "cli_exit": proc.returncode,
        "cli_seconds": finished - launched,
        "cli_start_to_publish": t0 - launched,
        "cli_summary": cli_summary,
        "cli_stderr": err.decode(errors="replace").strip()[-500:],
        "published": len(desired),
        "publish_span": max(desired.values(), default=t0) - t0,
        "committed": spread(committed),
        "applied": spread(applied),
        "applied_after_window": spread([t - HEALTH_WINDOW for t in applied]),
        "outcomes": {s: outcomes.get(s, 0) for s in (*FINAL, "no_answer")},
    }
