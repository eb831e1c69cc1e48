"""One MQTT connection to a network server's integration, shared by every device of one application.

paho runs the connection in its own thread; each message is parsed there and handed to the
event loop, to the queue of the device it names. Messages of DevEUIs no device claims are
counted and remembered for ``edge-agent scan lorawan``; messages that are not what the server
sends are counted and logged with their topic and first 200 bytes.

The connection also keeps a clock that runs only while it is up: the devices measure their
silence on it, so a broker outage never makes a bay look silent.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.errors import DriverStartupError
from drivers.lorawan.config import LorawanConfig, NetworkServer
from drivers.lorawan.messages import BadMessage, Message, Uplink, parse, topics

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# A resumed session delivers what the broker queued the moment we connect, before every device
# has claimed its DevEUI: messages of a configured DevEUI not claimed yet wait this long (and this
# many) for their device; after that they count as unconfigured.
CLAIM_GRACE = 30.0
MAX_WAITING = 100_000
# Messages taken from the broker and not yet handled (their events in the buffer), over all devices.
# At this many paho's thread stops reading: a resumed session's backlog (ChirpStack, QoS 1: unacknowledged,
# it stays in the broker) or a burst then waits in the broker and the socket, not in this process's
# memory (bench/lorawan.py: the warm-up's 10,000 queued uplinks had grown RSS by tens of MB, most
# never given back to the OS). About 2 KB each while in hand.
MAX_IN_HAND = 1_000
ROOM_POLL = 0.5  # seconds between looks at whether the connection is closing, while paho's thread waits
# Connection key -> the DevEUIs of the enabled devices of the loaded config: set when the config
# loads (the plugin's check_devices), so that only their messages wait for a claim.
CONFIGURED: dict[str, frozenset[str]] = {}
COUNTED = ("messages", "bad_messages", "unknown_uplinks", "qos0_uplinks")  # per connection, in health and metrics
SHOWN_BYTES = 200  # of a bad message, in the log
FAILED_FOR = 2.0  # seconds a failed open is the answer for the connection's other devices


@dataclass(slots=True)
class Unknown:
    """A DevEUI heard on the connection that no configured device claims (for scan)."""

    dev_eui: str
    name: str | None
    profile: str | None
    last_seen: datetime
    uplinks: int = 0


class Connection:
    """A paho client subscribed to one application's events, dispatching them per DevEUI."""

    def __init__(
        self, server: NetworkServer, application: str, client_id: str, key: str, grace: float = CLAIM_GRACE
    ) -> None:
        """Prepare; :meth:`open` connects. ``grace``: how long unclaimed DevEUIs' messages wait for their device."""
        self._grace = grace
        self.key = key
        self.server = server
        self.application = application
        self.client_id = client_id
        # ChirpStack publishes at QoS 1: a persistent session keeps what comes while the agent is away.
        self.persistent = server.type == "chirpstack"
        self.devices: dict[str, Callable[[Message], None]] = {}
        self.unknown: dict[str, Unknown] = {}
        self.counts: Counter[str] = Counter()  # messages, bad_messages, unknown_uplinks, qos0_uplinks
        self.users = 0
        self.connected = False
        self._up_total = 0.0
        self._up_since: float | None = None
        self._lock = threading.Lock()
        self._first = threading.Event()  # connected and subscribed, or refused
        self._subscribing: set[int] = set()  # SUBSCRIBE message ids without their SUBACK yet
        self._refused = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._qos0_warned = False
        self._closing = False
        self._generation = 0  # +1 per connection made: a receipt of an earlier one is not acknowledged
        self.state_changes: list[Callable[[bool], None]] = []
        self._waiting: dict[str, list[Message]] = {}
        self._waiting_count = 0
        self._grace_until = 0.0
        self._room = threading.Condition()
        self.in_hand = 0  # messages passed to the event loop and not yet handled (at most MAX_IN_HAND)
        self.in_hand_peak = 0

    # ---- the clock that runs while connected ------------------------------------------------
    def up_clock(self) -> float:
        """Seconds this connection has been up, in all (it stands still while the broker is away)."""
        with self._lock:
            running = time.monotonic() - self._up_since if self._up_since is not None else 0.0
            return self._up_total + running

    # ---- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and subscribe; DriverStartupError if the broker cannot be reached or refuses."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self._loop = asyncio.get_running_loop()
        self._grace_until = time.monotonic() + self._grace
        if self._grace > 0:
            self._loop.call_later(self._grace, self._end_grace)
        persistent = self.persistent
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=not persistent,
            # A QoS 1 uplink is acknowledged once its events are in the buffer, not when it arrives:
            # one the agent had not handled when it stopped comes again (and dedupe drops what it had).
            manual_ack=persistent,
        )
        username = self.server.username or (self.application if self.server.type == "tts" else None)
        if username is not None or self.server.password_file is not None:
            password = self.server.password_file.read_text().strip() if self.server.password_file else None
            client.username_pw_set(username, password)
        if self.server.tls is not None:
            tls = self.server.tls
            client.tls_set(ca_certs=str(tls.ca_file) if tls.ca_file else None,
                           certfile=str(tls.cert_file) if tls.cert_file else None,
                           keyfile=str(tls.key_file) if tls.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)  # fmt: skip
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(1, 10)
        self._client = client
        where = f"lorawan {self.key}: network server broker {self.server.host}:{self.server.port}"
        try:
            await asyncio.to_thread(client.connect, self.server.host, self.server.port, 30)
        except ssl.SSLError as exc:
            why = f"{where}: TLS failed: {exc}; check network_server.tls.ca_file (the CA that signed the broker's "
            raise DriverStartupError(why + "certificate) and the broker's host name") from exc
        except OSError as exc:
            raise DriverStartupError(f"{where}: cannot connect: {exc}; check network_server.broker (host:port) "
                                     "and that the broker runs") from exc  # fmt: skip
        client.loop_start()
        if not await asyncio.to_thread(self._first.wait, CONNECT_TIMEOUT) or self._refused:
            client.loop_stop()
            why = self._refused or f"no answer within {CONNECT_TIMEOUT:g}s"
            raise DriverStartupError(f"{where}: {why}{_fix(self._refused)}")

    def close(self) -> None:
        """Disconnect (the broker keeps a ChirpStack session's queued uplinks for the next start)."""
        if self._client is not None:
            with self._room:
                self._closing = True
                self._room.notify_all()  # paho's thread may be waiting for room: let it finish
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self._mark(False)

    # ---- paho's thread ----------------------------------------------------------------------
    def _on_connect(self, client: Any, _userdata: Any, flags: Any, reason: Any, _properties: Any) -> None:
        if reason.is_failure:
            self._refused = f"connection refused: {reason}"
            log.error("lorawan %s: %s", self.key, self._refused)
            self._first.set()
            return
        qos = 1 if self.server.type == "chirpstack" else 0  # TTS's MQTT server offers QoS 0 only
        # Ready once the broker has taken the subscriptions (SUBACK), not at CONNACK: what the
        # network server publishes in between would reach no subscription and be lost.
        self._subscribing = {mid for topic in topics(self.server.type, self.application)
                             if (mid := client.subscribe(topic, qos=qos)[1]) is not None}  # fmt: skip
        log.info("lorawan %s: connected as %s (%s session)", self.key, self.client_id,
                 "resumed" if flags.session_present else "new",
                 extra={"subject": f"lorawan {self.key}", "state": "connected"})  # fmt: skip
        self._generation += 1
        self._mark(True)
        if not self._subscribing:
            self._first.set()

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, reasons: Any, _properties: Any) -> None:
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            self._refused = f"subscription refused ({', '.join(refused)}): the broker's ACL must let this user read"
            log.error("lorawan %s: %s", self.key, self._refused)
        self._subscribing.discard(mid)
        if not self._subscribing:
            self._first.set()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        if self.connected and not self._closing:
            log.warning("lorawan %s: connection lost (%s); silence timers paused until it is back", self.key, reason,
                        extra={"subject": f"lorawan {self.key}", "state": "down"})  # fmt: skip
        self._mark(False)

    def _mark(self, up: bool) -> None:
        with self._lock:
            if up and self._up_since is None:
                self._up_since = time.monotonic()
            elif not up and self._up_since is not None:
                self._up_total += time.monotonic() - self._up_since
                self._up_since = None
            changed, self.connected = self.connected != up, up
        if changed and self._loop is not None:
            for listener in self.state_changes:
                self._loop.call_soon_threadsafe(listener, up)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        self.counts["messages"] += 1
        try:
            parsed = parse(self.server.type, message.topic, payload)
        except BadMessage as exc:
            self.counts["bad_messages"] += 1
            log.warning("lorawan %s: message on %s not understood (%s): %r", self.key, message.topic, exc,
                        payload[:SHOWN_BYTES])  # fmt: skip
            self._client_ack(message.mid, message.qos)
            return
        if parsed is None:
            self._client_ack(message.mid, message.qos)
            return
        if message.qos > 0:
            parsed.receipt = (self._generation, message.mid)
        if isinstance(parsed, Uplink) and message.qos == 0 and self.server.type == "chirpstack":
            self.counts["qos0_uplinks"] += 1
            if not self._qos0_warned:
                self._qos0_warned = True
                log.warning("lorawan %s: ChirpStack publishes uplinks at QoS 0: those sent while the agent is down "
                            "are lost. Set qos=1 in ChirpStack's [integration.mqtt]", self.key)  # fmt: skip
        assert self._loop is not None
        if not self._take_room():
            return  # closing: not acknowledged, the broker keeps it for the next start
        parsed.held = True
        self._loop.call_soon_threadsafe(self._deliver, parsed)

    def _take_room(self) -> bool:
        """Wait (paho's thread, so nothing more is read from the broker) until fewer than MAX_IN_HAND are in hand."""
        with self._room:
            while self.in_hand >= MAX_IN_HAND and not self._closing:
                self._room.wait(ROOM_POLL)
            if self._closing:
                return False
            self.in_hand += 1
            self.in_hand_peak = max(self.in_hand_peak, self.in_hand)
            return True

    def _client_ack(self, mid: int, qos: int) -> None:
        client = self._client
        if client is not None and qos > 0:
            client.ack(mid, qos)

    # ---- the event loop -----------------------------------------------------------------------
    def ack(self, message: Message) -> None:
        """The message is handled (its events are in the buffer): the broker may forget it."""
        self.release(message)
        receipt = message.receipt
        if receipt is not None and receipt[0] == self._generation:
            self._client_ack(receipt[1], 1)

    def release(self, message: Message) -> None:
        """The message is out of hand (handled, or dropped unacknowledged by a stopping device): room for another."""
        if message.held:
            message.held = False
            with self._room:
                self.in_hand -= 1
                self._room.notify()

    def register(self, dev_eui: str, handler: Callable[[Message], None]) -> None:
        """Send ``dev_eui``'s messages to ``handler`` (those that arrived before it, first)."""
        self.devices[dev_eui] = handler
        waiting = self._waiting.pop(dev_eui, [])
        self._waiting_count -= len(waiting)
        for message in waiting:
            handler(message)

    def unregister(self, dev_eui: str) -> None:
        """Stop sending ``dev_eui``'s messages anywhere."""
        self.devices.pop(dev_eui, None)

    def _deliver(self, message: Message) -> None:
        handler = self.devices.get(message.dev_eui)
        if handler is not None:
            handler(message)
            return
        if (
            message.dev_eui in CONFIGURED.get(self.key, ())
            and self._waiting_count < MAX_WAITING
            and time.monotonic() < self._grace_until
        ):
            self._waiting.setdefault(message.dev_eui, []).append(message)
            self._waiting_count += 1
            return
        if self._waiting and time.monotonic() >= self._grace_until:
            self._end_grace()  # the timer's job, done now if this comes first
        self._unknown(message)

    def _end_grace(self) -> None:
        """What still waits for a claim belongs to no running device."""
        held, self._waiting, self._waiting_count = self._waiting, {}, 0
        for messages in held.values():
            for old in messages:
                self._unknown(old)

    def _unknown(self, message: Message) -> None:
        self.ack(message)
        entry = self.unknown.get(message.dev_eui)
        if entry is None:
            entry = self.unknown[message.dev_eui] = Unknown(message.dev_eui, None, None, message.received)
            log.info("lorawan %s: DevEUI %s (%s) is not configured; its messages are counted, not published "
                     "(edge-agent scan lorawan lists them)", self.key, message.dev_eui,
                     message.name or "no name")  # fmt: skip
        entry.name = message.name or entry.name
        entry.profile = message.profile or entry.profile
        entry.last_seen = datetime.now(UTC)
        if isinstance(message, Uplink):
            entry.uplinks += 1
            self.counts["unknown_uplinks"] += 1


