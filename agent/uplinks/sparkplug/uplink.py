"""The Sparkplug B edge node as a durable uplink: sessions over the servers in turn, the feed's
events as BIRTH/DATA, the backlog as historical DATA, and the rows acknowledged once delivered.

A session: CONNECT (clean, NDEATH will with the next bdSeq), subscribe NCMD/DCMD (and the
primary host's STATE), wait until the host is online, NBIRTH and DBIRTHs, then DATA until the
link drops or the host goes offline (then NDEATH, disconnect, next server).

What was buffered before the session (while the node was away, or waiting for its first
connection or for the primary host) is its backlog: its newest value of each metric goes into the
BIRTHs as the current one, and all of it follows as ``is_historical`` DATA.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agent.store.outbox import Stored
from agent.store.records import Lanes
from agent.uplinks.api import EventFeed, LaneFeed, UplinkContext, UplinkStatus
from agent.uplinks.mqtt.backoff import Backoff
from agent.uplinks.mqtt.errors import ConnectionLost
from agent.uplinks.sparkplug.bdseq import BdSeq
from agent.uplinks.sparkplug.client import Connection
from agent.uplinks.sparkplug.commands import Commands, HostOffline
from agent.uplinks.sparkplug.config import SparkplugConfig
from agent.uplinks.sparkplug.forward import Forward, queue_backlog
from agent.uplinks.sparkplug.metrics import Event, Value, parse
from agent.uplinks.sparkplug.model import Device, Model
from agent.uplinks.sparkplug.node import Session, Topics
from agent.uplinks.sparkplug.payloads import node_death

log = logging.getLogger(__name__)
READ_LIMIT = 500  # rows taken from the feed at a time
WARMUP, SETTLE = 2.0, 0.5  # first session of a run: wait for the devices' first readings before NBIRTH
BDSEQ_FILE = "sparkplug.bdseq"
_DOWN = {"subject": "uplink", "state": "down"}  # observability/logs.py never folds state lines


class SparkplugUplink:
    """One edge node; :meth:`run` keeps it connected to one of the servers."""

    def __init__(self, config: SparkplugConfig, context: UplinkContext) -> None:
        """Configure; nothing connects until :meth:`run`."""
        self.config = config
        self.status: UplinkStatus = context.status
        self.status.since = time.time()
        node = config.edge_node_id or context.gateway
        self.topics = Topics(config.group_id, node)
        self.client_id = config.client_id or f"spb-{config.group_id}-{node}"
        self.model = Model()
        self.bdseq = BdSeq(context.state_dir / BDSEQ_FILE)
        self.commands = Commands(config, self.topics, self.model, context.inbound, context.title, self.status)
        self.forward = Forward(config.keepalive)
        self.forward.ready = lambda device: self.model.device(device).born
        self.session: Session | None = None
        self._conn: Connection | None = None
        self._bad_rows = 0
        self._stopping = False  # goodbye() said NDEATH: no new session until run() is cancelled

    def quiet_allowance(self) -> float:
        """paho notices a dead link within 1.5 keepalives: allow two before calling it stalled."""
        return 2 * self.config.keepalive

    async def run(self, feed: EventFeed) -> None:
        """Sessions over the servers in turn, forever; a full round of failures waits with backoff."""
        if not isinstance(feed, LaneFeed):  # live rows must not wait behind the backlog
            raise TypeError("the Sparkplug uplink needs a feed with a live lane (next_lanes)")
        cfg = self.config
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max, max(10.0, cfg.reconnect_max))
        index, failed_in_round = 0, 0
        while True:
            if self._stopping:
                await asyncio.Event().wait()  # the caller cancels us next
            server = cfg.servers[index]
            backoff.attempt(time.monotonic())
            held = False
            try:
                await self._session(feed, server, backoff)
            except (ConnectionLost, HostOffline) as exc:
                reason = str(exc)
            except Exception as exc:
                log.exception("Sparkplug uplink error")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                held = self.status.connected
                await self._end_session()
            if self._stopping:
                continue
            if held or reason != self.status.last_error:
                log.warning("Sparkplug: %s; trying the next server", reason, extra=_DOWN)
            self.status.failed(reason)
            index = (index + 1) % len(cfg.servers)
            failed_in_round = 0 if held else failed_in_round + 1
            if failed_in_round >= len(cfg.servers) or len(cfg.servers) == 1:
                failed_in_round = 0
                await asyncio.sleep(backoff.next_wait(time.monotonic(), resend=False))

    async def _session(self, feed: LaneFeed, server: Any, backoff: Backoff) -> None:
        # bdSeq: +1 per CONNECT packet, taken (and kept, so a crash never reuses it) only once the
        # connection is up and the CONNECT is about to go; an attempt refused earlier uses none.
        bdseq: list[int] = []

        def will() -> bytes:
            bdseq.append(self.bdseq.next())
            return node_death(bdseq[-1])

        conn = self._conn = Connection(self.config, server, self.client_id, (self.topics.ndeath, will))
        reader = asyncio.create_task(self._read_messages(conn))
        try:
            await conn.open()
            backoff.connected(time.monotonic())
            session = self.session = Session(conn, self.topics, self.model, bdseq[-1], aliases=self.config.aliases)
            self.commands.start_session(session)
            await conn.subscribe(self.commands.subscriptions())  # before NBIRTH
            await self._until_host_online(conn)
            self.status.connected, self.status.since, self.status.last_error = True, time.time(), None
            self.status.connects += 1
            log.info("Sparkplug edge node %s/%s online on %s (bdSeq %d)", self.topics.group, self.topics.node,
                     conn.where, session.bdseq, extra={"subject": "uplink", "state": "connected"})  # fmt: skip
            await self._publish_until_lost(feed, conn, session)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_messages(self, conn: Connection) -> None:
        while True:
            topic, payload, _retained = await conn.messages.get()
            try:
                self.commands.handle(topic, payload)
            except Exception:  # a bug must not end the session: the message is lost, not the link
                log.exception("Sparkplug: a message on %s could not be handled", topic)

    def _check(self, conn: Connection) -> None:
        if conn.lost.done():
            raise ConnectionLost(conn.lost.result())
        offline = self.commands.offline
        if offline is not None and offline.done():
            raise HostOffline(offline.result())

    async def _until_host_online(self, conn: Connection) -> None:
        if not self.commands.host_online.is_set():
            log.info("Sparkplug: waiting for primary host %s to be online", self.config.primary_host_id)
        while not self.commands.host_online.is_set():
            self._check(conn)
            online: asyncio.Future[Any] = asyncio.ensure_future(self.commands.host_online.wait())
            offline = self.commands.offline
            try:
                await asyncio.wait([online, conn.lost, *([offline] if offline else [])], timeout=1.0,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                online.cancel()
        self._check(conn)

    async def _publish_until_lost(self, feed: LaneFeed, conn: Connection, session: Session) -> None:
        # New lanes: rows from before this session come as backlog, behind their own cursor, so
        # live rows are handed out at once however long the backlog (history may follow newer
        # values: it is is_historical with its own timestamps).
        lanes = Lanes()
        forward = self.forward
        forward.reset()
        # The first rows are learned before the BIRTHs, so the devices they name are born with the
        # NBIRTH and their newest values are the BIRTHs' current ones; on the first session of a
        # run, the devices' first readings are waited for.
        first = await self._first_rows(feed, conn, lanes)
        # Readings still queued for a commit are in the BIRTHs too: a value read before a BIRTH
        # never follows it as the first DATA of a metric the BIRTH called null or older.
        await feed.settled()
        first += await feed.next_lanes(lanes, READ_LIMIT)
        for row in first:
            try:
                self._learn(row)
            except Exception:  # _row logs it below
                log.debug("Sparkplug: event %d not learned", row.id, exc_info=True)
        session.birth_all()
        now = time.monotonic()
        for row in first:
            # History, live or not: the BIRTHs hold the newest of these values, so a DATA of an
            # older one must not say it is current.
            self._row(session, row, now, historical=True)
        self.status.published += len(first)
        while True:
            feed.committed.clear()
            self._check(conn)
            now = time.monotonic()
            done = forward.confirmed(now)
            if done:
                self.status.acked += await feed.ack(done)
            rows = await feed.next_lanes(lanes, READ_LIMIT, READ_LIMIT if forward.room() else 0)
            self._check(conn)
            now = time.monotonic()
            for row in rows:
                self._row(session, row, now)
            self.status.published += len(rows)
            if forward.due(now):
                device_id, values, ids = forward.take(now)
                device = self.model.device(device_id)
                session.ddata(device, self.model.typed(device, values), historical=True)
                forward.sent(ids, now)
            if len(rows) < READ_LIMIT:
                await self._wait(feed, conn, forward.next_wake(now))

    async def _first_rows(self, feed: LaneFeed, conn: Connection, lanes: Lanes) -> list[Stored]:
        """The rows the session starts with. With nothing buffered and no device known yet (the
        agent just started), wait up to WARMUP for the first readings, then SETTLE more for the
        devices polled a little later."""
        rows = await feed.next_lanes(lanes, READ_LIMIT, READ_LIMIT)
        if rows or self.model.devices:
            return rows
        deadline = time.monotonic() + WARMUP
        while time.monotonic() < deadline and len(rows) < READ_LIMIT:
            feed.committed.clear()
            await self._wait(feed, conn, deadline - time.monotonic())
            self._check(conn)
            rows += await feed.next_lanes(lanes, READ_LIMIT - len(rows))
            if rows:
                deadline = min(deadline, time.monotonic() + SETTLE)
        return rows

    async def _wait(self, feed: EventFeed, conn: Connection, timeout: float) -> None:
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(feed.committed.wait())]
        offline = self.commands.offline
        try:
            await asyncio.wait([*waits, conn.lost, *([offline] if offline else [])], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            for w in waits:
                w.cancel()

    def _row(self, session: Session, row: Stored, now: float, *, historical: bool = False) -> None:
        """One buffered event; one that cannot be carried is logged and passed over (it would
        otherwise end every session at the same place)."""
        try:
            self._carry(session, row, now, historical=historical or row.backlog)
        except Exception as exc:
            self._bad_rows += 1
            log.warning("Sparkplug: event %d (%s of %s) not carried: %s", row.id, row.type, row.device, exc)
            self.forward.sent([row.id], now)

    def _learn(self, row: Stored) -> tuple[Event | None, Device | None, list[Value], bool]:
        """What a row tells the model (devices, metrics, online), nothing sent: (event, device,
        its values as born, whether the device or a metric is new)."""
        event = parse(row.payload)
        if event is None:
            return None, None, [], False
        device = self.model.device(event.device)
        if event.status is not None:
            self.model.status(device, event.status != "offline", event.timestamp)
            return event, device, [], False
        values, new = self.model.learn(device, event.values, historical=row.backlog)
        return event, device, values, new

    def _carry(self, session: Session, row: Stored, now: float, *, historical: bool) -> None:
        """Live events go out now, backlog ones join the historical queue."""
        if historical and queue_backlog(self.model, self.forward, row.payload, row.id):
            return
        event, device, values, new = self._learn(row)
        if event is None or device is None:
            self.forward.sent([row.id], now)
            return
        if event.status is not None:
            if not device.online:
                session.ddeath(device)
            # Back online: born again by its next reading, so the DBIRTH carries that reading's
            # values rather than the last ones from before the outage.
            self.forward.sent([row.id], now)
            return
        if not device.online:
            # Known offline (its newest status says so): not born until it is online again. Its
            # readings from before the outage wait, unacknowledged, for that DBIRTH (forward.ready).
            self.forward.add(device.id, values, row.id)
            return
        if new or not device.born:
            if new:
                # A device or metric not born this session: the whole node is born again, so every
                # DBIRTH follows the NBIRTH with no DATA between (payloads-dbirth-order), with
                # fresh aliases for this device (payloads-alias-uniqueness).
                self.model.realias(device)
                session.birth_all()
            else:
                session.dbirth(device)
            if not historical:  # the live values are in the BIRTH as current ones
                self.forward.sent([row.id], now)
                return
        if historical:
            self.forward.add(device.id, values, row.id)
        else:
            session.ddata(device, values)
            self.forward.sent([row.id], now)

    async def _end_session(self) -> None:
        conn, self._conn = self._conn, None
        session, self.session = self.session, None
        self.commands.end_session()
        if self.status.connected:
            self.status.connected = False
            self.status.disconnects += 1
            self.status.since = time.time()
        if conn is not None:
            # An intentional disconnect (the host went offline) says NDEATH first, with the bdSeq of
            # this connection's will; a lost link's will does.
            farewell = session.death() if session is not None and conn.up else None
            await conn.close(farewell=farewell)

    async def goodbye(self) -> None:
        """NDEATH, then disconnect (a clean disconnect sends no will)."""
        self._stopping = True
        await self._end_session()
        await self.commands.close()


def create(settings: SparkplugConfig, context: UplinkContext) -> SparkplugUplink:
    """The plugin's factory."""
    return SparkplugUplink(settings, context)
