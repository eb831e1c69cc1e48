"""One MQTT connection for the edge node: paho on its own network thread, its events on the loop.

The edge node sends little (QoS 0 DATA, a few QoS 1 messages) and must notice a lost link within
a keepalive, which paho's own thread does; everything it reports is handed to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.uplinks.mqtt.errors import ConnectionLost
from agent.uplinks.mqtt.futures import settle
from agent.uplinks.sparkplug.config import Server, SparkplugConfig

CONNACK_TIMEOUT = 10.0
SUBACK_TIMEOUT = 10.0


class Connection:
    """A clean session to one server with the NDEATH will; messages arrive in :attr:`messages`.

    The will is made by ``will()`` only once the TCP (and TLS) connection is up, right before
    paho writes the CONNECT: the node's bdSeq goes up by one per CONNECT packet sent
    (topics-nbirth-bdseq-increment), never for an attempt the network or the broker's port
    refused. :attr:`will_payload` is then what the CONNECT carried.
    """

    def __init__(self, cfg: SparkplugConfig, server: Server, client_id: str,
                 will: tuple[str, Callable[[], bytes]]) -> None:  # fmt: skip
        """Set up the client (no I/O until :meth:`open`)."""
        self.cfg, self.server = cfg, server
        self.will_topic, self._make_will = will
        self.will_payload: bytes | None = None
        self.where = f"{server.host}:{cfg.port(server)}"
        self.loop = asyncio.get_running_loop()
        self.messages: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self.lost: asyncio.Future[str] = self.loop.create_future()
        self.up_since = 0.0
        self._connected: asyncio.Future[None] = self.loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[Any]]] = {}
        v5 = cfg.protocol == "5"
        # 3.1.1: Clean Session true; 5: Clean Start true and no Session Expiry Interval, which is 0
        # (principles-persistence-clean-session-311/-50).
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else True,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.on_socket_open = self._on_socket_open
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls.active:
            cfg.tls.apply_to(client)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    def _on_socket_open(self, client: paho.Client, _u: Any, _sock: Any) -> None:
        # On the thread running connect(), after the TCP/TLS connect and before the CONNECT is
        # written: paho reads the will when it builds that packet.
        self.will_payload = self._make_will()
        client.will_set(self.will_topic, self.will_payload, qos=1, retain=False)

    # paho's thread -> the loop
    def _on_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            error = ConnectionLost(f"{self.where} refused the connection: {reason}")
            self.loop.call_soon_threadsafe(settle, self._connected, None, error)
        else:
            self.loop.call_soon_threadsafe(settle, self._connected)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        text = f"connection to {self.where} closed ({reason})"
        self.loop.call_soon_threadsafe(settle, self._connected, None, ConnectionLost(text))
        self.loop.call_soon_threadsafe(settle, self.lost, text)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        def granted() -> None:
            fut = self._subacks.pop(mid, None)
            if fut is not None:
                settle(fut, codes)

        self.loop.call_soon_threadsafe(granted)

    async def open(self) -> None:
        """Connect and wait for the CONNACK (ConnectionLost if refused or unreachable)."""
        cfg, client = self.cfg, self.client
        # MQTT 5: Clean Start on every CONNECT (paho's default is the first one only).
        clean: dict[str, Any] = {"clean_start": True} if cfg.protocol == "5" else {}
        try:
            await self.loop.run_in_executor(
                None,
                lambda: client.connect(self.server.host, cfg.port(self.server), keepalive=int(cfg.keepalive), **clean),
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionLost(f"cannot connect to {self.where}: {exc}") from exc
        client.loop_start()
        try:
            await asyncio.wait_for(self._connected, CONNACK_TIMEOUT)
        except TimeoutError as exc:
            raise ConnectionLost(f"no CONNACK from {self.where}") from exc
        self.up_since = time.monotonic()

    async def subscribe(self, topics: list[tuple[str, int]]) -> None:
        """Subscribe and wait for the SUBACK; a refused filter is a ConnectionLost (nothing would arrive)."""
        fut: asyncio.Future[list[Any]] = self.loop.create_future()
        result, mid = self.client.subscribe(topics)
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(f"could not subscribe on {self.where}: {paho.error_string(result)}")
        self._subacks[mid] = fut
        try:
            codes = await asyncio.wait_for(asyncio.shield(fut), SUBACK_TIMEOUT)
        except TimeoutError as exc:
            raise ConnectionLost(f"no SUBACK from {self.where}") from exc
        refused = [t for (t, _), c in zip(topics, codes, strict=False) if getattr(c, "is_failure", c == 0x80)]
        if refused:
            raise ConnectionLost(f"{self.where} refused the subscription to {', '.join(refused)} (check its ACL)")

    @property
    def up(self) -> bool:
        """Whether the connection is (still) up."""
        return self._connected.done() and self._connected.exception() is None and not self.lost.done()

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> paho.MQTTMessageInfo:
        """Publish, never retained (no Sparkplug edge node message is)."""
        return self.client.publish(topic, payload, qos=qos, retain=False)

    async def close(self, *, farewell: tuple[str, bytes] | None = None) -> None:
        """Disconnect (after publishing ``farewell`` with QoS 1, waited for at most a second)."""
        client = self.client
        if farewell is not None and self.up:
            info = client.publish(farewell[0], farewell[1], qos=1, retain=False)
            deadline = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < deadline and self.up:
                await asyncio.sleep(0.01)
        if self.cfg.protocol == "5":
            # MQTT 5: "Disconnect with Will Message", so the broker sends NDEATH too
            # (payloads-ndeath-will-message-publisher-disconnect-mqtt50).
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        else:
            client.disconnect()
        await self.loop.run_in_executor(None, client.loop_stop)
        settle(self.lost, "closed")