def _fix(refused: str) -> str:
    """What to change for a refusal the broker explained."""
    if "authoriz" in refused.lower() or "password" in refused.lower():
        return "; check network_server.username and network_server.password_file (the password alone, 0600)"
    return ""


class Pool:
    """Connections by key: the first device of an application opens one, the last closes it."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        # Key -> why it could not be opened, and when: reported as a link down, and answered again
        # without a new attempt for FAILED_FOR (10,000 devices retrying must not mean 10,000 handshakes).
        self.failed: dict[str, tuple[str, float]] = {}

    async def acquire(self, config: LorawanConfig) -> Connection:
        """The connection for ``config``'s broker and application, opened if needed."""
        key = config.connection_key()
        lock = self._opening.setdefault(key, asyncio.Lock())
        async with lock:
            connection = self.connections.get(key)
            if connection is None:
                failed = self.failed.get(key)
                if failed is not None and time.monotonic() - failed[1] < FAILED_FOR:
                    raise DriverStartupError(failed[0])
                connection = Connection(config.network_server, config.application, config.client_id(), key)
                try:
                    await connection.open()
                except DriverStartupError as exc:
                    connection.close()
                    self.failed[key] = (str(exc), time.monotonic())
                    raise
                self.failed.pop(key, None)
                self.connections[key] = connection
            connection.users += 1
            return connection

    def release(self, connection: Connection) -> None:
        """One device less; the last one closes the connection."""
        connection.users -= 1
        if connection.users <= 0 and self.connections.get(connection.key) is connection:
            del self.connections[connection.key]
            connection.close()

    def states(self) -> dict[str, dict[str, Any]]:
        """Connection key -> connected and its counters, for health and metrics (read from another thread)."""
        out: dict[str, dict[str, Any]] = {key: {"connected": False, "last_error": why}
                                          for key, (why, _) in list(self.failed.items())}  # fmt: skip
        out.update({key: {"connected": c.connected, **{k: c.counts[k] for k in COUNTED}}
                    for key, c in list(self.connections.items())})  # fmt: skip
        return out


POOL = Pool()
