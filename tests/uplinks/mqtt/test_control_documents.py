"""The fleet channel's documents on a real Mosquitto: the core's reports go out retained on every
connection and on each change; the desired document comes in, newest first, once connected.

The uplink runs in this process with a small core of its own (:class:`Core` records what the
uplink hands over), so the test sees exactly what crosses the seam.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.store.outbox import Stored
from agent.uplinks.api import Command, Reply, Reports, UplinkContext
from agent.uplinks.mqtt.config import MqttConfig
from agent.uplinks.mqtt.uplink import MqttUplink
from tests.conftest import Mosquitto


class Core:
    """The core's side of the seam, recording the documents it is handed."""

    def __init__(self) -> None:
        self.documents: list[tuple[str, bytes, str]] = []

    async def write(self, device: str, point: str, value: Any, *, origin: str) -> None:
        raise AssertionError("no writes in this test")

    async def command(self, command: Command) -> Reply:
        return Reply("unsupported")

    async def request(self, name: str, request_id: str, data: bytes, *, origin: str) -> Reply:
        return Reply("unsupported")

    async def document(self, kind: str, data: bytes, *, origin: str) -> None:
        self.documents.append((kind, data, origin))

    def refused(self, code: str, *, origin: str) -> None:
        raise AssertionError(f"nothing is refused in this test ({code})")


class NoEvents:
    """A feed with nothing to send."""

    def __init__(self) -> None:
        self.committed = asyncio.Event()

    async def next_batch(self, cursors: dict[int, int], limit: int) -> list[Stored]:
        return []

    async def ack(self, ids: Sequence[int]) -> int:
        return 0


def _retained(port: int, topic: str) -> bytes | None:
    """What the broker keeps retained on ``topic`` (None: nothing), read by a fresh client."""
    got: list[bytes] = []
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="peek")
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        for _ in range(20):
            if got:
                break
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1] if got else None


async def _until(check: Any, timeout: float, what: str) -> None:
    for _ in range(int(timeout / 0.05)):
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_reports_retained_on_connect_change_and_reconnect_and_desired_handed_over(
    tmp_path: Path, broker: Mosquitto
) -> None:
    async def scenario() -> None:
        core, reports = Core(), Reports()
        context = UplinkContext("mqtt", "MQTT", "gw-1", core, tmp_path, "fleet/v1", reports)
        settings = MqttConfig(port=broker.port, keepalive=5, reconnect_min=0.1, reconnect_max=1)
        uplink = MqttUplink(settings, gateway="gw-1", context=context)
        reports.put("reported", b'{"version": 1}')
        reports.put("inventory", b'{"type": "city.gateway.inventory"}')
        reports.put("nobody-knows", b"{}")  # a name without a topic is not published anywhere
        # The operator published two versions while the gateway was away: only the newest is kept.
        publisher = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="operator")
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        publisher.publish("fleet/v1/gw-1/desired", b"desired-1", qos=1, retain=True).wait_for_publish(5)
        publisher.publish("fleet/v1/gw-1/desired", b"desired-2", qos=1, retain=True).wait_for_publish(5)
        task = asyncio.create_task(uplink.run(NoEvents()))  # type: ignore[arg-type]
        try:
            await _until(lambda: _retained(broker.port, "fleet/v1/gw-1/reported") == b'{"version": 1}', 10, "reported")
            assert _retained(broker.port, "ioc/v1/gw-1/inventory") == b'{"type": "city.gateway.inventory"}'
            await _until(lambda: bool(core.documents), 10, "the desired document")
            assert core.documents == [("config", b"desired-2", "mqtt")]

            reports.put("reported", b'{"version": 2}')  # a change goes out at once
            await _until(lambda: _retained(broker.port, "fleet/v1/gw-1/reported") == b'{"version": 2}', 5, "v2")
            publisher.publish("fleet/v1/gw-1/desired", b"desired-3", qos=1, retain=True).wait_for_publish(5)
            await _until(lambda: len(core.documents) == 2, 5, "the new desired document")
            assert core.documents[-1] == ("config", b"desired-3", "mqtt")

            # A broker restart: the next connection publishes the reports again (a broker that
            # lost them gets them back), and the retained desired document comes in again: the
            # core, not the uplink, knows it was applied already.
            publisher.loop_stop()
            reports.put("reported", b'{"version": 3}')  # changed while away: the newest goes out
            broker.stop()
            broker.start()
            await _until(lambda: _retained(broker.port, "fleet/v1/gw-1/reported") == b'{"version": 3}', 15, "again")
            assert _retained(broker.port, "ioc/v1/gw-1/inventory") == b'{"type": "city.gateway.inventory"}'
            assert _retained(broker.port, "fleet/v1/gw-1/nobody-knows") is None
            await _until(lambda: len(core.documents) == 3, 5, "the desired document again")
            assert core.documents[-1] == ("config", b"desired-3", "mqtt")
        finally:
            await uplink.goodbye()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
