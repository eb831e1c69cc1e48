"""The event store: turns readings into sequenced CloudEvents and commits them durably.

All SQLite work happens on one dedicated thread, so the event loop never waits on an fsync.
Readings queue in memory for at most one commit; the writer takes everything queued at once
(group commit), so throughput is not bound by fsyncs while latency stays one commit long.

Each durable uplink reads from a :class:`~agent.store.feed.Feed` of its own (its own file);
a commit goes to every feed. Sequence numbers are the gateway's, not a feed's: the first feed
(the main buffer file) holds the sequence epoch, and on start every device continues after the
highest seq any feed remembers. Routing (topics) is the uplink's business: nothing here knows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from agent.contract.events import TIME_UNKNOWN, Reading, format_time, make_event
from agent.observability.clock import ClockWatch
from agent.store.feed import DbThread, Feed
from agent.store.outbox import BufferFullError, Dropped, Outbox, Record

log = logging.getLogger(__name__)

MAX_COMMIT = 5000  # events per transaction: bounds one commit's latency under a burst
COMMIT_INTERVAL = 0.025  # seconds between group commits under load
SETTLE_TIMEOUT = 1.0  # seconds an uplink waits for queued readings before it births (see settled)
WRITE_FAILURE_PAUSE = 1.0  # seconds after an unexpected write failure
MAX_PENDING_BYTES = 8 * 1024 * 1024  # readings waiting for a commit before new ones are refused
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused readings


class EventStore:
    """Sequencing, envelope and durable commit of events, fanned out to every feed."""

    def __init__(
        self,
        outboxes: dict[str, Callable[[], Outbox]],
        *,
        gateway: str,
        on_dropped: Callable[[str, list[Dropped]], None] | None = None,
        clock: ClockWatch | None = None,
    ) -> None:
        """``outboxes``: per durable uplink, how to open its file; the first holds the sequence epoch.

        ``clock`` stamps events (``recordedtime``, ``time``) and says how good the stamp is
        (``timequality``); the system clock by default.
        """
        if not outboxes:
            raise ValueError("the event store needs at least one feed")
        self.gateway = gateway
        self.db = DbThread()
        first = next(iter(outboxes))
        self.priorities: set[int] = set()  # every class seen, shared with the feeds
        self.feeds = {
            name: Feed(
                name,
                make,
                self.db,
                on_dropped,
                self._take_epoch if name == first else None,
                self.priorities,
                self.settled,
            )
            for name, make in outboxes.items()
        }
        self.main = self.feeds[first]
        self._feeds = list(self.feeds.values())
        self.epoch = ""  # the buffer's sequence epoch, stamped on every event as seqepoch
        self._seqs: dict[str, int] = {}
        self._pending: list[Record] = []
        self._has_pending = asyncio.Event()
        self._pending_bytes = 0
        self._committing = False
        self._round_done: asyncio.Future[None] | None = None  # resolved when the commit under way ends
        self._refusal_logged_at = -REFUSAL_LOG_INTERVAL
        self.clock = clock or ClockWatch()
        self._wall = self.clock.wall
        self._now_millis = -1
        self._now_text = ""
        self._now_quality = TIME_UNKNOWN

    @property
    def not_accepted(self) -> int:
        """Readings the main feed never got (overload, disk full)."""
        return self.main.not_accepted

    def _take_epoch(self, outbox: Outbox) -> None:
        """The main file was replaced: its new epoch stamps every event from now on."""
        self.epoch = outbox.epoch

    async def open(self) -> None:
        """Open every feed's file and continue each device after its highest known seq."""
        for feed in self._feeds:
            await feed.open()
            for device, seq in (await self.db.call("open", feed.outbox.last_seqs)).items():
                if seq > self._seqs.get(device, 0):
                    self._seqs[device] = seq
        self.epoch = self.main.outbox.epoch

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
        now = self._wall()
        millis = int(now * 1000)
        if millis != self._now_millis:  # thousands of events share a millisecond: format it once
            self._now_millis = millis
            self._now_text = format_time(datetime.fromtimestamp(millis / 1000, UTC))
            # A step of the clock always changes the millisecond, so it is seen here.
            self._now_quality = self.clock.quality(now)
        try:
            payload = make_event(
                gateway=self.gateway,
                device=device,
                seq=seq,
                reading=reading,
                now=self._now_text,
                epoch=self.epoch,
                timequality=self._now_quality,
            )
        except (TypeError, ValueError) as exc:
            # A driver bug must not take the device down, nor leave a gap in seq.
            self._refuse(device, f"{reading.type} data is not JSON: {exc}")
            return
        self._seqs[device] = seq
        # Positional: this runs once per event. No topic: routing is each uplink's business.
        self._pending.append(Record(device, reading.type, priority, seq, "", payload, now))
        self._pending_bytes += len(payload)
        self.priorities.add(priority)
        self._has_pending.set()

    def _refuse(self, device: str, why: str, count: int = 1, feeds: list[Feed] | None = None) -> None:
        """Count readings that never reached a feed; log the first and then every 10 s."""
        feeds = feeds or self._feeds
        for feed in feeds:
            feed.not_accepted += count
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            total = feeds[0].not_accepted
            log.error("%d reading(s) (%s...) not stored: %s (%d in all)", count, device, why, total)
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
        self._committing = True
        try:
            await self._commit_round()
        finally:
            self._committing = False
            done, self._round_done = self._round_done, None
            if done is not None and not done.done():
                done.set_result(None)

    async def _commit_round(self) -> None:
        batch = self._pending[:MAX_COMMIT]
        del self._pending[:MAX_COMMIT]
        self._pending_bytes -= sum(len(r.payload) for r in batch)
        if not self._pending:
            self._has_pending.clear()
        failed = False
        for feed in self._feeds:
            label = f"{feed.name}: " if len(self._feeds) > 1 else ""  # one file: its name says nothing
            try:
                result = await feed.append(batch)
            except BufferFullError as exc:
                self._refuse(batch[0].device, f"{label}{exc}", len(batch), [feed])
            except Exception as exc:
                # The disk or file failed in a way the buffer could not absorb: count the loss,
                # keep the writer alive, and do not spin on a failing disk.
                why = f"{label}buffer write failed: {type(exc).__name__}: {exc}"
                self._refuse(batch[0].device, why, len(batch), [feed])
                failed = True
            else:
                if result.refused:
                    why = f"{label}the disk is full (lower classes refused first)"
                    self._refuse(batch[-1].device, why, result.refused, [feed])
            feed.committed.set()
        if failed:
            await asyncio.sleep(WRITE_FAILURE_PAUSE)

    async def settled(self, timeout: float = SETTLE_TIMEOUT) -> bool:
        """Wait until no reading is queued or being committed, so a feed's next read sees every
        reading submitted so far; False if that took longer than ``timeout`` (a stalled disk, or
        readings arriving faster than commits end).

        Returns with no suspension after its last check: a caller that reads its feed from memory
        and publishes before its next ``await`` misses no reading submitted before it published.
        """
        deadline = time.monotonic() + timeout
        while self._pending or self._committing:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._round_done is None:
                self._round_done = asyncio.get_running_loop().create_future()
            await asyncio.wait([asyncio.shield(self._round_done)], timeout=left)
        return True

    async def flush(self) -> None:
        """Commit everything queued so far (used at shutdown)."""
        while self._pending:
            await self._commit_some()

    async def close(self) -> None:
        """Commit what is queued, then close every file."""
        started = time.monotonic()
        await self.flush()
        for feed in self._feeds:
            await feed.close()
        self.db.shutdown()
        log.debug("event store closed in %.3fs", time.monotonic() - started)
