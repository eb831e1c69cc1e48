"""One ingestion worker: MQTT 5 shared subscription in, batched transactions out, acks after commit.

Why nothing is lost when a worker is SIGKILLed: the worker acknowledges a message (PUBACK) only
after the transaction holding it committed (paho's manual acks). Until then the broker keeps it
in the worker's persistent session (clean start off, a session expiry interval) and sends it
again; the idempotent upsert turns any re-delivery into a no-op. A PUBACK lost after the commit
only costs a duplicate.

A message id (mid) is only meaningful on the connection it arrived on: messages received before
a reconnect are not acked on the new connection (the broker sends them again, with DUP set).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract.compact import ENCODING
from agent.ingest.decode import Decoded, decode
from agent.ingest.store import Outcome, write

log = logging.getLogger("agent.ingest")


@dataclass(frozen=True)
class Settings:
    dsn: str
    worker: int
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "ioc/v1"
    group: str = "ingest"
    batch: int = 500
    batch_window: float = 0.05
    session_expiry: int = 86400
    stats_interval: float = 60.0
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = False

    @property
    def client_id(self) -> str:
        # Fixed per worker: the broker keeps the session (and its unacked messages) under this id.
        return f"edge-agent-ingest-{self.group}-{self.worker}"

    @property
    def filters(self) -> list[str]:
        shared = f"$share/{self.group}/{self.prefix}"
        # Availability is retained state, and retained messages are never sent to a shared
        # subscription (MQTT 5, 4.8.2): every worker reads it; the upsert makes that harmless.
        return [f"{shared}/+/+/+", f"{shared}/+/batch", f"{shared}/+/{ENCODING}", f"{self.prefix}/+/status"]


@dataclass(frozen=True)
class _Received:
    generation: int  # the connection it arrived on
    mid: int
    qos: int
    decoded: Decoded


class Worker:
    """Run until :meth:`stop`; ``stats()`` has the counters and commit latencies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.outcome = Outcome()
        self.messages = 0
        self.latencies: deque[float] = deque(maxlen=100_000)  # seconds per committed transaction
        self._inbox: queue.Queue[_Received] = queue.Queue()
        self._stopping = threading.Event()
        self._generation = 0
        self._connected = threading.Event()
        self._client = self._make_client()
        self._conn: psycopg.Connection[Any] | None = None
        self.started = time.monotonic()

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=MQTTProtocolVersion.MQTTv5)
        client.manual_ack_set(True)
        client.reconnect_delay_set(1, 5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if s.username:
            password = s.password_file.read_text().strip() if s.password_file else None
            client.username_pw_set(s.username, password)
        if s.tls or s.ca_file or s.cert_file:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file:
                context.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
            client.tls_set_context(context)
        return client

    # --- MQTT side (paho's network thread) -------------------------------------------------

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        self._generation += 1
        if not flags.session_present:
            # A new session: whatever the broker queued for an old one is gone (docs/ingest.md, recovery).
            log.warning(
                "worker %d: new MQTT session (none was kept for %s)", self.settings.worker, self.settings.client_id
            )
        client.subscribe([(f, 1) for f in self.settings.filters])
        self._connected.set()
        log.info("worker %d: connected (session present: %s)", self.settings.worker, flags.session_present)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("worker %d: disconnected from the broker (%s); reconnecting", self.settings.worker, reason)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        decoded = decode(message.topic, bytes(message.payload), self.settings.prefix)
        self._inbox.put(_Received(self._generation, message.mid, message.qos, decoded))

    # --- database side (the caller's thread) -----------------------------------------------

    def run(self) -> None:
        s = self.settings
        self._conn = self._connect_db()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry
        # How many unacked messages the broker may have out to us: a batch's worth twice, so the
        # next batch arrives while this one commits, and a natural brake while the database is away.
        props.ReceiveMaximum = max(2 * s.batch, 20)
        self._client.connect_async(s.host, s.port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()
        next_stats = time.monotonic() + s.stats_interval
        try:
            while not self._stopping.is_set():
                batch = self._collect()
                if batch:
                    self._commit(batch)
                if time.monotonic() >= next_stats:
                    log.info("worker %d: %s", s.worker, self.stats())
                    next_stats = time.monotonic() + s.stats_interval
        finally:
            # Whatever is still in the inbox stays unacked: the broker sends it again.
            self._client.disconnect()
            self._client.loop_stop()
            if self._conn is not None:
                self._conn.close()

    def stop(self) -> None:
        self._stopping.set()

    def _collect(self) -> list[_Received]:
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        # Counted in events, not messages: a batch message (up to 100s of events) counts as many.
        size = max(1, len(first.decoded.events))
        deadline = time.monotonic() + self.settings.batch_window
        while size < self.settings.batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self._inbox.get(timeout=left))
            except queue.Empty:
                break
            size += max(1, len(batch[-1].decoded.events))
        return batch

    def _commit(self, batch: list[_Received]) -> None:
        """Write until committed (retrying on a lost database), then ack in arrival order."""
        delay = 0.2
        while True:
            try:
                if self._conn is None:
                    self._conn = self._connect_db()
                began = time.monotonic()
                outcome = write(self._conn, [r.decoded for r in batch], self.settings.worker)
                self.latencies.append(time.monotonic() - began)
                break
            except psycopg.OperationalError as exc:
                # A lost connection, or a deadlock/serialization failure: nothing committed, so retry.
                log.warning("worker %d: database: %s; retrying in %.1fs", self.settings.worker, exc, delay)
                if self._stopping.wait(delay):
                    return  # unacked: the broker sends it again
                delay = min(delay * 2, 5.0)
                if self._conn is not None and (self._conn.broken or self._conn.closed):
                    self._conn.close()
                    self._conn = None  # connected again at the next attempt
        self.outcome.add(outcome)
        self.messages += len(batch)
        generation = self._generation
        for received in batch:
            if received.generation == generation and received.qos > 0:
                self._client.ack(received.mid, received.qos)

    def _connect_db(self) -> psycopg.Connection[Any]:
        # autocommit: every transaction is an explicit ``conn.transaction()`` block, never an implicit one.
        return psycopg.connect(
            self.settings.dsn,
            autocommit=True,
            application_name=f"edge-agent-ingest-{self.settings.worker}",
            connect_timeout=10,
        )

    def stats(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2) if ordered else None

        return {
            "worker": self.settings.worker,
            "messages": self.messages,
            "inserted": self.outcome.inserted,
            "duplicates": self.outcome.duplicates,
            "conflicts": self.outcome.conflicts,
            "rejected": self.outcome.rejected,
            "transactions": len(self.latencies),
            "commit_ms_p50": pct(0.5),
            "commit_ms_p95": pct(0.95),
            "seconds": round(time.monotonic() - self.started, 3),
        }
