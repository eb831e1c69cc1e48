"""A ``spBv1.0/#`` recorder that decodes every payload with the edge node's own Payload class,
and the site file of an agent running the Sparkplug uplink beside the JSON one."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.uplinks.sparkplug.proto import payload_class
from tests.conftest import wait_for, write_config

GROUP, NODE = "plant", "gw-test"


@dataclass
class Message:
    topic: str
    kind: str  # NBIRTH, DDATA, ...
    device: str | None
    payload: Any  # the decoded Payload (None for STATE)
    raw: bytes
    retain: bool
    qos: int
    at: float

    def metrics(self) -> dict[str, Any]:
        """name-or-alias -> decoded Metric."""
        return {m.name if m.HasField("name") else m.alias: m for m in self.payload.metrics}


class Recorder:
    """Subscribes to ``spBv1.0/#`` (QoS 1 so QoS 0 DATA arrives as sent) and keeps what it saw."""

    def __init__(self, port: int) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        self.port = port
        # A persistent session, back within half a second of a broker restart: what the edge node
        # sends before the recorder is back is queued for it (the broker queues QoS 0 too).
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"rec-{time.time()}", clean_session=False
        )
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, *_: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.client.is_connected, 5, "the recorder to connect")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if parts[1] == "STATE":
            kind, device, payload = "STATE", None, None
        else:
            kind, device = parts[2], parts[4] if len(parts) > 4 else None
            try:
                payload = payload_class().FromString(msg.payload)
            except Exception:  # a test's deliberately broken command
                payload = None
        with self.lock:
            self.messages.append(
                Message(
                    msg.topic, kind, device, payload, bytes(msg.payload), bool(msg.retain), msg.qos, time.monotonic()
                )
            )

    def of(self, kind: str, device: str | None = None) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m.kind == kind and (device is None or m.device == device)]

    def wait(self, kind: str, device: str | None = None, count: int = 1, timeout: float = 10) -> list[Message]:
        return wait_for(
            lambda: len(self.of(kind, device)) >= count and self.of(kind, device),
            timeout,
            f"{count} {kind} of {device}",
        )

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def site(path: Path, *, port: int, devices: str, sparkplug: str = "", buffer: Path | None = None) -> Path:
    """A site file: the JSON uplink and the Sparkplug edge node on the same test broker."""
    extra = (
        "  sparkplug: {enabled: true, group_id: " + GROUP + ", servers: [{host: 127.0.0.1, port: " + str(port) + "}],"
        " keepalive: 2s, reconnect_min: 100ms, reconnect_max: 500ms" + (", " + sparkplug if sparkplug else "") + "}\n"
    )
    write_config(path, port=port, devices=devices, buffer=buffer)
    text = path.read_text().replace("buffer:", extra + "buffer:", 1)
    path.write_text(text)
    return path
