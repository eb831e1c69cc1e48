"""The event store: turns readings into sequenced CloudEvents and commits them durably.

All SQLite work happens on one dedicated thread, so the event loop never waits on an fsync.
Readings queue in memory for at most one commit; the writer takes everything queued at once
(group commit), so throughput is not bound by fsyncs while latency stays one commit long.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

from agent.contract.events import Priority, Reading, format_time, make_event, topic_for
from agent.store.outbox import (
    BufferFullError,
    BufferStats,
    Dropped,
    Outbox,
    OutboxReader,
    Record,
    Stored,
    is_corruption,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_COMMIT = 5000  # events per transaction: bounds one commit's latency under a burst
COMMIT_INTERVAL = 0.025  # seconds between group commits under load
TAIL_MAX = 5000  # committed events per class kept in memory for the uplink (see _tail)
TAIL_MAX_MEDIA = 16  # snapshots are ~100 KB each: keep few in memory, read the rest from the file
WRITE_FAILURE_PAUSE = 1.0  # seconds after an unexpected write failure
MAX_PENDING_BYTES = 8 * 1024 * 1024  # readings waiting for a commit before new ones are refused
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused readings


class EventStore:
    """Sequencing, envelope and durable commit of events; feeds the uplink in priority order."""

    def __init__(
        self,
        outbox: Callable[[], Outbox],
        *,
        gateway: str,
        topic_prefix: str,
        on_dropped: Callable[[list[Dropped]], None] | None = None,
    ) -> None:
        """Prepare; the file is opened by :meth:`open` on the store's own thread."""
        self._make_outbox = outbox
        self.gateway = gateway
        self.topic_prefix = topic_prefix
        self._on_dropped = on_dropped
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-agent-db")
        # Backlog reads go through their own connection and thread: never behind a commit.
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-agent-read")
        self._reader: OutboxReader | None = None
        self._reader_generation = -1
        self._outbox: Outbox | None = None
        self._generation = 0  # the outbox's file generation this store last saw
        self.epoch = ""  # the buffer's sequence epoch, stamped on every event as seqepoch
        self._seqs: dict[str, int] = {}
        self._pending: list[Record] = []
        self._has_pending = asyncio.Event()
        self.committed = asyncio.Event()  # set after each commit; the uplink waits on it
        self.not_accepted = 0  # readings refused before a commit (overload, disk full)
        self.priorities: set[int] = {int(p) for p in Priority}
        # The live path: events just committed, handed to the uplink without reading them
        # back from SQLite. Invariant, per class: every stored event with id >= _tail_from
        # that the uplink has not taken yet is in _tail. Older ones are read from the file.
        self._tail: dict[int, deque[Stored]] = {}
        self._tail_from: dict[int, int] = {}
        self._next_id = 1
        self._pending_bytes = 0
        self._refusal_logged_at = -REFUSAL_LOG_INTERVAL
        self._now_millis = -1
        self._now_text = ""
        self._topics: dict[tuple[str, str, str], str] = {}

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    @property
    def outbox(self) -> Outbox:
        """The open outbox (only to be used on the store's thread)."""
        if self._outbox is None:
            raise RuntimeError("event store is not open")
        return self._outbox

    async def open(self) -> None:
        """Open (or quarantine and recreate) the buffer file and load the sequence numbers."""
        self._outbox = await self._call(self._make_outbox)
        self._outbox.hints = self._untaken
        self._generation = self._outbox.generation
        self.epoch = self._outbox.epoch
        self._seqs = await self._call(self.outbox.last_seqs)
        self.priorities |= set(await self._call(self.outbox.priorities))
        self._next_id = await self._call(self.outbox.next_id)

    def submit(self, device: str, reading: Reading, priority: int) -> None:
        """Sequence and serialise one reading and queue it for the next commit.

        Never blocks. If commits have stalled so long that ``MAX_PENDING_BYTES`` of readings
        wait, the reading is refused, counted (``not_accepted``) and logged: it was never
        accepted. This bounds memory when the disk cannot keep up.
        """
        if self._pending_bytes >= MAX_PENDING_BYTES:
            self._refuse(device, "the buffer cannot commit fast enough")
            return
        seq = self._seqs.get(device, 0) + 1
        now = time.time()
        millis = int(now * 1000)
        if millis != self._now_millis:  # thousands of events share a millisecond: format it once
            self._now_millis = millis
            self._now_text = format_time(datetime.fromtimestamp(millis / 1000, UTC))
        try:
            payload = make_event(
                gateway=self.gateway, device=device, seq=seq, reading=reading, now=self._now_text, epoch=self.epoch
            )
        except (TypeError, ValueError) as exc:
            # A driver bug must not take the device down, nor leave a gap in seq.
            self._refuse(device, f"{reading.type} data is not JSON: {exc}")
            return
        self._seqs[device] = seq
        key = (self.topic_prefix, device, reading.type)  # a reload may change the prefix
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = topic_for(self.topic_prefix, self.gateway, device, reading.type)
        # Positional: this runs once per event.
        self._pending.append(Record(device, reading.type, priority, seq, topic, payload, now))
        self._pending_bytes += len(payload)
        self.priorities.add(priority)
        self._has_pending.set()

    def _refuse(self, device: str, why: str, count: int = 1) -> None:
        """Count readings that never reached the buffer; log the first and then every 10 s."""
        self.not_accepted += count
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.error("%d reading(s) (%s...) not stored: %s (%d in all)", count, device, why, self.not_accepted)
            self._refusal_logged_at = now

    async def run_writer(self) -> None:
        """Commit queued readings in groups until cancelled.

        At most one commit per ``COMMIT_INTERVAL``: a steady trickle of readings then
        shares fsyncs and thread hand-offs instead of paying one each, for a few ms of
        latency; a reading after a quiet spell is committed at once.
        """
        last = 0.0
        while True:
            await self._has_pending.wait()
            wait = last + COMMIT_INTERVAL - time.monotonic()
            if wait > 0 and len(self._pending) < MAX_COMMIT:
                await asyncio.sleep(wait)
            last = time.monotonic()
            await self._commit_some()

    async def _commit_some(self) -> None:
        batch = self._pending[:MAX_COMMIT]
        del self._pending[:MAX_COMMIT]
        self._pending_bytes -= sum(len(r.payload) for r in batch)
        if not self._pending:
            self._has_pending.clear()
        try:
            result = await self._call(self.outbox.append, batch)
        except BufferFullError as exc:
            self._refuse(batch[0].device, str(exc), len(batch))
        except Exception as exc:
            # The disk or file failed in a way the buffer could not absorb: count the loss,
            # keep the writer alive, and do not spin on a failing disk.
            self._refuse(batch[0].device, f"buffer write failed: {type(exc).__name__}: {exc}", len(batch))
            self._check_replaced()
            await asyncio.sleep(WRITE_FAILURE_PAUSE)
        else:
            self._check_replaced()
            if result.refused:
                self._refuse(batch[-1].device, "the disk is full (lower classes refused first)", result.refused)
            self._extend_tail(batch, result.first_id, result.accepted, evicted=bool(result.dropped or result.refused))
            if result.dropped and self._on_dropped is not None:
                self._on_dropped(result.dropped)
        self.committed.set()

    def _check_replaced(self) -> None:
        """After the buffer replaced a damaged file: report what was lost, take up its epoch."""
        outbox = self._outbox
        if outbox is None or outbox.generation == self._generation:
            return
        self._generation = outbox.generation
        self.epoch = outbox.epoch
        if outbox.recovered_drops and self._on_dropped is not None:
            self._on_dropped(outbox.recovered_drops)
        self.committed.set()  # the uplink may have stalled on the damaged file: let it look again

    def _untaken(self) -> list[Stored]:
        """Committed events in memory never handed out, in any session (on the buffer's thread).

        Never handed out means never acknowledged: putting them back into a replaced file
        cannot resurrect an event already delivered.

        list() of a deque or of dict values is one C call under the GIL: a consistent copy.
        """
        return [row for tail in list(self._tail.values()) for row in list(tail)]

    def _extend_tail(self, batch: list[Record], first_id: int, accepted: int, *, evicted: bool) -> None:
        next_id = first_id + accepted
        if evicted:
            # Evicted (or refused) events may sit in the tail: start afresh after this batch.
            self._tail.clear()
            self._tail_from = dict.fromkeys(self.priorities, next_id)
            self._next_id = next_id
            return
        for offset, r in enumerate(batch):
            tail = self._tail.setdefault(r.priority, deque())
            tail.append(Stored(first_id + offset, r.priority, r.device, r.type, r.seq, r.topic, r.payload, r.created))
        for priority, tail in self._tail.items():
            most = TAIL_MAX_MEDIA if priority == Priority.MEDIA else TAIL_MAX
            if len(tail) > most:  # the uplink is not taking them (link down): read them back later
                tail.clear()
                self._tail_from[priority] = next_id
        self._next_id = next_id

    async def flush(self) -> None:
        """Commit everything queued so far (used at shutdown)."""
        while self._pending:
            await self._commit_some()

    async def next_batch(self, cursors: dict[int, int], limit: int) -> list[Stored]:
        """Up to ``limit`` stored events after the cursors, highest class first.

        ``cursors`` maps a class to the last id the caller took of it (absent: none yet).
        Caught-up classes are served from memory; a backlog is read from the file.
        """
        rows: list[Stored] = []
        for priority in sorted(self.priorities, reverse=True):
            need = limit - len(rows)
            if need <= 0:
                break
            cursor = cursors.get(priority, 0)
            start = self._tail_from.get(priority, self._next_id)
            if cursor >= start - 1:
                tail = self._tail.get(priority)
                while tail and tail[0].id <= cursor:  # already taken from the file
                    tail.popleft()
                # Caught up: from here on this class is served from memory.
                self._tail_from[priority] = cursor + 1
                while tail and need > 0:
                    taken = tail.popleft()
                    rows.append(taken)
                    # Taken events leave memory; after a reconnect they are read from the file.
                    self._tail_from[priority] = taken.id + 1
                    need -= 1
            else:
                loop = asyncio.get_running_loop()
                got = await loop.run_in_executor(self._reads, self._peek, priority, cursor, need)
                self._check_replaced()
                tail = self._tail.get(priority)
                # Taken from the file: out of memory at once, so the tail holds only events
                # never handed out (a damaged file is repaired from it: see _untaken).
                while got and tail and tail[0].id <= got[-1].id:
                    tail.popleft()
                rows += got
        if self._outbox is not None:
            self._outbox.taken = cursors  # evicting what the consumer holds is remembered (see Outbox.ack)
        return rows

    def _peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        """On the read thread: peek through the reader, reopened if the file was replaced.

        A damaged file found here is handed to the buffer's thread, which replaces it as it
        would for damage found on a write, and the read is tried once more on the new file.
        """
        for attempt in (1, 2):
            outbox = self.outbox
            if self._reader is None or self._reader_generation != outbox.generation:
                if self._reader is not None:
                    self._reader.close()
                self._reader, self._reader_generation = OutboxReader(outbox.path), outbox.generation
            try:
                return self._reader.peek(priority, after_id, limit)
            except sqlite3.DatabaseError as exc:
                if attempt == 2:
                    raise
                # Through the buffer's thread even when it is not corruption: if the writer is
                # replacing the file right now (this reader then sees an I/O error on the moved
                # file), this waits for it to finish.
                self._db.submit(outbox.recover, exc, self._reader_generation).result()
                if not is_corruption(exc) and outbox.generation == self._reader_generation:
                    raise
        raise AssertionError("unreachable")

    async def ack(self, ids: Sequence[int]) -> int:
        """Delete delivered events; returns how many were counted as delivered."""
        try:
            return await self._call(self.outbox.ack, ids)
        finally:
            self._check_replaced()

    async def stats(self) -> BufferStats:
        """Counters and depth of the buffer."""
        try:
            return await self._call(self.outbox.stats)
        finally:
            self._check_replaced()

    async def close(self) -> None:
        """Commit what is queued, then close the file."""
        started = time.monotonic()
        await self.flush()
        self._reads.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._outbox is not None:
            await self._call(self._outbox.close)
            self._outbox = None
        self._db.shutdown(wait=True)
        log.debug("event store closed in %.3fs", time.monotonic() - started)
