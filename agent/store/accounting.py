"""The outbox's accounting, mirrored in memory: counters, rows per device, seqs, in-flight losses.

The counters live in the file and change in the same transactions as the rows they count, so
``accepted == delivered + rows + dropped_*`` holds exactly, even across ``kill -9``. The mirror
here follows what the file holds at its last commit: when a damaged file must be replaced, it
says what was lost (agent/store/repair.py). It also remembers rows evicted or lost while a
consumer held them in flight, so that their late PUBACK moves them to ``delivered``.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Final

from agent.store.records import COUNTERS, DROP_REASONS, BufferStats, Dropped
from agent.store.schema import next_id

EVICTED_MEMORY: Final = 200_000
"""Ids of evicted rows a consumer had already taken, remembered so a late PUBACK counts as delivered."""


@dataclass(frozen=True, slots=True)
class Before:
    """What the in-memory mirrors said of a file just before it was found corrupt."""

    counts: dict[str, int]
    rows_by_device: Counter[str]
    seqs: dict[str, int]
    high_id: int
    epoch: str


class Accounting:
    """The in-memory mirror of one outbox's counters, owned and used on the outbox's thread.

    Changes made inside :meth:`transaction` (:meth:`bump`, ``pending_rows``) reach the mirror
    only when it commits; ``total``, ``high_id`` and ``committed_seqs`` are set by the caller
    after its commit, for the same reason.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.rows_by_device: Counter[str] = Counter()
        self.pending_counts: Counter[str] = Counter()
        self.pending_rows: Counter[str] = Counter()
        self.committed_seqs: dict[str, int] = {}
        self.high_id = 0
        self.total = 0  # logical bytes buffered (see row_size)
        # Set by the consumer (through Outbox.taken): per class, the highest id it has taken this
        # session. Rows at or below it may be in flight, so evicting them is remembered.
        self.taken: dict[int, int] = {}
        self.evicted_inflight: dict[int, str] = {}
        self.unexplained: dict[int, None] = {}  # acknowledged ids a lookup did not find
        self.corrupt_credit = (0, 0)  # (ids below, how many): absent ids that were lost, maybe delivered

    def load(self, conn: sqlite3.Connection) -> None:
        """Read counters, rows per device, sizes and seqs into memory (at open)."""
        self.counts = dict.fromkeys(COUNTERS, 0) | dict(conn.execute("SELECT name, value FROM counters"))
        self.rows_by_device = Counter()
        self.total = 0
        for device, rows, size in conn.execute("SELECT device, count(*), sum(size) FROM outbox GROUP BY device"):
            self.rows_by_device[device] = rows
            self.total += size
        self.committed_seqs = dict(conn.execute("SELECT device, seq FROM sequences"))
        self.high_id = next_id(conn) - 1

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A write transaction whose counter changes reach the mirror only if it commits."""
        # IMMEDIATE takes the write lock up front, so a reader elsewhere cannot make us fail midway.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self.discard()
            # SQLite may already have rolled back (it does on some SQLITE_FULL paths).
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        # Only after COMMIT: the in-memory mirrors follow what the file holds, so after a
        # damaged file is replaced they still say what it held at its last commit.
        for name, by in self.pending_counts.items():
            self.counts[name] += by
        self.rows_by_device.update(self.pending_rows)
        self.pending_counts.clear()
        self.pending_rows.clear()

    def discard(self) -> None:
        """Forget the changes of a transaction that did not commit."""
        self.pending_counts.clear()
        self.pending_rows.clear()

    def bump(self, conn: sqlite3.Connection, counter: str, by: int) -> None:
        """Add ``by`` to ``counter`` in the file, inside the caller's transaction."""
        conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, counter))
        self.pending_counts[counter] += by

    def count_dropped(
        self, conn: sqlite3.Connection, groups: dict[tuple[str, str, int], int], reason: str
    ) -> list[Dropped]:
        """Count evicted rows, by (device, type, priority), as dropped for ``reason``."""
        count = sum(groups.values())
        if count:
            self.bump(conn, f"dropped_{reason}", count)
        for (device, _, _), n in groups.items():
            self.pending_rows[device] -= n
        return [Dropped(d, t, p, n, reason) for (d, t, p), n in groups.items()]

    def remember_inflight(self, conn: sqlite3.Connection, priority: int, upto: int, reason: str) -> None:
        """Remember evicted rows a consumer has taken: their PUBACK may still come."""
        packed = conn.execute(
            "SELECT group_concat(id, ',') FROM outbox WHERE priority = ? AND id <= ?", (priority, upto)
        ).fetchone()[0]
        if packed:
            memory = self.evicted_inflight
            memory.update(dict.fromkeys(map(int, packed.split(",")), reason))
            while len(memory) > EVICTED_MEMORY:  # the oldest are long past any PUBACK
                del memory[next(iter(memory))]

    def credit_absent(self, conn: sqlite3.Connection, absent: set[int]) -> int:
        """Acknowledged ids no longer buffered that were evicted or lost while in flight.

        The broker has them, so they move from their drop counter to delivered (the caller
        counts them); returns how many. Any other absent id was delivered before.
        """
        below, uncredited = self.corrupt_credit
        credited = 0
        for row_id in sorted(absent):
            reason = self.evicted_inflight.pop(row_id, None)
            if reason is None and row_id < below and uncredited > 0:
                reason, uncredited = "corrupt", uncredited - 1
            if reason is not None:
                self.bump(conn, f"dropped_{reason}", -1)
                credited += 1
            else:
                # Not found, nothing explains it: a damaged page can hide a row from a lookup
                # without an error. Remembered, so a later replacement counts it as delivered.
                self.unexplained[row_id] = None
                if len(self.unexplained) > EVICTED_MEMORY:
                    del self.unexplained[next(iter(self.unexplained))]
        self.corrupt_credit = (below, uncredited)
        return credited

    def snapshot(self, epoch: str) -> Before:
        """What the mirror says of the file at its last commit, before it is replaced."""
        return Before(dict(self.counts), Counter(self.rows_by_device), dict(self.committed_seqs), self.high_id, epoch)

    def held(self) -> int:
        """Events the counters say are buffered."""
        counts = self.counts
        return counts["accepted"] - counts["delivered"] - sum(counts[f"dropped_{r}"] for r in DROP_REASONS)

    def stats(self, conn: sqlite3.Connection, max_bytes: int, epoch: str) -> BufferStats:
        """A snapshot of sizes (read from the file) and counters (from the mirror)."""
        # GROUP BY priority is answered from the small covering index, not the payload pages.
        by_priority = dict(
            conn.execute("SELECT priority, count(*) FROM outbox GROUP BY priority ORDER BY priority DESC")
        )
        # Rows arrive in id order, so the lowest id is the oldest without scanning `created`.
        oldest = conn.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        counters = self.counts
        return BufferStats(
            rows=sum(by_priority.values()),
            bytes=self.total,
            max_bytes=max_bytes,
            rows_by_priority=by_priority,
            oldest_created=None if oldest is None else oldest[0],
            accepted=counters["accepted"],
            delivered=counters["delivered"],
            dropped_capacity=counters["dropped_capacity"],
            dropped_disk_full=counters["dropped_disk_full"],
            dropped_media_quota=counters["dropped_media_quota"],
            dropped_corrupt=counters["dropped_corrupt"],
            epoch=epoch,
        )
