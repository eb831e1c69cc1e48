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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.contract.events import batch_topic, status_topic, topic_for
from agent.store.outbox import Stored
from agent.uplinks.api import EventFeed, UplinkContext, UplinkStatus
from agent.uplinks.mqtt.backoff import Backoff
from agent.uplinks.mqtt.config import MqttConfig

log = logging.getLogger(__name__)

# PUBACKed rows are deleted in groups: at once when this many messages wait, else after at most
# ACK_FLUSH_DELAY, one delete in flight at a time. A crash resends what was acknowledged but not
# yet deleted (duplicates, same seq); the window counts those messages, so a crash resends at
# most max_inflight messages whatever the drain rate.
ACK_FLUSH_MESSAGES = 16
ACK_FLUSH_DELAY = 0.005
# An answer (PUBACK, PINGRESP) overdue this long, without a byte from the broker meanwhile,
# means the link is dead: at least ANSWER_FLOOR, more when the observed round trip is slow
# (RFC 6298's srtt + 4 rttvar), at most half the keepalive.
ANSWER_FLOOR = 4.0
# A message whose PUBACK a later one overtook gets this long for a late PUBACK; then (or once
# half the window is missing) the uplink reconnects to send it again.
RESEND_AFTER = 2.0
DRAIN_FLOOR = 0.25  # before such a reconnect, wait this long (or a round trip) for PUBACKs in flight
CONNACK_TIMEOUT = 10.0
HOLD_MIN = 10.0  # a connection "held" once it lasted this long (or reconnect_max, if longer)
TICK = 1.0  # seconds between paho's housekeeping (loop_misc) calls
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
ONLINE = b"online"
OFFLINE = b"offline"


def _state(state: str) -> dict[str, str]:
    """A log record's ``extra`` saying it announces the uplink's state (observability/logs.py never folds it)."""
    return {"subject": "uplink", "state": state}


class ConnectionLost(Exception):
    """The broker connection ended; the publish loop restarts after backoff."""


class Resend(ConnectionLost):
    """The uplink ends the connection itself to send messages whose PUBACK went missing."""


@dataclass(slots=True)
class _Sent:
    ids: list[int]  # buffer rows the message carries
    at: float  # monotonic time it was handed to paho
    n: int  # its place in this connection's publish order


