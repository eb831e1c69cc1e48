"""Real parts for the ingestion tests: `edge-agent ingest` worker processes and a publisher of real agent events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.events import Reading, make_event
from tests.conftest import ROOT, wait_for

PREFIX = "ioc/v1"
EPOCH = "5f0c2a9e81d34b17"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def reading_event(gateway: str, device: str, seq: int, epoch: str = EPOCH) -> bytes:
    """A ``city.meter.reading`` exactly as the agent builds it (agent/contract/events.py)."""
    data = {"measurements": [
        {"quantity": "active_power", "value": seq / 10, "unit": "kW", "quality": "good", "point": "p"},
        {"quantity": "voltage", "value": 230.0, "unit": "V", "quality": "good", "phase": "L1"},
    ]}  # fmt: skip
    reading = Reading("city.meter.reading", data, time=T0 + timedelta(seconds=seq))
    return make_event(gateway=gateway, device=device, seq=seq, reading=reading, now=T0, epoch=epoch)


def status_event(gateway: str, device: str, seq: int, status: str = "offline") -> bytes:
    data = {"status": status, "reason": "timeout" if status == "offline" else None, "driver": "modbus",
            "consecutive_failures": 3, "since": "2026-11-23T08:00:00.000Z"}  # fmt: skip
    reading = Reading("city.device.status", data, time=T0 + timedelta(seconds=seq))
    return make_event(gateway=gateway, device=device, seq=seq, reading=reading, now=T0, epoch=EPOCH)


class Publisher:
    """A QoS 1 publisher that waits for every PUBACK (reconnects on its own after a broker restart)."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ingest-pub-{time.monotonic_ns()}")
        self.client.reconnect_delay_set(1, 2)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, messages: list[tuple[str, bytes]], timeout: float = 60) -> None:
        wait_for(self.client.is_connected, 20, "the publisher to be connected")
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        wait_for(lambda: all(i.is_published() for i in infos), timeout, "every PUBACK")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class IngestProcess:
    """``edge-agent ingest --worker N`` as a real process; its log in ``log``, its last stdout line is its stats."""

    def __init__(self, dsn: str, port: int, worker: int, folder: Path, *extra: str) -> None:
        self.args = [sys.executable, "-m", "agent", "-v", "ingest", "--dsn", dsn, "--port", str(port),
                     "--worker", str(worker), "--stats-interval", "1", *extra]  # fmt: skip
        self.log = folder / f"ingest-{worker}.log"
        self.out = folder / f"ingest-{worker}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> IngestProcess:
        # The agent's log limits repeated lines (one per template a minute); the tests read every one.
        env = {**os.environ, "EDGE_AGENT_LOG_REPEAT_BURST": "1000"}
        with self.log.open("ab") as log, self.out.open("wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=log, cwd=ROOT, env=env)
        connects = self.text().count("connected (session present")
        wait_for(lambda: self.text().count("connected (session present") > connects, 20, "the worker to connect")
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the stats line it prints at the end."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(20) == 0, self.text()[-3000:]
        return dict(json.loads(self.out.read_text().strip().splitlines()[-1]))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement).fetchall()  # type: ignore[arg-type]


def count(dsn: str, statement: str) -> int:
    return int(query(dsn, statement)[0][0])


def wait_rows(dsn: str, statement: str, expected: int, timeout: float) -> None:
    def there() -> bool:
        return count(dsn, statement) >= expected

    try:
        wait_for(there, timeout, statement, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{statement}: {count(dsn, statement)} of {expected} after {timeout}s") from None
