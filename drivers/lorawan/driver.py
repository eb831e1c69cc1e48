"""The LoRaWAN driver: one device's messages from the shared connection, into events; silence into offline."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

from agent.contract.events import Reading
from agent.devices.api import Driver, DriverContext
from drivers.lorawan.codecs import get_codec
from drivers.lorawan.config import LorawanConfig
from drivers.lorawan.connection import POOL, Connection
from drivers.lorawan.journal import JOURNALS, Journal
from drivers.lorawan.logic import DeviceLogic
from drivers.lorawan.messages import Join, Message, Status, Uplink

log = logging.getLogger(__name__)


def span(seconds: float) -> str:
    """``2 h 10 min``, ``45 min``, ``30 s``: a silence as a person reads it."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes:
        parts.append(f"{minutes} min")
    if secs and not hours:
        parts.append(f"{secs} s")
    return " ".join(parts) or "0 s"


class LorawanDriver(Driver):
    """Publishes one DevEUI's uplinks; offline after ``interval * offline_after`` of silence while connected."""

    config: LorawanConfig

    def __init__(self, config: LorawanConfig, context: DriverContext) -> None:
        """Prepare; :meth:`start` joins the application's connection."""
        super().__init__(config, context)
        self.config = config
        self._connection: Connection | None = None
        # A list and a future, not an asyncio.Queue: 10,000 queues with their deques and locks were
        # ~2.5 KB each (tracemalloc), a quarter of the agent's memory per device.
        self._inbox: list[Message] = []
        self._wake: asyncio.Future[None] | None = None
        self._journal: Journal | None = None
        self._logic: DeviceLogic | None = None
        self._heard_at = 0.0  # the connection's up-clock when the device was last heard
        self._reported = 0  # silent intervals already reported as failed polls
        self._offline = False  # as the runner sees it: offline_after intervals reported, no uplink since

    async def start(self) -> None:
        """Read the device's state; join (or open) the connection to its application and claim its DevEUI."""
        if self._journal is None:
            journal = self._journal = JOURNALS.acquire(self.config.network_server.state_dir)
            self._logic = DeviceLogic(self.config, get_codec(self.config.codec), journal.state(self.config.dev_eui))
        connection = self._connection = await POOL.acquire(self.config)
        self._heard_at = connection.up_clock()
        connection.register(self.config.dev_eui, self._put)

    def _put(self, message: Message) -> None:
        self._inbox.append(message)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def stop(self) -> None:
        """Release the DevEUI, the connection and the state journal (the last device out writes it)."""
        if self._connection is not None:
            self._connection.unregister(self.config.dev_eui)
            for message in self._inbox:  # not handled: not acknowledged, the broker keeps it for the next start
                self._connection.release(message)
            self._inbox = []
            POOL.release(self._connection)
            self._connection = None
        if self._journal is not None:
            JOURNALS.release(self._journal)
            self._journal = None

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Each batch of messages waiting, as events; between them, watch for silence."""
        while True:
            if not self._inbox:
                self._wake = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait_for(self._wake, self._until_silent())
                except TimeoutError:
                    self._check_silence()
                    continue
                finally:
                    self._wake = None
            batch, self._inbox = self._inbox, []
            connection = self._connection
            assert connection is not None
            try:
                readings = self._handle(batch)
                if readings:
                    yield readings  # the runner hands them to the buffer before it asks for more
                for message in batch:
                    connection.ack(message)
            finally:  # stopped before its events were buffered: unacknowledged, but out of hand
                for message in batch:
                    connection.release(message)

    @property
    def logic(self) -> DeviceLogic:
        """The device's logic and state (from start() on)."""
        assert self._logic is not None, "start() first"
        return self._logic

    def _handle(self, batch: list[Message]) -> list[Reading]:
        assert self._connection is not None
        assert self._journal is not None
        logic, journal, dev_eui = self.logic, self._journal, self.config.dev_eui
        out: list[Reading] = []
        now = time.monotonic()
        for message in batch:
            self._heard_at = self._connection.up_clock()
            self._reported = 0
            if isinstance(message, Uplink):
                readings = logic.uplink(message, now)
                self._offline = False
                if readings:
                    out += readings
            elif isinstance(message, Join):
                logic.join(message)
            elif isinstance(message, Status):
                out += logic.status(message, now)
            if not self._offline:  # an offline device comes back with its next uplink, not a join or status
                self.context.poll_ok()
            if logic.dirty:
                keys: list[int | None] = [*logic.new_keys] or [None]
                for key in keys:
                    journal.record(dev_eui, logic.state, key)
                logic.new_keys.clear()
                logic.dirty = False
        for reason in logic.undecoded:
            self.context.count_failure(f"undecoded {reason}")
        logic.undecoded.clear()
        return out

    def _until_silent(self) -> float:
        """Real seconds until the next silent interval ends, if the connection stays up."""
        assert self._connection is not None
        silent = self._connection.up_clock() - self._heard_at
        due = (self._reported + 1) * self.config.interval - silent
        return max(0.05, min(due, self.config.interval)) if math.isfinite(due) else self.config.interval

    def _check_silence(self) -> None:
        """One failed poll per interval of silence; the runner goes offline after ``offline_after``."""
        assert self._connection is not None
        silent = self._connection.up_clock() - self._heard_at
        intervals = int(silent // self.config.interval)
        while self._reported < intervals:
            self._reported += 1
            reason = f"silent {span(silent)}, expected every {span(self.config.interval)}"
            self.context.poll_failed(reason)
        if self._reported >= self.config.offline_after:
            self._offline = True
