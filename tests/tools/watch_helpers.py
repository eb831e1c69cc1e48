"""A faked gateway (the agent's own event builders, a test client publishing) and the watcher as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract import data
from agent.contract.events import (
    DEVICE_STATUS,
    METER_READING,
    Reading,
    batch_topic,
    make_event,
    status_topic,
    topic_for,
)
from agent.fleet.inventory import inventory_event
from tests.conftest import ROOT

GATEWAY = "gw-fake"
EPOCH = "0123456789abcdef"
PREFIX = "ioc/v1"


def reading(seq: int, *, device: str = "meter-1", value: float = 1.0, taken: datetime | None = None,
            epoch: str = EPOCH, gateway: str = GATEWAY) -> tuple[str, bytes]:  # fmt: skip
    """(topic, payload) of a city.meter.reading as the agent builds it."""
    body = data.meter_reading([data.measurement("active_power", value, "kW")])
    payload = make_event(gateway=gateway, device=device, seq=seq, reading=Reading(METER_READING, body, taken),
                         now=datetime.now(UTC), epoch=epoch)  # fmt: skip
    return topic_for(PREFIX, gateway, device, METER_READING), payload


def status_event(seq: int, status: str = "offline", *, device: str = "meter-1") -> tuple[str, bytes]:
    """(topic, payload) of a city.device.status (class alarm)."""
    since = datetime.now(UTC) - timedelta(seconds=5)
    body = data.device_status(status, "timeout" if status == "offline" else None, "virtual", 3, since)
    payload = make_event(gateway=GATEWAY, device=device, seq=seq, reading=Reading(DEVICE_STATUS, body),
                         now=datetime.now(UTC), epoch=EPOCH)  # fmt: skip
    return topic_for(PREFIX, GATEWAY, device, DEVICE_STATUS), payload


def batch(*events: tuple[str, bytes]) -> tuple[str, bytes]:
    """The CloudEvents JSON batch of ``events`` on the gateway's batch topic."""
    return batch_topic(PREFIX, GATEWAY), b"[" + b",".join(p for _, p in events) + b"]"


def inventory(synced: bool = True) -> tuple[str, bytes]:
    """(topic, payload) of the retained city.gateway.inventory, built by the agent's own function."""
    body = {
        "agent_version": "0.1.0", "python": "3.11.7", "started_at": "2026-12-07T14:31:38.972Z", "uptime_s": 0.1,
        "config": {"version": 0, "hash": "sha256:" + "0" * 64, "origin": "local"},
        "models": [], "profiles": [], "certificate": None, "clock": {"synced": synced, "source": "kernel"},
        "buffer": {"rows": 0, "oldest_age_s": None},
    }  # fmt: skip
    return f"{PREFIX}/{GATEWAY}/inventory", inventory_event(GATEWAY, body)


def availability(word: bytes = b"online") -> tuple[str, bytes]:
    return status_topic(PREFIX, GATEWAY), word


class Publisher:
    """A test client publishing QoS 1 and waiting for each PUBACK, so order and arrival are certain."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-gateway")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, *messages: tuple[str, bytes], retain: bool = False) -> None:
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Watcher:
    """``edge-agent watch --json`` as a process; ``start`` returns once it has subscribed."""

    def __init__(self, port: int, *args: str, duration: float = 3.0) -> None:
        argv = [sys.executable, "-m", "agent", "watch", "--port", str(port), "--duration", str(duration), "--json"]
        self.proc = subprocess.Popen([*argv, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline().decode()
        assert "subscribed to" in first, first + self.proc.stderr.read().decode()
        self.first_line = first

    def result(self, timeout: float = 30.0) -> tuple[int, dict[str, Any], str]:
        """(exit status, the JSON report, the rest of stderr)."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, json.loads(out), err.decode()


def device(report: dict[str, Any], name: str = "meter-1", gateway: str = GATEWAY) -> dict[str, Any]:
    return dict(report["gateways"][gateway]["devices"][name])


def kinds(report: dict[str, Any]) -> list[str]:
    return [v["kind"] for v in report["violations"]]
