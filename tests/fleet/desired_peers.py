"""The operator's side of the remote configuration tests, on a real broker: publishing desired
documents retained and following the reported ones and the events (optionally with a TLS client
certificate, for the shipped ACL)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import wait_for

DESIRED = "fleet/v1/gw-test/desired"
REPORTED = "fleet/v1/gw-test/reported"


class Peer:
    """A paho client (plain, or with ``certs``: (folder, name) of a test CA's files) that records what it receives."""

    def __init__(self, port: int, *topics: str, certs: tuple[Path, str] | None = None) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        self._topics = topics
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-peer-{time.monotonic_ns()}")
        if certs is not None:
            folder, name = certs
            self.client.tls_set(
                ca_certs=str(folder / "ca.pem"),
                certfile=str(folder / f"{name}.crt"),
                keyfile=str(folder / f"{name}.key"),
            )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._ready.wait(10), "the test's MQTT client did not connect"

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        assert not reason.is_failure, reason
        if self._topics:
            client.subscribe([(t, 1) for t in self._topics])
        self._ready.set()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), message.topic, bytes(message.payload)))

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), topic

    def reports(self) -> list[dict[str, Any]]:
        """Every reported document received, oldest first."""
        with self._lock:
            return [json.loads(p) for _, t, p in self.messages if t == REPORTED and p]

    def wait_report(self, timeout: float, **expected: Any) -> dict[str, Any]:
        """The first report (received so far or later) whose fields match ``expected``."""

        def found() -> dict[str, Any] | None:
            for doc in self.reports():
                if all(doc.get(k) == v for k, v in expected.items()):
                    return doc
            return None

        try:
            return wait_for(found, timeout, f"a report with {expected}")  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"no report with {expected} in {timeout}s; got {self.reports()[-5:]}") from None

    def events(self) -> list[dict[str, Any]]:
        """Every event received on the events topics (batches unrolled)."""
        found: list[dict[str, Any]] = []
        with self._lock:
            messages = list(self.messages)
        for _, topic, payload in messages:
            if not topic.startswith("ioc/v1/") or topic.count("/") == 3:  # availability, inventory
                continue
            decoded = json.loads(payload)
            found += decoded if isinstance(decoded, list) else [decoded]
        return found

    def seqs(self, device: str) -> list[int]:
        return [e["seq"] for e in self.events() if e.get("device") == device]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def contiguous(seqs: list[int]) -> bool:
    """Every seq from the first to the last, none missing (duplicates allowed: at least once)."""
    return bool(seqs) and set(seqs) == set(range(min(seqs), max(seqs) + 1))
