"""The grouped delete of delivered rows: PUBACKed messages leave the buffer a group at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.uplinks.api import EventFeed

# PUBACKed rows are deleted in groups: at once when this many messages wait, else after at most
# ACK_FLUSH_DELAY, one delete in flight at a time. A crash resends what was acknowledged but not
# yet deleted (duplicates, same seq); the window counts those messages, so a crash resends at
# most max_inflight messages whatever the drain rate.
ACK_FLUSH_MESSAGES = 16
ACK_FLUSH_DELAY = 0.005


class Acks:
    """Delivered rows waiting for their delete, and the task that deletes them."""

    def __init__(self, wake: asyncio.Event, refill_at: int) -> None:
        """``wake`` is set when a delete brings the window down to ``refill_at`` messages."""
        self._wake = wake
        self._refill_at = refill_at
        self._acked: list[int] = []  # rows to delete
        self._acked_messages = 0  # messages those rows came in
        self._flushing_messages = 0  # messages of the delete in progress
        self._waiting = asyncio.Event()
        self._stop = False

    def messages(self) -> int:
        """Delivered messages whose rows are not deleted yet: they still count in the window."""
        return self._acked_messages + self._flushing_messages

    def delivered(self, ids: list[int]) -> None:
        """Queue one delivered message's rows for the next grouped delete."""
        self._acked += ids
        self._acked_messages += 1
        self._waiting.set()

    def start(self, feed: EventFeed, unconfirmed: Callable[[], int]) -> asyncio.Task[None]:
        """Run the deleting task until :meth:`stop`; ``unconfirmed`` is the window's occupancy."""
        self._stop = False
        return asyncio.create_task(self._flusher(feed, unconfirmed), name="uplink-ack-flusher")

    def stop(self) -> None:
        """Let the task end after the delete in progress, if any."""
        self._stop = True
        self._waiting.set()

    async def _flusher(self, feed: EventFeed, unconfirmed: Callable[[], int]) -> None:
        """Delete delivered rows soon after their PUBACK, one delete at a time."""
        while not self._stop:
            await self._waiting.wait()  # an idle link costs no wake-ups
            if self._acked_messages < ACK_FLUSH_MESSAGES and not self._stop:
                await asyncio.sleep(ACK_FLUSH_DELAY)
            self._waiting.clear()
            await self.flush(feed)
            if unconfirmed() <= self._refill_at:
                self._wake.set()

    async def flush(self, feed: EventFeed) -> None:
        """Delete every delivered row queued so far."""
        if self._acked:
            ids, self._acked = self._acked, []
            self._flushing_messages, self._acked_messages = self._acked_messages, 0
            try:
                await feed.ack(ids)
            finally:
                self._flushing_messages = 0
