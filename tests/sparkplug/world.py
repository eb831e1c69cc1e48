"""The real parts a TCK-lite session runs on: Mosquitto brokers each behind a recording proxy with a
``spBv1.0/#`` recorder, a test host publishing STATE and commands, and a simulated Modbus unit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from drivers.modbus.config import PointConfig
from drivers.modbus.simulator import SimulatedUnit, Simulator
from tests.conftest import Mosquitto, free_port, wait_for
from tests.sparkplug.packets import Packet
from tests.sparkplug.proxy import RecordingProxy, Tape
from tests.sparkplug.recorder import Message, Recorder
from tests.sparkplug.session import NAMESPACE
from tests.sparkplug.spb import Payload

POINTS = [
    {"name": "setpoint", "table": "holding", "address": 30, "type": "int16", "scale": 0.1, "offset": -40,
     "quantity": "temperature", "unit": "degC", "writable": True},
    {"name": "power", "table": "holding", "address": 10, "type": "int16", "scale": 0.001, "quantity": "active_power",
     "unit": "kW"},
]  # fmt: skip
ABSENT = {"name": "absent", "table": "holding", "address": 500, "type": "int16", "quantity": "temperature",
          "unit": "degC"}  # fmt: skip


class ModbusUnit:
    """A simulated Modbus TCP unit served from its own thread; ``stop`` takes the device offline."""

    def __init__(self) -> None:
        self.port = free_port()
        # strict: the site's ABSENT point reads an undefined register, so it is reported with bad quality
        self.unit = SimulatedUnit(1, [PointConfig.model_validate(p) for p in POINTS], strict=True)
        self.loop = asyncio.new_event_loop()
        self.sim = Simulator([self.unit], period=3600)
        self.thread = threading.Thread(target=self.loop.run_forever, name="spb-modbus", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.serve_tcp("127.0.0.1", self.port), self.loop).result(10)
        self.running = True

    def stop(self) -> None:
        if self.running:
            asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(10)
            self.running = False

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Host:
    """The test's host application on one broker: STATE, NCMD and DCMD, as a SCADA host sends them."""

    def __init__(self, port: int, host_id: str) -> None:
        self.host_id = host_id
        cid = f"spb-test-host-{os.getpid()}-{time.monotonic_ns()}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        wait_for(self.client.is_connected, 5, "the test host to connect")

    def state(self, online: bool, ts: int, *, retain: bool = True, host_id: str | None = None) -> None:
        payload = json.dumps({"online": online, "timestamp": ts}).encode()
        topic = f"{NAMESPACE}/STATE/{host_id or self.host_id}"
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def command(self, topic: str, metrics: list[dict[str, Any]]) -> None:
        p = Payload()
        p.timestamp = int(time.time() * 1000)
        for spec in metrics:
            m = p.metrics.add()
            for key, value in spec.items():
                setattr(m, key, value)
        self.client.publish(topic, p.SerializeToString(), qos=0).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Servers:
    """Brokers named A, B, ... each behind a recording proxy on one tape, each with a recorder."""

    def __init__(self, workdir: Path, names: tuple[str, ...]) -> None:
        self.tape = Tape()
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        self.brokers: dict[str, Mosquitto] = {}
        self.proxies: dict[str, RecordingProxy] = {}
        self.recorders: dict[str, Recorder] = {}
        for name in names:
            folder = workdir / f"broker-{name}"
            folder.mkdir()
            broker = Mosquitto(folder)
            broker.start()
            self.brokers[name] = broker
            self.proxies[name] = RecordingProxy(self.tape, name, broker.port).start()
            self.recorders[name] = Recorder(name, broker.port, self.messages, self.lock)

    def packets(self) -> list[Packet]:
        return self.tape.packets()

    def snapshot(self) -> list[Message]:
        with self.lock:
            return list(self.messages)

    def wait_packet(self, what: str, pred: Callable[[Packet], bool], timeout: float = 10) -> Packet:
        found: Packet = wait_for(lambda: next((p for p in self.packets() if pred(p)), None), timeout, what)
        return found

    def close(self) -> None:
        for r in self.recorders.values():
            r.close()
        for p in self.proxies.values():
            p.stop()
        for b in self.brokers.values():
            b.stop()


@contextlib.contextmanager
def servers(workdir: Path, names: tuple[str, ...]) -> Iterator[Servers]:
    made = Servers(workdir, names)
    try:
        yield made
    finally:
        made.close()
