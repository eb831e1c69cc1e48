"""MQTT uplink: drains the event store to the broker with QoS 1 and a window in flight.

paho-mqtt does the protocol; this module drives its socket from the asyncio loop (the same
technique as aiomqtt) so publishing, PUBACK handling and the store share one thread and many
messages are in flight at once. The store, not paho's in-memory session, is the source of
truth: every connection is a fresh clean session, and on reconnect every unacknowledged row
is sent again (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.buffer import Stored
from agent.config import MqttConfig
from agent.events import batch_topic, status_topic
from agent.store import EventStore

log = logging.getLogger(__name__)

# Seconds over which PUBACKed events are gathered before one DELETE. A crash resends at most this
# much of what was already delivered (duplicates, same seq); each transaction costs an fsync.
ACK_FLUSH_INTERVAL = 0.1
ONLINE = b"online"
OFFLINE = b"offline"


@dataclass
class UplinkState:
    """What the health report and metrics say about the uplink."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    published: int = 0
    acked: int = 0


class ConnectionLost(Exception):
    """The broker connection ended; the publish loop restarts after backoff."""


class MqttUplink:
    """Keeps one connection to the broker and publishes the store's events through it."""

    def __init__(self, config: MqttConfig, store: EventStore, *, gateway: str) -> None:
        """Configure; nothing connects until :meth:`run`."""
        self.config = config
        self.store = store
        self.gateway = gateway
        self.state = UplinkState()
        self._status_topic = status_topic(config.topic_prefix, gateway)
        self._batch_topic = batch_topic(config.topic_prefix, gateway)
        self._client: paho.Client | None = None
        self._lost: asyncio.Future[str] | None = None
        self._inflight: dict[int, tuple[list[int], float]] = {}  # mid -> (row ids, sent at); publish order
        self._last_inbound = 0.0
        self._acked: list[int] = []
        self._acks_waiting = asyncio.Event()
        self._wake = asyncio.Event()

    # ---- connection ---------------------------------------------------------------
    def _new_client(self, loop: asyncio.AbstractEventLoop) -> paho.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"edge-agent-{self.gateway}",
            clean_session=None if v5 else True,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.will_set(self._status_topic, OFFLINE, qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls.active:
            cfg.tls.apply_to(client)
        lost: asyncio.Future[str] = loop.create_future()
        connected: asyncio.Future[None] = loop.create_future()
        refill_at = cfg.max_inflight // 2
        self._lost = lost

        def settle(fut: asyncio.Future[Any], value: Any = None, error: BaseException | None = None) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(value)

        def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                hint = (
                    " (check username and password_file)"
                    if "auth" in str(reason).lower() or "password" in str(reason).lower()
                    else ""
                )
                settle(connected, error=ConnectionLost(f"broker refused the connection: {reason}{hint}"))
            else:
                settle(connected)

        def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            # paho reports a closed socket as "Unspecified error"; say what happened.
            text = f"connection to {cfg.host}:{cfg.port} closed ({reason})"
            settle(connected, error=ConnectionLost(text))
            settle(lost, text)
            self._wake.set()

        def on_publish(_c: paho.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
            sent = self._inflight.pop(mid, None)
            if sent is not None:
                self._delivered(sent[0])
                self.state.acked += len(sent[0])
            # Refill in bulk: waking per PUBACK would cost a loop turn per message.
            if len(self._inflight) <= refill_at:
                self._wake.set()

        def on_socket_open(_c: paho.Client, _u: Any, sock: Any) -> None:
            # Called on the connecting thread: hand the socket to the loop thread.
            loop.call_soon_threadsafe(loop.add_reader, sock, self._read)

        def on_socket_close(_c: paho.Client, _u: Any, sock: Any) -> None:
            loop.remove_reader(sock)
            loop.remove_writer(sock)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_socket_open = on_socket_open
        client.on_socket_close = on_socket_close
        client.user_data_set(connected)
        return client

    def _read(self) -> None:
        self._last_inbound = time.monotonic()
        if self._client is not None:
            self._client.loop_read()
            self._flush_writes()

    def _flush_writes(self) -> None:
        """Write what paho queued; park the rest on the loop until the socket drains."""
        client = self._client
        if client is None:
            return
        sock = client.socket()
        if sock is None:
            return
        if client.want_write():
            client.loop_write()
        loop = asyncio.get_running_loop()
        if client.want_write():
            loop.add_writer(sock, self._writable)
        else:
            loop.remove_writer(sock)

    def _writable(self) -> None:
        self._flush_writes()

    async def _connect(self) -> paho.Client:
        loop = asyncio.get_running_loop()
        client = self._new_client(loop)
        self._client = client
        connected: asyncio.Future[None] = client.user_data_get()
        cfg = self.config
        try:
            await loop.run_in_executor(None, lambda: client.connect(cfg.host, cfg.port, keepalive=int(cfg.keepalive)))
        except (OSError, ssl.SSLError, socket.gaierror) as exc:
            raise ConnectionLost(f"cannot connect to {cfg.host}:{cfg.port}: {exc}") from exc
        self._last_inbound = time.monotonic()
        await asyncio.sleep(0)  # let the reader registration scheduled above run
        self._flush_writes()
        try:
            await asyncio.wait_for(connected, timeout=max(10.0, cfg.keepalive))
        except TimeoutError as exc:
            raise ConnectionLost(f"no CONNACK from {cfg.host}:{cfg.port}") from exc
        client.publish(self._status_topic, ONLINE, qos=1, retain=True)
        self._flush_writes()
        return client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            sock = client.socket()
            if sock is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock)
                loop.remove_writer(sock)
            client.disconnect()
            client._sock_close()
        self._inflight.clear()

    # ---- main loop ----------------------------------------------------------------
    async def run(self) -> None:
        """Connect, publish, reconnect with capped exponential backoff and full jitter; forever."""
        attempt = 0
        cfg = self.config
        while True:
            try:
                await self._connect()
                attempt = 0
                self.state.connected = True
                self.state.connects += 1
                self.state.since = time.time()
                self.state.last_error = None
                log.info("uplink connected to %s:%d", cfg.host, cfg.port)
                await self._publish_until_lost()
            except ConnectionLost as exc:
                reason = str(exc)
            except Exception as exc:
                # e.g. the buffer failed to read: log it, drop the connection, start over.
                log.exception("uplink error")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                was_connected = self.state.connected
                self.state.connected = False
                try:
                    await self._flush_acks()
                except Exception:  # the rows stay buffered and are sent again: a duplicate, not a loss
                    log.exception("could not record delivered events")
                self._drop_client()
            if was_connected:
                self.state.disconnects += 1
                self.state.since = time.time()
                log.warning("uplink lost: %s; buffering until it is back", reason)
            elif reason != self.state.last_error:
                log.warning("uplink down: %s; retrying with backoff", reason)
            self.state.last_error = reason
            attempt += 1
            delay = random.uniform(cfg.reconnect_min, min(cfg.reconnect_max, cfg.reconnect_min * 2**attempt))
            await asyncio.sleep(delay)

    async def _publish_until_lost(self) -> None:
        client, lost = self._client, self._lost
        if client is None or lost is None:
            raise ConnectionLost("not connected")
        cursors: dict[int, int] = {}  # per priority: last row id handed to paho this session
        window = self.config.max_inflight
        batch = self.config.batch
        per_message = batch.max_events if batch.enabled else 1
        misc_at = time.monotonic() + 1.0
        flusher = asyncio.create_task(self._ack_flusher(), name="uplink-ack-flusher")
        try:
            while not lost.done():
                # Clear before looking, so a commit or PUBACK during the look still wakes us.
                self._wake.clear()
                self.store.committed.clear()
                room = window - len(self._inflight)
                rows = await self.store.next_batch(cursors, room * per_message) if room > 0 else []
                if lost.done():
                    break
                if batch.enabled:
                    sent = self._publish_batches(client, rows, batch.max_events, batch.max_bytes)
                else:
                    sent = self._publish_each(client, rows)
                for row in rows:
                    cursors[row.priority] = row.id
                self.state.published += len(rows)
                self._flush_writes()
                if time.monotonic() >= misc_at:
                    client.loop_misc()  # keepalive pings and their timeout
                    self._check_link()
                    misc_at = time.monotonic() + 1.0
                if not rows or room - sent <= 0:
                    await self._wait_for_work(lost)
            raise ConnectionLost(lost.result())
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)

    def _publish_each(self, client: paho.Client, rows: list[Stored]) -> int:
        """One MQTT message per event, on the event's own topic."""
        for row in rows:
            self._send(client, row.topic, row.payload, [row.id])
        return len(rows)

    def _publish_batches(self, client: paho.Client, rows: list[Stored], max_events: int, max_bytes: int) -> int:
        """CloudEvents JSON batch format: a JSON array of events per message, on the batch topic."""
        messages = 0
        start = 0
        while start < len(rows):
            end, size = start, 2
            while (
                end < len(rows)
                and end - start < max_events
                and (end == start or size + len(rows[end].payload) < max_bytes)
            ):
                size += len(rows[end].payload) + 1
                end += 1
            chunk = rows[start:end]
            payload = b"[" + b",".join(r.payload for r in chunk) + b"]"
            self._send(client, self._batch_topic, payload, [r.id for r in chunk])
            messages += 1
            start = end
        return messages

    def _send(self, client: paho.Client, topic: str, payload: bytes, ids: list[int]) -> None:
        info = client.publish(topic, payload, qos=self.config.qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish failed: {paho.error_string(info.rc)}")
        if self.config.qos == 0:
            self._delivered(ids)  # at-most-once: written is as good as it gets
        else:
            self._inflight[info.mid] = (ids, time.monotonic())

    def _check_link(self) -> None:
        """Detect a dead link sooner than paho would, and a PUBACK that never comes.

        paho pings only after a keepalive of silence in both directions and then waits a
        second keepalive, so a half-open link (no RST, no FIN) under steady publishing takes
        about twice the keepalive to notice. The broker answers every QoS 1 publish and
        every ping, so silence from it for 1.5 keepalives means the link is gone. (With QoS 0
        nothing is acknowledged, so there only paho's keepalive applies.)
        """
        now = time.monotonic()
        keepalive = self.config.keepalive
        if self.config.qos > 0 and now - self._last_inbound > 1.5 * keepalive:
            raise ConnectionLost(f"nothing from the broker for {now - self._last_inbound:.0f} s (link dead?)")
        if self._inflight:
            _row, sent_at = next(iter(self._inflight.values()))
            if now - sent_at > 2 * keepalive:
                raise ConnectionLost(f"no PUBACK for {now - sent_at:.0f} s; reconnecting to resend")

    async def _wait_for_work(self, lost: asyncio.Future[str]) -> None:
        """Sleep until a PUBACK frees room, new events are committed, or the link drops."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.store.committed.wait()),
        ]
        try:
            await asyncio.wait([*waits, lost], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _delivered(self, ids: list[int]) -> None:
        """Queue delivered rows for the next grouped delete."""
        self._acked += ids
        self._acks_waiting.set()

    async def _ack_flusher(self) -> None:
        while True:
            await self._acks_waiting.wait()  # an idle link costs no wake-ups
            await asyncio.sleep(ACK_FLUSH_INTERVAL)
            self._acks_waiting.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        if self._acked:
            ids, self._acked = self._acked, []
            await self.store.ack(ids)

    async def say_offline(self) -> None:
        """Publish the retained ``offline`` ourselves: a clean disconnect sends no last will.

        Call before cancelling :meth:`run`, which then closes the connection.
        """
        client = self._client
        if client is not None and self.state.connected:
            info = client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
            self._flush_writes()
            deadline = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
