"""Durable store-and-forward outbox on SQLite.

Every event is committed here before it is published and deleted only after the
broker's PUBACK, so a crash or power cut never loses an event the agent accepted.
The counters live in the same transactions as the rows they count, so
``accepted == delivered + rows + dropped_capacity + dropped_disk_full + dropped_media_quota`` holds
exactly, even across ``kill -9``.

All methods must be called from one thread (the agent's buffer thread); the
connection is opened with ``check_same_thread=False`` only so that thread need
not be the one that constructed the object.

:class:`Outbox` is the facade; its collaborators each do one job: ``records`` (the value
types and errors), ``schema`` (the file's layout, opening and checking it, reads),
``accounting`` (the counters and their in-memory mirror), ``writes`` (the hot path's two
transactions: commit a batch, delete on ack), ``evict`` (dropping the oldest rows of the
lowest class), ``disk`` (room on the volume, a full disk) and ``repair`` (replacing a
damaged file). Everything other modules import from here is re-exported.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, Self, TypeVar

from agent.store.accounting import EVICTED_MEMORY, Accounting
from agent.store.acklog import AckLog
from agent.store.disk import BALLAST_EXTRA, DISK_FULL_MIN_EVICT, DISK_RESERVE, EVICT_STEP_MIN, WAL_LIMIT, DiskRoom
from agent.store.records import (
    COUNTERS,
    DROP_REASONS,
    ROW_OVERHEAD,
    AppendResult,
    BufferFullError,
    BufferPathError,
    BufferSchemaError,
    BufferStats,
    Dropped,
    Record,
    Stored,
    is_corruption,
    is_readonly,
    row_size,
)
from agent.store.repair import Repair
from agent.store.salvage import buffer_path_problem
from agent.store.schema import (
    SCHEMA_VERSION,
    SYNC_MODES,
    OutboxReader,
    new_epoch,
    next_id,
    open_checked,
    peek,
    prepare_file,
)
from agent.store.writes import delete_acked, insert_batch

__all__ = [
    "BALLAST_EXTRA",
    "COUNTERS",
    "DISK_FULL_MIN_EVICT",
    "DISK_RESERVE",
    "DROP_REASONS",
    "EVICTED_MEMORY",
    "EVICT_STEP_MIN",
    "ROW_OVERHEAD",
    "SCHEMA_VERSION",
    "WAL_LIMIT",
    "AppendResult",
    "BufferFullError",
    "BufferPathError",
    "BufferSchemaError",
    "BufferStats",
    "Dropped",
    "Outbox",
    "OutboxReader",
    "Record",
    "Stored",
    "is_corruption",
    "new_epoch",
    "row_size",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Outbox:
    """The durable outbox: append, peek by priority, ack after PUBACK.

    Args:
        path: The SQLite file; parent directories are created (mode 0700), the file is 0600.
        max_bytes: Bound on the logical size of buffered rows; beyond it the
            oldest rows of the lowest priority are evicted.
        synchronous: SQLite ``synchronous`` mode; "FULL" makes every append
            survive power loss.
        media_max_bytes: Bound on the logical size of class media rows (snapshots), within
            ``max_bytes``; beyond it the oldest of them are evicted as "media_quota" drops.
        max_page_count: For tests only: caps the file's pages so SQLite raises a
            genuine SQLITE_FULL, standing in for a full disk.

    Raises:
        BufferSchemaError: The file was written by a newer schema version.
        BufferPathError: ``path`` is a directory, someone else's file, or cannot be written.
        ValueError: ``max_bytes`` or ``synchronous`` is invalid.

    A corrupt file never raises, at start or later on any operation: it is quarantined
    beside the original as ``<name>.corrupt-<UTC stamp>``, whatever is readable is salvaged
    into a fresh file, events that could not be salvaged are counted as ``dropped_corrupt``
    (and listed in :attr:`recovered_drops`), and :attr:`quarantined` names the quarantined copy.

    :attr:`epoch` is the sequence epoch: it changes whenever the file can no longer vouch
    for the seq numbers it handed out (a new or replaced file, a damaged one whose sequences
    were lost, a write-ahead log that vanished after a crash), so that a consumer keying on
    ``(device, seqepoch, seq)`` never mistakes a new event for a duplicate.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        synchronous: str = "FULL",
        media_max_bytes: int | None = None,
        max_page_count: int | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if synchronous.upper() not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {sorted(SYNC_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.media_max_bytes = media_max_bytes
        self.quarantined: Path | None = None
        self.generation = 0  # +1 each time the file is replaced; readers reopen on a change
        self.epoch = ""
        self.recovered_drops: list[Dropped] = []  # losses of the last replacement, for the health report
        # Set by the event store: committed events it holds in memory and has not handed out yet,
        # restored into the fresh file if the damaged one lost them. Called on the buffer's thread.
        self.hints: Callable[[], list[Stored]] | None = None
        self._synchronous = synchronous.upper()
        self._max_page_count = max_page_count
        self._rows_per_insert = 1
        self._broken = False
        # The collaborators share the accounting: each counts what its writes change.
        self._acct = Accounting()
        self._disk = DiskRoom(self.path, self._acct)
        self._repair = Repair(self.path, self._acct)
        self._acks = AckLog(self.path)
        problem = buffer_path_problem(self.path)
        if problem:
            raise BufferPathError(problem)
        prepare_file(self.path)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                if is_readonly(exc):
                    raise self._path_error(exc) from exc
                raise
            self._replace_corrupt(exc, running=False)
        else:
            self._acct.load(self._conn)
        self._guarded(self._start_acks, replay=True)
        self._disk.make_ballast()

    @property
    def taken(self) -> dict[int, int]:
        """Set by the consumer: per class, the highest id it has taken this session.

        Rows at or below it may be in flight, so evicting them is remembered (see :meth:`ack`).
        """
        return self._acct.taken

    @taken.setter
    def taken(self, cursors: dict[int, int]) -> None:
        self._acct.taken = cursors

    # --- public API -------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> AppendResult:
        """Commit ``records`` in one transaction, evicting to stay within ``max_bytes``.

        Evicted rows (possibly from this very batch) are the oldest of the lowest
        priority present; higher priorities go only when no lower one is left.

        Raises:
            BufferFullError: The disk is full even after evicting old rows.
        """
        if not records:
            return AppendResult(0, [])
        return self._guarded(self._append, records)

    def peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        """Return up to ``limit`` rows of exactly ``priority`` with id > ``after_id``, by id."""
        return self._guarded(self._peek, priority, after_id, limit)

    def next_id(self) -> int:
        """The id the next appended record will get (ids are never reused)."""
        return self._guarded(self._next_id)

    def priorities(self) -> list[int]:
        """Return the priorities present, highest first."""
        return self._guarded(self._priorities)

    def ack(self, ids: Sequence[int]) -> int:
        """Delete delivered rows; return how many were counted as delivered.

        The delete is committed without an fsync: a process crash keeps it (it is in the
        WAL, in the page cache), a power cut may undo it, which only resends those events.
        An id no longer buffered because it was evicted (or lost with a damaged file) while
        in flight was delivered after all: it moves from its drop counter to ``delivered``.
        """
        if not ids:
            return 0
        return self._guarded(self._ack, ids)

    def ack_later(self, ids: Sequence[int]) -> None:
        """Log delivered rows for :meth:`apply_acks` (any thread); OSError if it cannot: :meth:`ack` then."""
        self._acks.record(ids)

    @property
    def acks(self) -> AckLog:
        """The ids :meth:`ack_later` logged and :meth:`apply_acks` did not delete yet (``highest``, ``len``)."""
        return self._acks

    def apply_acks(self) -> int:
        """Delete the rows :meth:`ack_later` logged; return how many were counted as delivered."""
        return self._guarded(self._apply_acks)

    def last_seqs(self) -> dict[str, int]:
        """Return the last committed seq per device; it survives delivery of the rows."""
        return self._guarded(self._last_seqs)

    def stats(self) -> BufferStats:
        """Return a snapshot of sizes and counters."""
        return self._guarded(self._stats)

    def recover(self, exc: sqlite3.DatabaseError, generation: int) -> None:
        """Replace the file after another connection (a reader) found it corrupt.

        ``generation`` is the one the finder read; if the file was replaced since, nothing
        is done. The same path as corruption found on this connection.
        """
        if generation == self.generation and is_corruption(exc):
            with suppress(sqlite3.Error):
                self._conn.close()
            self._replace_corrupt(exc, running=True)

    def close(self) -> None:
        """Apply logged acks, mark a clean stop and close; further calls raise ``sqlite3.ProgrammingError``."""
        with suppress(sqlite3.Error, OSError):
            self._apply_acks()
        with suppress(sqlite3.Error):
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('running', '0')")
        self._acks.close()
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- operations -------------------------------------------------------------------------

    def _append(self, records: Sequence[Record]) -> AppendResult:
        return self._disk.append(self._conn, records, self._append_once)

    def _append_once(self, records: Sequence[Record]) -> AppendResult:
        return insert_batch(
            self._conn,
            self._acct,
            records,
            rows_per_insert=self._rows_per_insert,
            max_bytes=self.max_bytes,
            media_max_bytes=self.media_max_bytes,
        )

    def _peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        return peek(self._conn, priority, after_id, limit)

    def _next_id(self) -> int:
        return next_id(self._conn)

    def _priorities(self) -> list[int]:
        # Skip-scan down the (priority, id) index: one seek per class, not a full scan.
        found: list[int] = []
        row = self._conn.execute("SELECT max(priority) FROM outbox").fetchone()
        while row[0] is not None:
            found.append(row[0])
            row = self._conn.execute("SELECT max(priority) FROM outbox WHERE priority < ?", (row[0],)).fetchone()
        return found

    def _ack(self, ids: Sequence[int]) -> int:
        return delete_acked(self._conn, self._acct, ids, self._synchronous)

    def _apply_acks(self) -> int:
        return self._acks.apply(self._conn, self._acct, self._synchronous)

    def _start_acks(self, *, replay: bool) -> None:
        self._acks.start(self._conn, self._acct, self._synchronous, replay=replay)

    def _last_seqs(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT device, seq FROM sequences"))

    def _stats(self) -> BufferStats:
        self._apply_acks()  # the counters then say what is still to deliver
        return self._acct.stats(self._conn, self.max_bytes, self.epoch)

    # --- plumbing ---------------------------------------------------------------------------

    def _guarded(self, op: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``op``; on corruption, quarantine and salvage, then run it once more.

        Every operation goes through here, so corruption found on any path (append, peek,
        ack, eviction, checkpoint, stats) is handled in this one place. ``op`` reads the
        connection from ``self`` (never an argument), so the retry uses the fresh file.
        """
        if self._broken:
            self._reopen()
        try:
            return op(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            with suppress(sqlite3.Error):
                self._conn.close()
            self._replace_corrupt(exc, running=True)
        return op(*args, **kwargs)

    def _open(self) -> sqlite3.Connection:
        opened = open_checked(self.path, self._synchronous, self._max_page_count)
        self._rows_per_insert = opened.rows_per_insert
        self._disk.sized(opened.page_size, opened.wal)
        self.epoch = opened.epoch
        return opened.conn

    def _reopen(self) -> None:
        """After a replacement that could not open its fresh file (say, the disk was full)."""
        self._conn = self._open()
        self._broken = False
        self._acct.load(self._conn)
        self._start_acks(replay=False)
        self.generation += 1

    def _replace_corrupt(self, exc: sqlite3.DatabaseError, *, running: bool) -> None:
        """Quarantine the unreadable file, start a fresh one, salvage into it and count the rest.

        ``running``: found while the agent ran, so the in-memory mirrors (counters, rows per
        device, committed seqs) say exactly what the file held at its last commit, and the
        store's hints hold committed events it has not handed out yet.
        """
        before = self._acct.snapshot(self.epoch) if running else None
        kept = self.hints() if running and self.hints is not None else []
        self.quarantined = target = self._repair.quarantine(exc)
        self._acct.discard()
        try:
            self._conn = self._open()
        except sqlite3.Error:
            self._broken = True  # e.g. the disk is full: the next operation tries again
            self.generation += 1
            raise
        self._broken = False
        restored = self._repair.restore(self._conn, target, kept, before, epoch=self.epoch, max_bytes=self.max_bytes)
        self.epoch, self.recovered_drops = restored.epoch, restored.drops
        self._acct.load(self._conn)
        if running:  # at start, __init__ begins the log once the file is open
            self._start_acks(replay=False)
        # Last: other threads look at the epoch and the drops once they see a new generation.
        self.generation += 1
        self._repair.report(restored, target)

    def _path_error(self, exc: sqlite3.Error) -> BufferPathError:
        return BufferPathError(
            f"buffer {self.path} cannot be written ({exc}): make the file and its directory writable"
            " by the agent's user, check the volume is not mounted read-only and the file is not"
            " immutable (lsattr; chattr -i), or point buffer.path elsewhere"
        )
