"""MQTT uplink: drains the event store to the broker with QoS 1 and a window in flight.

paho-mqtt does the protocol; this module drives its socket from the asyncio loop (the same
technique as aiomqtt) so publishing, PUBACK handling and the store share one thread and many
messages are in flight at once. The store, not paho's in-memory session, is the source of
truth: every connection is a fresh clean session, and on reconnect every unacknowledged row
is sent again (at-least-once).

The uplink watches the link itself instead of waiting out paho's keepalive (see
docs/delivery.md, "Reconnecting"): a PUBACK that a later PUBACK overtook is missing (brokers
acknowledge QoS 1 in order), and the messages it stood for are sent again over a new
connection within a few seconds; silence from the broker while an answer is due means the
link is dead; waits between connection attempts are jittered for a whole fleet's sake.

This module keeps the connection and the publish loop; its collaborators are the window in
flight and what PUBACKs do (window.py), the dead-link watch (link.py), the grouped delete of
delivered rows (acks.py) and the rows-to-messages step (publisher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract.events import status_topic
from agent.uplinks.api import EventFeed, UplinkContext, UplinkStatus
from agent.uplinks.mqtt.acks import Acks
from agent.uplinks.mqtt.backoff import Backoff
from agent.uplinks.mqtt.config import MqttConfig
from agent.uplinks.mqtt.control import REPLIES_PER_SECOND, ControlChannel, Publish
from agent.uplinks.mqtt.errors import ConnectionLost, Resend
from agent.uplinks.mqtt.futures import settle
from agent.uplinks.mqtt.link import ANSWER_FLOOR as ANSWER_FLOOR  # tests import it from here
from agent.uplinks.mqtt.link import TICK, Link
from agent.uplinks.mqtt.publisher import Publisher
from agent.uplinks.mqtt.swap import SWAP_DRAIN, Swap
from agent.uplinks.mqtt.window import Window

log = logging.getLogger(__name__)

# Before reconnecting to send messages whose PUBACK went missing (window.RESEND_AFTER), wait
# this long (or a round trip) for the PUBACKs in flight.
DRAIN_FLOOR = 0.25
CONNACK_TIMEOUT = 10.0
HOLD_MIN = 10.0  # a connection "held" once it lasted this long (or reconnect_max, if longer)
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
ONLINE = b"online"
OFFLINE = b"offline"


def _state(state: str) -> dict[str, str]:
    """A log record's ``extra`` saying it announces the uplink's state (observability/logs.py never folds it)."""
    return {"subject": "uplink", "state": state}


def _paho_client(cfg: MqttConfig, gateway: str, will_topic: str, swap: Swap) -> paho.Client:
    """A paho client for one clean session, its callbacks not set yet; TLS as ``swap`` says."""
    v5 = cfg.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=cfg.client_id or f"edge-agent-{gateway}",
        clean_session=None if v5 else True,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    # The window is ours (it also counts missing and not yet deleted messages); paho only
    # must never hold one back: room for the window, the two status messages and a second of
    # fleet replies (paced to REPLIES_PER_SECOND).
    client.max_inflight_messages_set(cfg.max_inflight + 2 + REPLIES_PER_SECOND)
    client.max_queued_messages_set(0)
    client.will_set(will_topic, OFFLINE, qos=1, retain=True)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password())
    swap.apply_tls(client, cfg)
    return client


def _control_channel(
    config: MqttConfig, gateway: str, context: UplinkContext | None, publish: Publish
) -> ControlChannel | None:
    """The fleet channel on this connection, if the core turned it on (a control root); without
    one, an identity alone still gets its renewal topics."""
    if context is None or not (context.control_root or context.identity):
        return None
    return ControlChannel(
        context.control_root or context.identity.root,  # type: ignore[union-attr]
        gateway,
        context.inbound,
        publish,
        reports=context.reports,
        topic_prefix=config.topic_prefix,
        v5=config.protocol == "5",
        identity=context.identity,
        commands=bool(context.control_root),
    )


def _properties(properties: dict[str, Any] | None) -> Properties | None:
    """MQTT 5 PUBLISH properties from their paho names (None: none)."""
    if not properties:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in properties.items():
        setattr(props, name, value)
    return props


def _quickack(sock: Any) -> None:
    """ACK the broker's segments at once.

    A broker with Nagle on (Mosquitto's default, set_tcp_nodelay false) sends the next PUBACKs
    only once its last segment is ACKed, and a waiting window has nothing to carry that ACK: the
    kernel's delayed ACK then costs up to 40 ms per round (drains ran 2-3x slower). Linux only;
    the kernel drops quick-ACK mode by itself, hence after every read while the window is full.
    With room in the window the next PUBLISH carries the ACK, and a setsockopt per read cost the
    batched uplink 15 % more CPU per event (bench/pipeline.py scenario 5).
    """
    if QUICKACK is not None and isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


def _nodelay(sock: Any) -> None:
    """Send each packet at once (Nagle off), as EMQX and Mosquitto's set_tcp_nodelay do.

    With Nagle on, a fleet reply waited for the broker's delayed ACK of the PUBACK paho had just
    sent for the request: 40 ms on every command (bench/fleet.py: ping p50 44 ms, 4.8 ms without).
    """
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttUplink:
    """Keeps one connection to the broker and publishes the store's events through it."""

    def __init__(self, config: MqttConfig, *, gateway: str, context: UplinkContext | None = None) -> None:
        """Configure (nothing connects until :meth:`run`); a context's control root adds the fleet channel."""
        self.config = config
        self.gateway = gateway
        self.control = _control_channel(config, gateway, context, self._publish_control)
        self.status = context.status if context is not None else UplinkStatus()
        self.status.since = time.time()
        self._status_topic = status_topic(config.topic_prefix, gateway)
        self._client: paho.Client | None = None
        self._lost: asyncio.Future[str] | None = None
        self._wake = asyncio.Event()  # a PUBACK or delete freed room, or the connection ended
        self._link = Link()
        self._acks = Acks(self._wake, refill_at=config.max_inflight // 2)
        self._window = Window(
            in_order=config.qos == 1,
            link=self._link,
            acks=self._acks,
            status=self.status,
            wake=self._wake,
            refused=self._refused,
        )
        self._publisher = Publisher(config, gateway, self._window, self._acks)
        self._swap = Swap(context.identity if context is not None else None)  # client certificate changes

    # ---- connection ---------------------------------------------------------------
    def _new_client(self, loop: asyncio.AbstractEventLoop) -> paho.Client:
        cfg = self.config
        client = _paho_client(cfg, self.gateway, self._status_topic, self._swap)
        lost: asyncio.Future[str] = loop.create_future()
        connected: asyncio.Future[None] = loop.create_future()
        self._lost = lost

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

        def on_socket_open(_c: paho.Client, _u: Any, sock: Any) -> None:
            # Called on the connecting thread: hand the socket to the loop thread.
            loop.call_soon_threadsafe(loop.add_reader, sock, self._read)

        def on_socket_close(_c: paho.Client, _u: Any, sock: Any) -> None:
            loop.remove_reader(sock)
            loop.remove_writer(sock)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = self._window.on_publish
        client.on_socket_open = on_socket_open
        client.on_socket_close = on_socket_close
        client.user_data_set(connected)
        return client

    def _refused(self, events: int, reason: Any) -> None:
        self.status.refused += events
        log.warning(
            "broker refused %d event(s) (%s); they stay buffered and are sent again on the next"
            " connection: check the broker's ACL and quotas for this client",
            events,
            reason,
        )

    def _read(self) -> None:
        self._link.heard(time.monotonic())
        client = self._client
        if client is not None:
            waiting = self._window.unconfirmed() >= self.config.max_inflight
            client.loop_read()
            if waiting or self._window.unconfirmed() >= self.config.max_inflight:
                _quickack(client.socket())  # only a full window has no PUBLISH to carry the ACK
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
        _nodelay(client.socket())
        self._link.last_inbound = time.monotonic()
        await asyncio.sleep(0)  # let the reader registration scheduled above run
        self._flush_writes()
        try:
            await asyncio.wait_for(connected, timeout=CONNACK_TIMEOUT)
        except TimeoutError as exc:
            raise ConnectionLost(f"no CONNACK from {cfg.host}:{cfg.port}") from exc
        client.publish(self._status_topic, ONLINE, qos=1, retain=True)
        if self.control is not None:  # a clean session: subscribe on every connection
            client.on_message = self.control.on_message
            client.subscribe(self.control.subscriptions)
            self.control.connected()
        self._flush_writes()
        return client

    def _publish_control(self, topic: str, payload: bytes, retain: bool, properties: dict[str, Any] | None) -> bool:
        """A fleet reply or report on the current connection (QoS 1, outside the event window);
        ``properties``: MQTT 5 PUBLISH properties by paho's names."""
        if self._client is None or not self.status.connected:
            return False
        self._client.publish(topic, payload, qos=1, retain=retain, properties=_properties(properties))
        self._flush_writes()
        return True

    def _drop_client(self) -> None:
        if self.control is not None:
            self.control.connection_ended()
        client, self._client = self._client, None
        if client is not None:
            sock = client.socket()
            if sock is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock)
                loop.remove_writer(sock)
            client.disconnect()
            client._sock_close()
        self._window.clear()
        self._link.ping_at = None

    # ---- main loop ----------------------------------------------------------------
    def quiet_allowance(self) -> float:
        """Our own dead-link check fires within a keepalive: allow two before calling it stalled."""
        return 2 * self.config.keepalive

    async def run(self, feed: EventFeed) -> None:
        """Connect, publish, reconnect after a wait from :class:`Backoff`; forever."""
        cfg = self.config
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max, max(HOLD_MIN, cfg.reconnect_max))
        while True:
            resend = False
            backoff.attempt(time.monotonic())
            try:
                await self._connect()
                self._swap.connected()
                backoff.connected(time.monotonic())
                self.status.connected = True
                self.status.connects += 1
                self.status.since = time.time()
                self.status.last_error = None
                log.info("uplink connected to %s:%d", cfg.host, cfg.port, extra=_state("connected"))
                await self._publish_until_lost(feed)
            except Resend as exc:
                reason, resend = str(exc), True
            except ConnectionLost as exc:
                reason, resend = str(exc), self._swap.failed(exc)  # a refused new certificate: old one at once
            except Exception as exc:
                # e.g. the buffer failed to read: log it, drop the connection, start over.
                log.exception("uplink error")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                was_connected = self.status.connected
                self.status.connected = False
                try:
                    await self._acks.flush(feed)
                except Exception:  # the rows stay buffered and are sent again: a duplicate, not a loss
                    log.exception("could not record delivered events")
                self._drop_client()
            if was_connected:
                self.status.disconnects += 1
                self.status.since = time.time()
            if resend:
                log.info("uplink: %s", reason, extra=_state("reconnecting"))
            elif was_connected:
                log.warning("uplink lost: %s; buffering until it is back", reason, extra=_state("down"))
            elif reason != self.status.last_error:
                log.warning("uplink down: %s; retrying with backoff", reason, extra=_state("down"))
            self.status.failed(reason)
            await asyncio.sleep(backoff.next_wait(time.monotonic(), resend=resend))

    async def _publish_until_lost(self, feed: EventFeed) -> None:
        client, lost = self._client, self._lost
        if client is None or lost is None:
            raise ConnectionLost("not connected")
        cursors: dict[int, int] = {}  # per priority: last row id handed to paho this session
        window = self.config.max_inflight
        batch = self.config.batch
        per_message = batch.max_events if batch.enabled else 1
        misc_at = time.monotonic() + TICK
        self._link.checked_at = time.monotonic()
        draining_since: float | None = None
        inflight = self._window.inflight
        flusher = self._acks.start(feed, self._window.unconfirmed)
        try:
            while not lost.done():
                # Clear before looking, so a commit or PUBACK during the look still wakes us.
                self._wake.clear()
                feed.committed.clear()
                if flusher.done():
                    flusher.result()  # raises what stopped it
                    raise ConnectionLost("the PUBACK recorder stopped")
                now = time.monotonic()
                if self._link.check(now, self._window.oldest(), self.config.keepalive):
                    client._send_pingreq()
                    self._flush_writes()
                if draining_since is None and (self._window.resend_due(now, window) or self._swap.due()):
                    draining_since = now  # stop publishing; let the PUBACKs in flight arrive
                wait: float = TICK
                if draining_since is not None:
                    drain = SWAP_DRAIN if self._swap.due() else max(DRAIN_FLOOR, self._link.srtt or 0.0)
                    if not inflight or now - draining_since >= drain:
                        if self._swap.due():
                            raise self._swap.drained(len(self._window.missing))
                        raise Resend(f"{len(self._window.missing)} PUBACK(s) missing; reconnecting to send them again")
                    room = 0
                    wait = draining_since + drain - now
                else:
                    room = window - self._window.unconfirmed()
                rows = await feed.next_batch(cursors, room * per_message) if room > 0 else []
                if lost.done():
                    break
                if batch.enabled:
                    sent = self._publisher.batches(client, rows, batch.max_events, batch.max_bytes)
                else:
                    sent = self._publisher.each(client, rows)
                for row in rows:
                    cursors[row.priority] = row.id
                self.status.published += len(rows)
                self._flush_writes()
                if now >= misc_at:
                    client.loop_misc()  # paho's own keepalive; ours is Link.check
                    misc_at = now + TICK
                if not rows or room - sent <= 0:
                    await self._wait_for_work(feed, lost, flusher, wait)
            raise ConnectionLost(lost.result())
        finally:
            # Let a delete in progress finish (the next connection must not read its rows
            # again), unless the whole uplink is being cancelled.
            self._acks.stop()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)

    async def _wait_for_work(
        self, feed: EventFeed, lost: asyncio.Future[str], flusher: asyncio.Task[None], timeout: float
    ) -> None:
        """Sleep until a PUBACK or delete frees room, new events are committed, or the link drops."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(feed.committed.wait()),
        ]
        try:
            await asyncio.wait([*waits, lost, flusher], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def goodbye(self) -> None:
        """Publish the retained ``offline`` ourselves: a clean disconnect sends no last will.

        Call before cancelling :meth:`run`, which then closes the connection.
        """
        if self.control is not None:
            await self.control.close()
        client = self._client
        if client is not None and self.status.connected:
            info = client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
            self._flush_writes()
            deadline = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)


def create(settings: MqttConfig, context: UplinkContext) -> MqttUplink:
    """The plugin's factory."""
    return MqttUplink(settings, gateway=context.gateway, context=context)
