"""The uplink against a second MQTT broker implementation: amqtt (pure Python), not Mosquitto.

The rest of the suite runs the agent against Mosquitto; a behaviour the agent only gets right
because of how Mosquitto answers would pass there. Here ``python -m agent run`` publishes the
events of virtual devices to an amqtt broker process (amqtt is a dependency already: the demo
embeds it), the broker is stopped and started again twice (killed, then stopped cleanly), and an
independent subscriber counts what reaches it: no event lost, each device's events in order
within each event type.

amqtt keeps nothing across a restart: not the subscriber's subscription, not the messages it
acknowledged (PUBACK) but had not yet passed on. Those would be the broker's losses, not the
agent's, so the agent's link runs through the suite's TCP proxy (tests/mqtt_proxy.py): before
each stop the proxy holds the agent's traffic (what the agent publishes then reaches no broker
and is never acknowledged: it must be sent again), and after the restart it holds the agent's
reconnection until the subscriber is subscribed again. The agent runs with the log folding as
shipped (one line per 60 s), so its log also shows whether "uplink connected" survives two
restarts within a minute (issue 13).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import analyse, free_port, last_seqs, wait_for, write_config
from tests.mqtt_proxy import MqttProxy

DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n"
    "  - {id: bay-1, driver: virtual, kind: parking, bay: A1, interval: 20ms}\n"
    "  - {id: crossing-1, driver: virtual, kind: crosswalk, area: north, interval: 20ms}\n"
)
DEVICE_IDS = ("meter-1", "bay-1", "crossing-1")


class Amqtt:
    """An amqtt broker process (its own command line, ``amqtt -c``) on a fixed loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / "amqtt.yaml"
        self.conf.write_text(
            "listeners:\n"
            f"  default: {{type: tcp, bind: '127.0.0.1:{self.port}'}}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin: {allow_anonymous: true}\n"
        )
        self.log = workdir / "amqtt.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

        def accepting() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            return False

        wait_for(accepting, 20, "amqtt to accept connections")

    def stop(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class CountingSubscriber:
    """Every event the broker delivers, in arrival order; knows when its subscription is in place."""

    def __init__(self, port: int, topic: str = "ioc/v1/#") -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"interop-sub-{os.getpid()}")
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_disconnect = lambda *_: self.subscribed.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 20, "the subscriber to subscribe")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/status") and msg.topic.count("/") == 3:
            return  # the gateway's availability, not an event
        decoded = json.loads(msg.payload)
        with self.lock:
            self.events += decoded if isinstance(decoded, list) else [decoded]

    def seqs(self, device: str, event_type: str | None = None) -> list[int]:
        with self.lock:
            return [e["seq"] for e in self.events if e["device"] == device and event_type in (None, e["type"])]

    def types(self, device: str) -> set[str]:
        with self.lock:
            return {e["type"] for e in self.events if e["device"] == device}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def amqtt(tmp_path: Path) -> Iterator[Amqtt]:
    broker = Amqtt(tmp_path)
    broker.start()
    yield broker
    broker.stop(signal.SIGKILL)


def test_the_uplink_survives_amqtt_restarts_with_nothing_lost_and_each_device_in_order(
    tmp_path: Path, amqtt: Amqtt, agent_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_LOG_REPEAT_BURST", "1")  # the log folding as shipped
    monkeypatch.delenv("EDGE_AGENT_LOG_REPEAT_WINDOW", raising=False)
    monkeypatch.setenv("EDGE_AGENT_LOG_FORMAT", "text")
    sub = CountingSubscriber(amqtt.port)
    proxy = MqttProxy(amqtt.port).start()
    try:
        buffer = tmp_path / "buffer.db"
        agent = agent_factory(write_config(tmp_path / "site.yaml", port=proxy.port, devices=DEVICES, buffer=buffer))
        wait_for(lambda: all(len(sub.seqs(d)) >= 20 for d in DEVICE_IDS), 30, "events from every device")
        for sig in (signal.SIGKILL, signal.SIGINT):  # a crash, then a clean stop
            proxy.blackhole(True)  # from here the agent's publications reach no broker
            time.sleep(0.3)  # the broker passes on what it acknowledged
            before = {d: max(sub.seqs(d)) for d in DEVICE_IDS}
            amqtt.stop(sig)
            time.sleep(0.5)  # the devices go on producing: the agent buffers
            amqtt.start()
            wait_for(sub.subscribed.is_set, 20, "the subscriber to subscribe again")
            proxy.blackhole(False)  # the agent finds its connection gone and reconnects
            wait_for(lambda b=before: all(max(sub.seqs(d)) > b[d] + 10 for d in DEVICE_IDS), 30,
                     "events after the restart")  # fmt: skip
        upto = last_seqs(buffer)  # the last seq given to each device so far

        def missing() -> dict[str, list[int]]:
            return {d: sorted(set(range(1, upto[d] + 1)) - set(sub.seqs(d)))[:20] for d in DEVICE_IDS}

        try:
            wait_for(lambda: not any(missing().values()), 30, "every event up to the last seq")
        except AssertionError:
            raise AssertionError(f"lost (the first 20 per device): {missing()}") from None
        agent.signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    finally:
        sub.close()
        proxy.stop()
    for device in DEVICE_IDS:
        # Order is per device within an event type (a status event may overtake buffered readings).
        inversions = {t: analyse(sub.seqs(device, t))["inverted_at"] for t in sub.types(device)}
        assert not any(inversions.values()), (device, inversions)
    uplink = re.findall(r"uplink (connected|lost|down)", agent.output())
    assert uplink.count("connected") >= 3, agent.output()[-3000:]  # the first and after each restart
    assert uplink[-1] == "connected", agent.output()[-3000:]  # the log ends on the uplink's state
