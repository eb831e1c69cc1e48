"""A ``spBv1.0/#`` subscriber keeping every message as the broker delivered it.

MQTT 5 with Retain As Published, so the retain flag is the publisher's (a 3.1.1 subscriber sees
retain only on messages stored before it subscribed), and QoS 2 so the delivered QoS is the
publisher's. It sees what the proxy cannot: the Will the broker publishes for a lost client.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.conftest import wait_for
from tests.sparkplug.spb import decode


@dataclass(frozen=True)
class Message:
    at: float
    server: str
    topic: str
    qos: int
    retain: bool
    payload: bytes

    @property
    def decoded(self) -> Any:
        """The Sparkplug Payload (None for STATE's JSON or bytes that are not one)."""
        return None if self.topic.startswith("spBv1.0/STATE/") else decode(self.payload)


class Recorder:
    """Subscribes to ``topic`` on one broker; reconnects on its own across a broker restart."""

    def __init__(self, server: str, port: int, messages: list[Message], lock: threading.Lock,
                 topic: str = "spBv1.0/#") -> None:  # fmt: skip
        self.server = server
        self.messages = messages
        self.lock = lock
        self.topic = topic
        self.subscribed = threading.Event()
        cid = f"spb-recorder-{server}-{os.getpid()}-{time.monotonic_ns()}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.3)  # type: ignore[arg-type]  # paho's stub says int; it sleeps floats
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, f"the recorder on {server} to subscribe")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self.topic, options=SubscribeOptions(qos=2, retainAsPublished=True))

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(
                Message(time.time(), self.server, msg.topic, msg.qos, bool(msg.retain), bytes(msg.payload))
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