class MqttUplink:
    """Keeps one connection to the broker and publishes the store's events through it."""

    def __init__(self, config: MqttConfig, *, gateway: str) -> None:
        """Configure; nothing connects until :meth:`run`."""
        self.config = config
        self.gateway = gateway
        self.feed: EventFeed | None = None
        self._topics: dict[tuple[str, str], str] = {}
        self.status = UplinkStatus(since=time.time())
        self._status_topic = status_topic(config.topic_prefix, gateway)
        self._batch_topic = batch_topic(config.topic_prefix, gateway)
        self._client: paho.Client | None = None
        self._lost: asyncio.Future[str] | None = None
        # The window: messages in flight (publish order), PUBACKs overtaken by later ones, and
        # acknowledged messages whose rows are not deleted yet. All count against max_inflight.
        self._inflight: OrderedDict[int, _Sent] = OrderedDict()  # mid -> message
        self._missing: dict[int, _Sent] = {}
        self._missing_since: float | None = None
        self._sent = 0  # messages published on this connection
        self._acked: list[int] = []  # rows to delete
        self._acked_messages = 0  # messages those rows came in
        self._flushing_messages = 0  # messages of the delete in progress
        self._acks_waiting = asyncio.Event()
        self._flusher_stop = False
        self._refill_at = config.max_inflight // 2
        self._wake = asyncio.Event()
        # The link: last byte from the broker, our own PINGREQ, round-trip estimate.
        self._last_inbound = 0.0
        self._ping_at: float | None = None
        self._checked_at = 0.0
        self._srtt: float | None = None
        self._rttvar = 0.0

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
        # The window is ours (it also counts missing and not yet deleted messages); paho only
        # must never hold one back: room for the window and the two status messages.
        client.max_inflight_messages_set(cfg.max_inflight + 2)
        client.max_queued_messages_set(0)
        client.will_set(self._status_topic, OFFLINE, qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls.active:
            cfg.tls.apply_to(client)
        lost: asyncio.Future[str] = loop.create_future()
        connected: asyncio.Future[None] = loop.create_future()
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

        def on_publish(_c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            if getattr(reason, "is_failure", False):
                # MQTT 5: the broker answered but did not take the message (not authorised,
                # quota exceeded, bad topic). Not delivered: the rows stay in the buffer and
                # go again on the next connection; never deleted as if the IOC had them.
                refused = self._inflight.pop(mid, None)
                if refused is None:
                    refused = self._missing.pop(mid, None)
                    if not self._missing:
                        self._missing_since = None
                if refused is not None:
                    self.status.refused += len(refused.ids)
                    log.warning(
                        "broker refused %d event(s) (%s); they stay buffered and are sent again on the next"
                        " connection: check the broker's ACL and quotas for this client",
                        len(refused.ids),
                        reason,
                    )
                if not self._inflight:
                    self._wake.set()
                return
            sent = self._inflight.pop(mid, None)
            if sent is not None:
                self._sample_rtt(self._last_inbound - sent.at)
                if cfg.qos == 1 and self._inflight:
                    self._pass_over(sent.n)
            else:
                sent = self._missing.pop(mid, None)  # its PUBACK came late after all
                if sent is None:
                    return  # a status message
                if not self._missing:
                    self._missing_since = None
            self._delivered(sent.ids)
            self.status.acked += len(sent.ids)
            if not self._inflight:
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
        self._ping_at = None  # any byte from the broker answers our question
        client = self._client
        if client is not None:
            client.loop_read()
            sock = client.socket()
            if QUICKACK is not None and isinstance(sock, socket.socket):
                # ACK the broker's segments at once. A broker with Nagle on (Mosquitto's default,
                # set_tcp_nodelay false) sends the next PUBACKs only once its last segment is
                # ACKed, and a waiting window has nothing to carry that ACK: the kernel's delayed
                # ACK then costs up to 40 ms per round (drains ran 2-3x slower). Linux only; the
                # kernel drops quick-ACK mode by itself, hence after every read.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
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
            await asyncio.wait_for(connected, timeout=CONNACK_TIMEOUT)
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
        self._missing.clear()
        self._missing_since = None
        self._ping_at = None
        self._sent = 0

    # ---- main loop ----------------------------------------------------------------
    def _feed(self) -> EventFeed:
        if self.feed is None:
            raise RuntimeError("the uplink runs only with a feed")
        return self.feed

    def quiet_allowance(self) -> float:
        """Our own dead-link check fires within a keepalive: allow two before calling it stalled."""
        return 2 * self.config.keepalive

    async def run(self, feed: EventFeed) -> None:
        """Connect, publish, reconnect after a wait from :class:`Backoff`; forever."""
        self.feed = feed
        cfg = self.config
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max, max(HOLD_MIN, cfg.reconnect_max))
        while True:
            resend = False
            backoff.attempt(time.monotonic())
            try:
                await self._connect()
                backoff.connected(time.monotonic())
                self.status.connected = True
                self.status.connects += 1
                self.status.since = time.time()
                self.status.last_error = None
                log.info("uplink connected to %s:%d", cfg.host, cfg.port, extra=_state("connected"))
                await self._publish_until_lost()
            except Resend as exc:
                reason, resend = str(exc), True
            except ConnectionLost as exc:
                reason = str(exc)
            except Exception as exc:
                # e.g. the buffer failed to read: log it, drop the connection, start over.
                log.exception("uplink error")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                was_connected = self.status.connected
                self.status.connected = False
                try:
                    await self._flush_acks()
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

    async def _publish_until_lost(self) -> None:
        client, lost = self._client, self._lost
        if client is None or lost is None:
            raise ConnectionLost("not connected")
        cursors: dict[int, int] = {}  # per priority: last row id handed to paho this session
        window = self.config.max_inflight
        batch = self.config.batch
        per_message = batch.max_events if batch.enabled else 1
        misc_at = time.monotonic() + TICK
        self._checked_at = time.monotonic()
        draining_since: float | None = None
        self._flusher_stop = False
        flusher = asyncio.create_task(self._ack_flusher(), name="uplink-ack-flusher")
        try:
            while not lost.done():
                # Clear before looking, so a commit or PUBACK during the look still wakes us.
                self._wake.clear()
                self._feed().committed.clear()
                if flusher.done():
                    flusher.result()  # raises what stopped it
                    raise ConnectionLost("the PUBACK recorder stopped")
                now = time.monotonic()
                self._check_link(client, now)
                if draining_since is None and self._resend_due(now, window):
                    draining_since = now  # stop publishing; let the PUBACKs in flight arrive
                wait: float = TICK
                if draining_since is not None:
                    drain = max(DRAIN_FLOOR, self._srtt or 0.0)
                    if not self._inflight or now - draining_since >= drain:
                        raise Resend(f"{len(self._missing)} PUBACK(s) missing; reconnecting to send them again")
                    room = 0
                    wait = draining_since + drain - now
                else:
                    room = window - self._unconfirmed()
                rows = await self._feed().next_batch(cursors, room * per_message) if room > 0 else []
                if lost.done():
                    break
                if batch.enabled:
                    sent = self._publish_batches(client, rows, batch.max_events, batch.max_bytes)
                else:
                    sent = self._publish_each(client, rows)
                for row in rows:
                    cursors[row.priority] = row.id
                self.status.published += len(rows)
                self._flush_writes()
                if now >= misc_at:
                    client.loop_misc()  # paho's own keepalive; ours is in _check_link
                    misc_at = now + TICK
                if not rows or room - sent <= 0:
                    await self._wait_for_work(lost, flusher, wait)
            raise ConnectionLost(lost.result())
        finally:
            # Let a delete in progress finish (the next connection must not read its rows
            # again), unless the whole uplink is being cancelled.
            self._flusher_stop = True
            self._acks_waiting.set()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)

    def _publish_each(self, client: paho.Client, rows: list[Stored]) -> int:
        """One MQTT message per event, on the event's own topic."""
        for row in rows:
            key = (row.device, row.type)
            topic = self._topics.get(key)
            if topic is None:
                topic = self._topics[key] = topic_for(self.config.topic_prefix, self.gateway, row.device, row.type)
            self._send(client, topic, row.payload, [row.id])
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
            self._sent += 1
            self._inflight[info.mid] = _Sent(ids, time.monotonic(), self._sent)

    # ---- the link -----------------------------------------------------------------
    def _unconfirmed(self) -> int:
        """Messages that a crash now would send again: the window's occupancy."""
        return len(self._inflight) + len(self._missing) + self._acked_messages + self._flushing_messages

    def _pass_over(self, n: int) -> None:
        """Messages published before message ``n`` and still unacknowledged lost their PUBACK.

        A broker sends QoS 1 PUBACKs in the order the PUBLISHes came (MQTT 3.1.1 4.6, MQTT 5
        4.6), and nothing on a TCP connection reorders them: a PUBACK that a later one
        overtook is not coming. Such messages leave the in-flight list (they no longer count as
        awaiting an answer) but keep their place in the window until they are sent again.
        """
        inflight = self._inflight
        moved = False
        while inflight:
            mid, first = next(iter(inflight.items()))
            if first.n > n:
                break
            inflight.popitem(last=False)
            self._missing[mid] = first
            moved = True
        if moved:
            if self._missing_since is None:
                self._missing_since = self._last_inbound
            self._wake.set()

    def _resend_due(self, now: float, window: int) -> bool:
        since = self._missing_since
        return since is not None and (now - since >= RESEND_AFTER or 2 * len(self._missing) >= window)

    def _sample_rtt(self, rtt: float) -> None:
        """RFC 6298's smoothed round trip and its variation, from publish to PUBACK."""
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar += 0.25 * (abs(self._srtt - rtt) - self._rttvar)
            self._srtt += 0.125 * (rtt - self._srtt)

    def _answer_timeout(self) -> float:
        rto = self._srtt + 4 * self._rttvar if self._srtt is not None else 0.0
        return min(self.config.keepalive / 2, max(ANSWER_FLOOR, rto))

    def _check_link(self, client: paho.Client, now: float) -> None:
        """Notice a dead link well within the keepalive, busy or idle.

        paho pings only after a keepalive of silence and then waits another keepalive, so a
        half-open link (no RST, no FIN) takes it twice the keepalive to notice. Here the
        broker must answer: when a PUBACK or our PINGREQ is due and not one byte has come
        from the broker for the answer timeout (a few seconds, at most half the keepalive),
        the link is dead. An idle link is pinged after half a keepalive of silence, so a dead
        link is noticed within one keepalive (plus a second for this check's tick) either way.
        """
        stalled = now - self._checked_at > 2 * TICK  # the loop itself was held up: reads may be pending
        self._checked_at = now
        awaited = self._ping_at
        if self._inflight:
            oldest = next(iter(self._inflight.values())).at
            awaited = oldest if awaited is None else min(awaited, oldest)
        if awaited is not None and not stalled:
            silent = now - max(self._last_inbound, awaited)
            if silent > self._answer_timeout():
                raise ConnectionLost(f"no answer from the broker for {silent:.1f} s (link dead?)")
        if self._ping_at is None and now - self._last_inbound >= self.config.keepalive / 2:
            client._send_pingreq()
            self._ping_at = now
            self._flush_writes()

    async def _wait_for_work(self, lost: asyncio.Future[str], flusher: asyncio.Task[None], timeout: float) -> None:
        """Sleep until a PUBACK or delete frees room, new events are committed, or the link drops."""
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._feed().committed.wait()),
        ]
        try:
            await asyncio.wait([*waits, lost, flusher], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # ---- deleting what was delivered ----------------------------------------------
    def _delivered(self, ids: list[int]) -> None:
        """Queue one delivered message's rows for the next grouped delete."""
        self._acked += ids
        self._acked_messages += 1
        self._acks_waiting.set()

    async def _ack_flusher(self) -> None:
        """Delete delivered rows soon after their PUBACK, one delete at a time."""
        while not self._flusher_stop:
            await self._acks_waiting.wait()  # an idle link costs no wake-ups
            if self._acked_messages < ACK_FLUSH_MESSAGES and not self._flusher_stop:
                await asyncio.sleep(ACK_FLUSH_DELAY)
            self._acks_waiting.clear()
            await self._flush_acks()
            if self._unconfirmed() <= self._refill_at:
                self._wake.set()

    async def _flush_acks(self) -> None:
        if self._acked:
            ids, self._acked = self._acked, []
            self._flushing_messages, self._acked_messages = self._acked_messages, 0
            try:
                await self._feed().ack(ids)
            finally:
                self._flushing_messages = 0

    async def goodbye(self) -> None:
        """Publish the retained ``offline`` ourselves: a clean disconnect sends no last will.

        Call before cancelling :meth:`run`, which then closes the connection.
        """
        client = self._client
        if client is not None and self.status.connected:
            info = client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
            self._flush_writes()
            deadline = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)


def create(settings: MqttConfig, context: UplinkContext) -> MqttUplink:
    """The plugin's factory."""
    return MqttUplink(settings, gateway=context.gateway)
