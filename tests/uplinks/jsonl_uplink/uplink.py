"""Delivery of the JSON-lines test uplink: read a batch from the feed, append it, fsync, acknowledge.

The file is opened for every write, so a missing folder is noticed at once (a file kept open
would go on taking writes wherever its folder was moved). An event is acknowledged only after
its line is on disk; a failure after the write and before the acknowledgement writes it again
on the next attempt: at least once, as the MQTT uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from agent.store.outbox import Stored
from agent.uplinks.api import EventFeed, UplinkContext
from tests.uplinks.jsonl_uplink import JsonlConfig

log = logging.getLogger(__name__)


class JsonlUplink:
    """Appends the feed's events to one file; the file being writable is "connected"."""

    def __init__(self, config: JsonlConfig, context: UplinkContext) -> None:
        """Configure; nothing is written until :meth:`run`."""
        self.config = config
        self.title = context.title
        self.status = context.status
        self.status.since = time.time()

    def quiet_allowance(self) -> float:
        """A write is one fsync: a few seconds without progress on a writable file is a stall."""
        return 5.0

    async def goodbye(self) -> None:
        """A file has no one to tell that the agent stops."""

    async def run(self, feed: EventFeed) -> None:
        """Deliver until cancelled; after a failed write, wait ``retry`` and start over."""
        while True:
            try:
                await self._deliver(feed)
            except OSError as exc:
                self._down(f"cannot write {self.config.path}: {exc.strerror or exc}")
            await asyncio.sleep(self.config.retry)

    async def _deliver(self, feed: EventFeed) -> None:
        await asyncio.to_thread(self._append, [])  # is the far end there at all?
        self._up()
        # Per class, the last id taken in this attempt. A new attempt starts empty, so every
        # event not acknowledged yet is read again from the feed.
        cursors: dict[int, int] = {}
        while True:
            feed.committed.clear()  # before looking, so a commit during the look still wakes us
            rows = await feed.next_batch(cursors, self.config.batch)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(feed.committed.wait(), self.config.retry)
                if not feed.committed.is_set():
                    await asyncio.to_thread(self._append, [])  # idle: notice an outage anyway
                continue
            for row in rows:
                cursors[row.priority] = row.id
            self.status.published += len(rows)
            await asyncio.to_thread(self._append, rows)
            await feed.ack([row.id for row in rows])
            self.status.acked += len(rows)

    def _append(self, rows: list[Stored]) -> None:
        """One line per event, then fsync (on a worker thread)."""
        fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if rows:
                data = memoryview(b"".join(row.payload + b"\n" for row in rows))
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
        finally:
            os.close(fd)

    def _up(self) -> None:
        if not self.status.connected:
            self.status.connected = True
            self.status.connects += 1
            self.status.since = time.time()
            self.status.last_error = None
            log.info("%s uplink writing to %s", self.title, self.config.path)

    def _down(self, reason: str) -> None:
        if self.status.connected:
            self.status.connected = False
            self.status.disconnects += 1
            self.status.since = time.time()
            log.warning("%s uplink lost: %s; buffering until it is back", self.title, reason)
        elif reason != self.status.last_error:
            log.warning("%s uplink down: %s; retrying", self.title, reason)
        self.status.failed(reason)


def create(settings: JsonlConfig, context: UplinkContext) -> JsonlUplink:
    """The plugin's factory."""
    return JsonlUplink(settings, context)
