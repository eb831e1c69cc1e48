"""One durable uplink's feed: its own outbox file, the committed events it has not taken yet,
and the reads, acknowledgements and repairs of that file.

Each durable uplink has one (as each Telegraf output owns its buffer), so one uplink's outage
fills and evicts only its own file. All outbox calls run on the store's commit thread (see
:class:`DbThread`); backlog reads run on the feed's own read thread, never behind a commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent.contract.events import Priority
from agent.store.acklog import AckLog
from agent.store.outbox import AppendResult, BufferStats, Dropped, Outbox, Record, Stored
from agent.store.readback import ReadBack
from agent.store.records import Lanes

log = logging.getLogger(__name__)
T = TypeVar("T")

TAIL_MAX = 5000  # committed events per class kept in memory for the uplink (see Feed._tail)
TAIL_MAX_MEDIA = 16  # snapshots are ~100 KB each: keep few in memory, read the rest from the file
# Logged acks are deleted once this many wait, or this long after the first of them: a delete
# transaction per group, whatever the rate (at 100 events/s, 4 a second instead of 50). Waiting
# costs no duplicates: the log, not the delete, is what a crash keeps (agent/store/acklog.py).
ACK_APPLY_GROUP = 1000
ACK_APPLY_DELAY = 0.25  # seconds
ACK_APPLY_POLL = 0.02  # seconds between looks at how many wait
ACK_RETRY_PAUSE = 1.0  # seconds after a delete of logged acks failed (they stay logged)


async def _group_of(acks: AckLog) -> None:
    """Return once ``ACK_APPLY_GROUP`` logged acks wait, or ``ACK_APPLY_DELAY`` after the call."""
    loop = asyncio.get_running_loop()
    first = loop.time()
    while len(acks) < ACK_APPLY_GROUP and loop.time() - first < ACK_APPLY_DELAY:
        await asyncio.sleep(ACK_APPLY_POLL)


class DbThread:
    """The one thread every outbox call runs on, and what it is doing (for the stall checks).

    ``busy_op``/``busy_since`` are plain attributes written on that thread and read from others
    (single values, safe under the GIL): which operation runs since when.
    """

    def __init__(self) -> None:
        """Start the thread pool of one."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-agent-db")
        self.busy_op = ""
        self.busy_since: float | None = None

    async def call(self, op: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the thread, noting ``op`` while it runs."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, op, fn, *args)

    def _timed(self, op: str, fn: Callable[..., T], *args: object) -> T:
        self.busy_op, self.busy_since = op, time.monotonic()
        try:
            return fn(*args)
        finally:
            self.busy_since = None

    def shutdown(self) -> None:
        """Wait for the call in progress, then stop the thread."""
        self.executor.shutdown(wait=True)


class Feed:
    """Accepted events for one durable uplink, in class order, from memory or from its file."""

    def __init__(
        self,
        name: str,
        make_outbox: Callable[[], Outbox],
        db: DbThread,
        on_dropped: Callable[[str, list[Dropped]], None] | None = None,
        on_replaced: Callable[[Outbox], None] | None = None,
        priorities: set[int] | None = None,
        settle: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Prepare; :meth:`open` opens the file on the commit thread. ``settle``: the store's
        wait for the readings it has queued (see :meth:`settled`)."""
        self.name = name
        self._settle = settle
        self._on_replaced = on_replaced
        self._make_outbox = make_outbox
        self._db = db
        self._on_dropped = on_dropped
        self._reads = ReadBack(name, lambda: self.outbox, db.executor)
        self._outbox: Outbox | None = None
        self._generation = 0  # the outbox's file generation this feed last saw
        self.committed = asyncio.Event()  # set after each commit; the uplink waits on it
        self.not_accepted = 0  # readings that never reached this feed's file (overload, disk full)
        self.commits = 0
        self.last_commit_ok = True
        self.last_commit_error: str | None = None
        # Every class seen, shared with the store, which adds each event's as it queues it.
        self.priorities: set[int] = priorities if priorities is not None else set()
        self.priorities |= {int(p) for p in Priority}
        # The live path: events just committed, handed to the uplink without reading them
        # back from SQLite. Invariant, per class: every stored event with id >= _tail_from
        # that the uplink has not taken yet is in _tail. Older ones are read from the file.
        self._tail: dict[int, deque[Stored]] = {}
        self._tail_from: dict[int, int] = {}
        self._next_id = 1
        # The uplink's session (its cursors dict or Lanes, new on every connection) and the first id
        # committed during it: events below were accepted while no connection was taking them.
        self._session: object | None = None
        self._live_from = 0
        self._applier: asyncio.Task[None] | None = None  # deletes what ack() logged, see _apply_logged

    @property
    def outbox(self) -> Outbox:
        """The open outbox (only to be used on the commit thread)."""
        if self._outbox is None:
            raise RuntimeError(f"feed {self.name} is not open")
        return self._outbox

    async def open(self) -> None:
        """Open (or quarantine and recreate) the file; learn its classes and next id."""
        self._outbox = await self._db.call("open", self._make_outbox)
        self._outbox.hints = self._untaken
        self._generation = self._outbox.generation
        self.priorities |= set(await self._db.call("open", self._outbox.priorities))
        self._next_id = await self._db.call("open", self._outbox.next_id)

    async def append(self, batch: list[Record]) -> AppendResult:
        """Commit a batch to this feed's file (on the commit thread); the caller counts refusals."""
        try:
            result = await self._db.call("commit", self.outbox.append, batch)
        except BaseException as exc:
            self.last_commit_ok, self.last_commit_error = False, f"{type(exc).__name__}: {exc}"
            self.check_replaced()
            raise
        self.last_commit_ok, self.last_commit_error = True, None
        self.commits += 1
        self.check_replaced()
        self._extend_tail(batch, result.first_id, result.accepted, evicted=bool(result.dropped or result.refused))
        if result.dropped and self._on_dropped is not None:
            self._on_dropped(self.name, result.dropped)
        return result

    def check_replaced(self) -> None:
        """After the outbox replaced a damaged file: report what was lost, tell the store."""
        outbox = self._outbox
        if outbox is None or outbox.generation == self._generation:
            return
        self._generation = outbox.generation
        if self._on_replaced is not None:
            self._on_replaced(outbox)
        if outbox.recovered_drops and self._on_dropped is not None:
            self._on_dropped(self.name, outbox.recovered_drops)
        self.committed.set()  # the uplink may have stalled on the damaged file: let it look again

    def _untaken(self) -> list[Stored]:
        """Committed events in memory never handed out, in any session (on the commit thread).

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

    async def settled(self) -> bool:
        """Wait until every reading submitted so far is committed, so the next read sees it
        (bounded: False if readings kept coming or the disk stalled)."""
        return await self._settle() if self._settle is not None else True

    async def next_batch(self, cursors: dict[int, int], limit: int) -> list[Stored]:
        """Up to ``limit`` stored events after the cursors, highest class first.

        ``cursors`` maps a class to the last id the caller took of it (absent: none yet).
        Caught-up classes are served from memory; a backlog is read from the file.

        The uplink makes a new ``cursors`` dict for each connection, so a dict not seen before
        starts a session: every event committed before it was accepted while nothing was
        sending (an outage, the time before the first connection, an earlier run's buffer) and
        is handed out with ``backlog`` set, from memory or from the file alike. Events committed
        during the session are live even when a slow link leaves them to be read back from the
        file: that is congestion, not an outage.
        """
        if cursors is not self._session:
            self._session, self._live_from = cursors, self._next_id
        live_from = self._live_from
        rows: list[Stored] = []
        for priority in sorted(self.priorities, reverse=True):
            need = limit - len(rows)
            if need <= 0:
                break
            cursor = cursors.get(priority, 0)
            got = self._from_tail(priority, cursor, need)
            if got is None:
                got = await self._from_file(priority, cursor, need)
            for row in got:
                row.backlog = row.id < live_from
            rows += got
        if self._outbox is not None:
            self._outbox.taken = cursors  # evicting what the consumer holds is remembered (see Outbox.ack)
        return rows

    async def next_lanes(self, lanes: Lanes, limit: int, backlog_limit: int = 0) -> list[Stored]:
        """Up to ``limit`` live events, then up to ``backlog_limit`` backlog ones, highest class first
        in each lane; advances ``lanes``. A new ``lanes`` starts a session (as a new dict does for
        :meth:`next_batch`): what was committed before it is backlog, read from the file behind a
        cursor of its own, so live events never wait behind it (and it leaves memory now).
        """
        if lanes is not self._session:
            self._session = lanes
            lanes.live_from = self._live_from = self._next_id
            self._tail.clear()
            self._tail_from = dict.fromkeys(self.priorities, self._next_id)
        rows: list[Stored] = []
        for priority in sorted(self.priorities, reverse=True):
            need = limit - len(rows)
            if need <= 0:
                break
            cursor = lanes.live.get(priority, lanes.live_from - 1)
            got = self._from_tail(priority, cursor, need)
            if got is None:
                got = await self._from_file(priority, cursor, need)
            lanes.live[priority] = got[-1].id if got else cursor
            rows += got
        live = len(rows)
        for priority in sorted(self.priorities - lanes.drained, reverse=True):
            need = backlog_limit - (len(rows) - live)
            if need <= 0:
                break
            cursor = lanes.backlog.get(priority, 0)
            got = await self._from_file(priority, cursor, need, below=lanes.live_from)
            if len(got) < need:  # the rest of this class, if any, is live
                lanes.drained.add(priority)
            for row in got:
                row.backlog = True
            lanes.backlog[priority] = got[-1].id if got else cursor
            rows += got
        for row in rows:
            if row.id > lanes.taken.get(row.priority, 0):
                lanes.taken[row.priority] = row.id
        if self._outbox is not None:
            self._outbox.taken = lanes.taken  # evicting what the consumer holds is remembered (see Outbox.ack)
        return rows

    def _from_tail(self, priority: int, cursor: int, need: int) -> list[Stored] | None:
        """Up to ``need`` events after ``cursor`` from memory; None if some are only in the file."""
        if cursor < self._tail_from.get(priority, self._next_id) - 1:
            return None
        tail = self._tail.get(priority)
        while tail and tail[0].id <= cursor:  # already taken from the file
            tail.popleft()
        # Caught up: from here on this class is served from memory.
        self._tail_from[priority] = cursor + 1
        rows: list[Stored] = []
        while tail and len(rows) < need:
            taken = tail.popleft()
            rows.append(taken)
            self._tail_from[priority] = taken.id + 1  # taken: after a reconnect it is read from the file
        return rows

    async def _from_file(self, priority: int, cursor: int, need: int, below: int | None = None) -> list[Stored]:
        """Up to ``need`` events after ``cursor`` (and below id ``below``, if given) from the file."""
        if below is not None and cursor >= below - 1:
            return []
        if self._outbox is not None and self._outbox.acks.highest > cursor:
            # Logged acks this read could return (a reconnect reads from the start): delete them first.
            await self._db.call("ack", self._outbox.apply_acks)
        got = await self._reads.peek(priority, cursor, need)
        self.check_replaced()
        if below is not None:
            got = [row for row in got if row.id < below]
        tail = self._tail.get(priority)
        # Taken from the file: out of memory at once, so the tail holds only events never
        # handed out (a damaged file is repaired from it: see _untaken).
        while got and tail and tail[0].id <= got[-1].id:
            tail.popleft()
        return got

    async def ack(self, ids: Sequence[int]) -> int:
        """Delivered events leave the buffer; returns how many ids were taken.

        They are written to the ack log at once, on this thread (a process crash keeps it), and
        deleted in groups (``ACK_APPLY_GROUP``, ``ACK_APPLY_DELAY``; agent/store/acklog.py): a transaction
        and a thread hand-off for every few PUBACKs cost more than committing the events. If the
        log cannot be written, they are deleted at once.
        """
        outbox = self.outbox
        try:
            outbox.ack_later(ids)
        except OSError:
            try:
                return await self._db.call("ack", outbox.ack, ids)
            finally:
                self.check_replaced()
        if self._applier is None or self._applier.done():
            self._applier = asyncio.create_task(self._apply_logged(outbox), name=f"ack-log-{self.name}")
        return len(ids)

    async def _apply_logged(self, outbox: Outbox) -> None:
        """Delete the logged acks in groups until none are left."""
        while outbox.acks.highest and outbox is self._outbox:
            await _group_of(outbox.acks)
            try:
                await self._db.call("ack", outbox.apply_acks)
            except Exception:
                # Still logged, so not lost; a crash deletes them at the next open.
                log.exception("%s: could not delete delivered events; trying again", self.name)
                await asyncio.sleep(ACK_RETRY_PAUSE)
            finally:
                self.check_replaced()

    async def undelivered(self) -> int:
        """Rows not acknowledged yet: logged acks are deleted first, so none is counted twice or missed."""
        if self.outbox.acks.highest:
            await self._db.call("ack", self.outbox.apply_acks)
        return (await self.stats()).rows

    async def stats(self) -> BufferStats:
        """Counters and depth of this feed's file."""
        try:
            return await self._db.call("stats", self.outbox.stats)
        finally:
            self.check_replaced()

    async def close(self) -> None:
        """Close the reader and the file (the store has committed what was queued, logged acks go now)."""
        if self._applier is not None:
            self._applier.cancel()
            await asyncio.gather(self._applier, return_exceptions=True)
        self._reads.close()
        if self._outbox is not None:
            await self._db.call("close", self._outbox.close)
            self._outbox = None
