"""Durable store-and-forward outbox on SQLite.

Every event is committed here before it is published and deleted only after the
broker's PUBACK, so a crash or power cut never loses an event the agent accepted.
The counters live in the same transactions as the rows they count, so
``accepted == delivered + rows + dropped_capacity + dropped_disk_full + dropped_media_quota`` holds
exactly, even across ``kill -9``.

All methods must be called from one thread (the agent's buffer thread); the
connection is opened with ``check_same_thread=False`` only so that thread need
not be the one that constructed the object.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, ParamSpec, Self, TypeVar

from agent.contract.events import Priority
from agent.errors import BufferError_
from agent.store.salvage import MAGIC, Salvaged, buffer_path_problem, header, looks_like_damaged_outbox, salvage
from agent.store.salvage import seq_ranges as _seq_ranges

log = logging.getLogger("agent.store.outbox")

SCHEMA_VERSION: Final = 2  # 2: meta (sequence epoch, running flag), counter dropped_corrupt
ROW_OVERHEAD: Final = 64
"""Bytes added to each row's logical size for keys, indexes and page slack."""
DISK_FULL_MIN_EVICT: Final = 1024 * 1024
"""Least logical bytes evicted when the disk is full, so we do not hit it again at once."""
DISK_RESERVE: Final = 8 * 1024 * 1024  # free space the buffer leaves on its volume (for WAL, sqlite temp)
WAL_LIMIT: Final = 2 * 1024 * 1024  # most WAL bytes between checkpoints (less on small volumes)
BALLAST_EXTRA: Final = 256 * 1024  # reserve file size beyond the WAL's (see Outbox._make_ballast)
EVICT_STEP_MIN: Final = 64 * 1024
"""Least logical bytes one eviction transaction deletes on a nearly full disk (see _evict_for_disk)."""

_CHUNK: Final = 500  # stays far below SQLite's limit on bound parameters
_SYNC_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_CORRUPTION_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_READONLY_CODES: Final = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN})
EVICTED_MEMORY: Final = 200_000
"""Ids of evicted rows a consumer had already taken, remembered so a late PUBACK counts as delivered."""
DROP_REASONS: Final = ("capacity", "disk_full", "media_quota", "corrupt")
COUNTERS: Final = ("accepted", "delivered", *(f"dropped_{r}" for r in DROP_REASONS))

_SCHEMA: Final = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    priority INTEGER NOT NULL,
    device TEXT NOT NULL,
    type TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    crc INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_priority_id ON outbox (priority, id);
CREATE TABLE IF NOT EXISTS sequences (device TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES
    ('accepted', 0), ('delivered', 0), ('dropped_capacity', 0), ('dropped_disk_full', 0),
    ('dropped_media_quota', 0), ('dropped_corrupt', 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
COMMIT;
"""
# Why statements that step few times: Python's sqlite3 releases the GIL around every step
# (every row inserted by executemany, every row fetched) and must win it back afterwards.
# Beside a busy event loop each win waits up to the interpreter's switch interval (5 ms):
# measured here, 2,000 rows by executemany took 23 ms alone and 9.6 s beside a busy thread;
# as multi-row INSERTs, 15 ms and 79 ms. So rows go in as multi-row INSERTs and come out
# packed by group_concat into one result row.
_INSERT_ROWS: Final = "INSERT INTO outbox (priority, device, type, seq, topic, payload, size, created, crc) VALUES "
_ROW_MARKS: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ROW_VALUES: Final = 9
# A stored seq is never lowered: a late or replayed batch must not rewind a device.
_UPSERT_SEQS: Final = (
    "INSERT INTO sequences (device, seq) VALUES {} ON CONFLICT (device) DO UPDATE SET seq = max(seq, excluded.seq)"
)
# Record separator: compact JSON escapes control characters, ids and topics cannot hold one.
_SEP: Final = "\x1e"
_PEEK_PACKED: Final = (
    "SELECT group_concat(id, ','), group_concat(seq, ','), group_concat(created, ','),"
    " group_concat(device, char(30)), group_concat(type, char(30)), group_concat(topic, char(30)),"
    " group_concat(CAST(payload AS TEXT), char(30)), group_concat(crc, ',')"
    " FROM (SELECT * FROM outbox WHERE priority = ? AND id > ? ORDER BY id LIMIT ?)"
)
# Ids, priorities and sizes of the oldest-lowest-class prefix of a given length.
_EVICT_PREFIX: Final = (
    "SELECT group_concat(id, ','), group_concat(priority, ','), group_concat(size, ',')"
    " FROM (SELECT id, priority, size FROM outbox ORDER BY priority, id LIMIT ?)"
)
_EVICT_ROUND: Final = 100_000  # rows sized per eviction round, bounding its memory

_P = ParamSpec("_P")
_T = TypeVar("_T")


class BufferFullError(BufferError_):
    """The disk holding the buffer is full even after evicting old events."""


class BufferSchemaError(BufferError_):
    """The buffer file was written by a newer agent; it is left untouched."""


class BufferPathError(BufferError_):
    """``buffer.path`` cannot hold the buffer (a directory, someone else's file, read-only)."""


class _CheckFailed(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` reported problems without raising."""


# Record and Stored are made once per event: not frozen, because a frozen dataclass's __init__
# costs four times as much (2.3 vs 0.5 us here). Treat them as immutable all the same.
@dataclass(slots=True)
class Record:
    """An event to append."""

    device: str
    type: str
    priority: int
    seq: int
    topic: str
    payload: bytes
    created: float


@dataclass(slots=True)
class Stored:
    """A buffered event as returned by :meth:`Outbox.peek`; ``id`` is what to ack."""

    id: int
    priority: int
    device: str
    type: str
    seq: int
    topic: str
    payload: bytes
    created: float


@dataclass(frozen=True, slots=True)
class Dropped:
    """Events of one (device, type, priority) lost for ``reason`` (one of :data:`DROP_REASONS`).

    Evictions ("capacity", "disk_full", "media_quota") name the type; events lost with a damaged
    buffer file ("corrupt") are known per device only: their ``type`` is "" and ``seqs`` names
    the seq ranges they covered, as far as the buffer could tell.
    """

    device: str
    type: str
    priority: int
    count: int
    reason: str
    seqs: str = ""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """How many records an append committed, their ids, and what it had to evict to do so.

    The accepted records got the consecutive ids ``first_id .. first_id + accepted - 1``: in
    order when ``refused`` is 0. On a full disk the batch goes in class by class, highest first,
    and ``refused`` records of the lowest classes may not fit (they are not stored).
    """

    accepted: int
    dropped: list[Dropped]
    first_id: int = 0
    refused: int = 0


@dataclass(frozen=True, slots=True)
class BufferStats:
    """A snapshot of the buffer.

    ``bytes`` and ``max_bytes`` are logical sizes (see :func:`row_size`);
    ``oldest_created`` is the ``created`` of the earliest accepted row still buffered.
    """

    rows: int
    bytes: int
    max_bytes: int
    rows_by_priority: dict[int, int]
    oldest_created: float | None
    accepted: int
    delivered: int
    dropped_capacity: int
    dropped_disk_full: int
    dropped_media_quota: int = 0
    dropped_corrupt: int = 0
    epoch: str = ""

    @property
    def dropped(self) -> int:
        """Every counted loss, whatever the reason."""
        return self.dropped_capacity + self.dropped_disk_full + self.dropped_media_quota + self.dropped_corrupt


def row_size(device: str, type_: str, topic: str, payload: bytes) -> int:
    """Return the logical size a row counts against ``max_bytes``."""
    return len(payload) + len(topic) + len(device) + len(type_) + ROW_OVERHEAD


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite reported the file damaged (corrupt, not a database, failed check)."""
    if isinstance(exc, _CheckFailed):
        return True
    # Extended codes carry the primary code in the low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPTION_CODES


def _reserve(volume: int) -> int:
    """Free bytes the buffer leaves on a volume of ``volume`` bytes (less on tiny volumes)."""
    return min(DISK_RESERVE, volume // 8)


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


def _foreign_header(path: Path) -> bool:
    # An empty file is a valid empty database to SQLite.
    return header(path) not in (b"", MAGIC)


def _is_readonly(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _READONLY_CODES


def new_epoch() -> str:
    """A fresh sequence epoch: 16 random hex digits, unique without coordination."""
    return secrets.token_hex(8)


def _peek(conn: sqlite3.Connection, priority: int, after_id: int, limit: int) -> list[Stored]:
    row = conn.execute(_PEEK_PACKED, (priority, after_id, limit)).fetchone()
    if not row or row[0] is None:
        return []
    ids, seqs, createds, devices, types, topics, payloads, crcs = row
    try:
        stored = [
            Stored(int(i), priority, d, t, int(q), tp, p.encode(), float(c))
            for i, q, c, d, t, tp, p in zip(
                ids.split(","),
                seqs.split(","),
                createds.split(","),
                devices.split(_SEP),
                types.split(_SEP),
                topics.split(_SEP),
                payloads.split(_SEP),
                strict=True,
            )
        ]
        # A page cut short can still parse: only a payload matching its CRC-32 is published.
        intact = all(zlib.crc32(s.payload) == int(c) for s, c in zip(stored, crcs.split(","), strict=True))
    except (ValueError, AttributeError) as exc:
        # Columns of the wrong type or garbled text: a damaged page SQLite did not notice.
        raise _CheckFailed(f"unreadable rows ({exc})") from exc
    if not intact:
        raise _CheckFailed("an event's payload does not match its CRC-32")
    stored.sort(key=lambda r: r.id)  # group_concat's order is not promised; the alignment is
    return stored


class OutboxReader:
    """A read-only connection to the outbox for :meth:`peek`, used from its own thread.

    WAL lets it read while the writer commits, so draining a backlog never waits behind a
    large commit (with one connection, delivery fell to a window per commit under load).
    It sees committed rows only. Reopen it when :attr:`Outbox.generation` changes.
    """

    def __init__(self, path: Path) -> None:
        """Open ``path`` read-only; the writer must have created it."""
        self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)

    def peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        """Rows of that priority after ``after_id``, oldest first, at most ``limit``."""
        return _peek(self._conn, priority, after_id, limit)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def _chunk_sizes(n: int, most: int) -> list[int]:
    """Split ``n`` rows into chunks whose sizes are powers of two (at most ``most``).

    Statements are cached per SQL text, and a statement with hundreds of placeholders is
    large: with arbitrary chunk sizes the cache held over a hundred of them (RSS grew by
    tens of MB); powers of two keep a dozen.
    """
    top = 1 << (max(1, most).bit_length() - 1)
    sizes = []
    while n > 0:
        size = min(top, 1 << (n.bit_length() - 1))
        sizes.append(size)
        n -= size
    return sizes


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


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
        if synchronous.upper() not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {sorted(_SYNC_MODES)}, got {synchronous!r}")
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
        # Set by the consumer: per class, the highest id it has taken this session. Rows at or
        # below it may be in flight, so evicting them is remembered (see _evicted_inflight).
        self.taken: dict[int, int] = {}
        self._synchronous = synchronous.upper()
        self._max_page_count = max_page_count
        self._counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._rows_by_device: Counter[str] = Counter()
        self._pending_counts: Counter[str] = Counter()
        self._pending_rows: Counter[str] = Counter()
        self._evicted_inflight: dict[int, str] = {}
        self._unexplained: dict[int, None] = {}  # acknowledged ids a lookup did not find
        self._corrupt_credit = (0, 0)  # (ids below, how many): absent ids that were lost, maybe delivered
        self._committed_seqs: dict[str, int] = {}
        self._high_id = 0
        self._total = 0
        self._broken = False
        self._ballast_path = Path(f"{self.path}.reserve")
        self._ballast_size = BALLAST_EXTRA
        self._ballast = False
        problem = buffer_path_problem(self.path)
        if problem:
            raise BufferPathError(problem)
        self._prepare_file()
        try:
            self._conn = self._open_checked()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                if _is_readonly(exc):
                    raise self._path_error(exc) from exc
                raise
            self._replace_corrupt(exc, running=False)
        else:
            self._load_mirror()
        self._make_ballast()

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
        """Mark a clean stop and close; further calls raise ``sqlite3.ProgrammingError``."""
        with suppress(sqlite3.Error):
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('running', '0')")
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
        batch_bytes = sum(row_size(r.device, r.type, r.topic, r.payload) for r in records)
        # Make room before the disk is full: in WAL mode even a DELETE needs free space (for
        # its WAL frames), so waiting for SQLITE_FULL can leave nothing able to free room.
        early: list[Dropped] = []
        free, volume = self._disk_space()
        if not self._ballast and free > 4 * self._ballast_size:
            self._make_ballast()  # the disk has room again: take the reserve back
        # Pages freed by deletes stay in the file for reuse: they are room too.
        free += self._conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
        short = _reserve(volume) + 2 * batch_bytes - free
        if short > 0 and self._total > 0:
            try:
                # At most about the batch's own size again: enough that the file stops growing
                # into the reserve, never a purge. When another program took the reserve,
                # evicting cannot win its room back, and must not empty the buffer trying.
                early = self._evict_for_disk(min(short, batch_bytes) + batch_bytes)
            except sqlite3.OperationalError as exc:
                if not _is_disk_full(exc):
                    raise
                # Not even a small step fits: the append below meets the full disk and says so.
        try:
            result = self._append_once(records)
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            result = self._append_on_full_disk(records, exc)
        return AppendResult(result.accepted, early + result.dropped, result.first_id, result.refused)

    def _append_on_full_disk(self, records: Sequence[Record], exc: sqlite3.OperationalError) -> AppendResult:
        """Something else filled the disk: take the batch class by class, highest first.

        Each class makes its own room by evicting the oldest lowest-class rows (counted as
        ``disk_full``), so an alarm is never refused while telemetry rows could be evicted;
        a class that finds nothing left to evict is refused, and so are the classes below it.
        Pieces are halved until their WAL frames fit in the room eviction made.
        """
        dropped: list[Dropped] = []
        accepted = refused = first_id = 0
        for priority in sorted({r.priority for r in records}, reverse=True):
            group = [r for r in records if r.priority == priority]
            if refused:
                refused += len(group)
                continue
            try:
                piece = self._append_piecewise(group)
            except BufferFullError:
                refused += len(group)
                continue
            first_id = first_id or piece.first_id
            accepted += piece.accepted
            dropped += piece.dropped
        if not accepted:
            raise self._full_error() from exc
        return AppendResult(accepted, dropped, first_id, refused)

    def _append_piecewise(self, group: Sequence[Record]) -> AppendResult:
        need = sum(row_size(r.device, r.type, r.topic, r.payload) for r in group)
        with self._disk_full_is_fatal():
            dropped = self._evict_for_disk(max(2 * need, DISK_FULL_MIN_EVICT))
        try:
            result = self._append_once(group)
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            if len(group) == 1 or not dropped:
                raise self._full_error() from exc
            half = len(group) // 2
            first = self._append_piecewise(group[:half])
            second = self._append_piecewise(group[half:])
            return AppendResult(
                first.accepted + second.accepted, dropped + first.dropped + second.dropped, first.first_id
            )
        return AppendResult(result.accepted, dropped + result.dropped, result.first_id)

    def _evict_for_disk(self, need: int) -> list[Dropped]:
        """Evict ``need`` bytes of the oldest lowest-class rows as ``disk_full`` drops.

        A DELETE writes every page it touches to the WAL first, about as many bytes as it
        removes, so on a nearly full disk one big DELETE fails for want of the very room it
        would free. Eviction goes in steps of a quarter of the free space, each checkpointed
        (WAL emptied, freed pages back in the file's free list) before the next; a step that
        still finds the disk full is retried smaller.

        Raises:
            sqlite3.OperationalError: the disk is full even for the smallest step.
        """
        dropped: list[Dropped] = []
        freed_in_all = 0
        self._checkpoint()
        while freed_in_all < need and self._total > 0:
            freed, more = self._evict_step(min(need - freed_in_all, max(EVICT_STEP_MIN, self._disk_space()[0] // 4)))
            if not freed:
                break
            freed_in_all += freed
            dropped += more
        return dropped

    def _evict_step(self, step: int) -> tuple[int, list[Dropped]]:
        """One eviction transaction of ``step`` bytes, then a checkpoint; smaller while the disk is full."""
        while True:
            try:
                with self._transaction():
                    freed, dropped = self._evict(step, "disk_full")
            except sqlite3.OperationalError as exc:
                if not _is_disk_full(exc):
                    raise
                if self._release_ballast():
                    self._checkpoint()
                    continue
                if step <= EVICT_STEP_MIN:
                    raise
                step = max(EVICT_STEP_MIN, step // 4)
                continue
            self._total -= freed
            self._checkpoint()  # freed pages go back to the file's free list for the next inserts
            return freed, dropped

    def _make_ballast(self) -> None:
        """Hold ``_ballast_size`` bytes of the volume in a file of our own (``<buffer>.reserve``).

        Another program can fill the disk to the last byte; then even a DELETE cannot run (its
        WAL frames need room) nor a checkpoint (it writes pages back). Giving the reserve file
        back is what lets the buffer evict and go on (see :meth:`_release_ballast`).
        """
        try:
            fd = os.open(self._ballast_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._ballast_size)
            finally:
                os.close(fd)
        except OSError as exc:
            with suppress(OSError):
                self._ballast_path.unlink()
            log.debug("buffer reserve file %s not made: %s", self._ballast_path, exc)
            return
        self._ballast = True

    def _release_ballast(self) -> bool:
        """Delete the reserve file to make room on a full disk; False if there was none."""
        if not self._ballast:
            return False
        self._ballast = False
        try:
            self._ballast_path.unlink()
        except OSError:
            return False
        log.warning(
            "the disk holding %s is full: released the buffer's %d-byte reserve to evict old events;"
            " it is taken back once the disk has room again",
            self.path,
            self._ballast_size,
        )
        return True

    def _checkpoint(self) -> None:
        # RESTART, not TRUNCATE: the WAL file keeps its blocks (up to journal_size_limit), so on
        # a disk another program filled, the next DELETE has room for its frames.
        with suppress(sqlite3.OperationalError):  # may itself lack room; eviction still tries
            self._conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def _disk_space(self) -> tuple[int, int]:
        """Free bytes and size of the buffer's volume (the reserve shrinks on tiny volumes)."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return 1 << 62, 1 << 62  # unknown: rely on the SQLITE_FULL handling
        return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize

    def _append_once(self, records: Sequence[Record]) -> AppendResult:
        values: list[object] = []
        last: dict[str, int] = {}
        per_device: dict[str, int] = {}
        added = 0
        media = False
        for r in records:
            size = row_size(r.device, r.type, r.topic, r.payload)
            values += (r.priority, r.device, r.type, r.seq, r.topic, r.payload, size, r.created, zlib.crc32(r.payload))
            added += size
            last[r.device] = max(r.seq, last.get(r.device, r.seq))
            per_device[r.device] = per_device.get(r.device, 0) + 1
            media = media or r.priority == Priority.MEDIA
        total = self._total + added
        freed = 0
        dropped: list[Dropped] = []
        first_id = 0
        with self._transaction() as conn:
            # Multi-row statements, not executemany: see the note above _INSERT_ROWS.
            start = 0
            for rows in _chunk_sizes(len(records), self._rows_per_insert):
                chunk = values[start * _ROW_VALUES : (start + rows) * _ROW_VALUES]
                conn.execute(_INSERT_ROWS + ",".join([_ROW_MARKS] * rows), chunk)
                if start == 0:
                    first_id = conn.execute("SELECT last_insert_rowid()").fetchone()[0] - rows + 1
                start += rows
            if last:
                marks = ",".join(["(?, ?)"] * len(last))
                conn.execute(_UPSERT_SEQS.format(marks), [v for item in last.items() for v in item])
            self._bump("accepted", len(records))
            self._pending_rows.update(per_device)
            if media and self.media_max_bytes is not None:
                freed, dropped = self._evict_media()
            if total - freed > self.max_bytes:
                more, more_dropped = self._evict(total - freed - self.max_bytes, "capacity")
                freed += more
                dropped += more_dropped
        # Only after COMMIT: a rolled-back append must not move the in-memory total.
        self._total = total - freed
        self._high_id = first_id + len(records) - 1
        seqs = self._committed_seqs
        for device, seq in last.items():
            if seq > seqs.get(device, 0):
                seqs[device] = seq
        return AppendResult(len(records), dropped, first_id)

    def _evict(self, need: int, reason: str) -> tuple[int, list[Dropped]]:
        """Delete the oldest lowest-priority rows worth at least ``need`` bytes, inside a transaction.

        The victims are the shortest prefix of (priority, id) order whose sizes add up to
        ``need``. Each round reads a prefix's ids and sizes packed into one result row, finds
        the exact cut, counts the victims per device and type with one aggregate query, and
        removes them with one range DELETE (see the note above _INSERT_ROWS).
        """
        freed = 0
        groups: dict[tuple[str, str, int], int] = {}
        while freed < need:
            average = max(ROW_OVERHEAD, self._total // self._rows_estimate())
            limit = min(_EVICT_ROUND, (need - freed) // average + 64)
            packed = self._conn.execute(_EVICT_PREFIX, (limit,)).fetchone()
            if packed is None or packed[0] is None:
                break
            prefix = sorted(
                zip(
                    map(int, packed[1].split(",")),
                    map(int, packed[0].split(",")),
                    map(int, packed[2].split(",")),
                    strict=True,
                )
            )
            cut = prefix[-1]
            running = freed
            for priority, row_id, size in prefix:
                running += size
                if running >= need:
                    cut = (priority, row_id, size)
                    break
            for priority, upto in list(self.taken.items()):
                if priority <= cut[0]:
                    self._remember_inflight(priority, upto if priority < cut[0] else min(upto, cut[1]), reason)
            # Two ranges SQLite can walk on the (priority, id) index: every row of the lower
            # classes, and the cut class up to the cut.
            for where, bounds in (("priority < ?", (cut[0],)), ("priority = ? AND id <= ?", (cut[0], cut[1]))):
                for device, type_, prio, count, size in self._conn.execute(
                    f"SELECT device, type, priority, count(*), sum(size) FROM outbox WHERE {where}"  # noqa: S608
                    " GROUP BY device, type, priority",
                    bounds,
                ):
                    groups[device, type_, prio] = groups.get((device, type_, prio), 0) + count
                    freed += size
                self._conn.execute(f"DELETE FROM outbox WHERE {where}", bounds)  # noqa: S608
        return freed, self._count_dropped(groups, reason)

    def _count_dropped(self, groups: dict[tuple[str, str, int], int], reason: str) -> list[Dropped]:
        count = sum(groups.values())
        if count:
            self._bump(f"dropped_{reason}", count)
        for (device, _, _), n in groups.items():
            self._pending_rows[device] -= n
        return [Dropped(d, t, p, n, reason) for (d, t, p), n in groups.items()]

    def _remember_inflight(self, priority: int, upto: int, reason: str) -> None:
        """Remember evicted rows a consumer has taken: their PUBACK may still come."""
        packed = self._conn.execute(
            "SELECT group_concat(id, ',') FROM outbox WHERE priority = ? AND id <= ?", (priority, upto)
        ).fetchone()[0]
        if packed:
            memory = self._evicted_inflight
            memory.update(dict.fromkeys(map(int, packed.split(",")), reason))
            while len(memory) > EVICTED_MEMORY:  # the oldest are long past any PUBACK
                del memory[next(iter(memory))]

    def _evict_media(self) -> tuple[int, list[Dropped]]:
        """Delete the oldest media rows past ``media_max_bytes``, inside a transaction."""
        assert self.media_max_bytes is not None
        # Media rows are few (a quota's worth of pictures), so listing them all is cheap.
        rows = self._conn.execute(
            "SELECT id, size FROM outbox WHERE priority = ? ORDER BY id", (int(Priority.MEDIA),)
        ).fetchall()
        need = sum(size for _, size in rows) - self.media_max_bytes
        if need <= 0:
            return 0, []
        running, cut = 0, rows[-1][0]
        for row_id, size in rows:
            running += size
            if running >= need:
                cut = row_id
                break
        where = "priority = ? AND id <= ?"
        bounds = (int(Priority.MEDIA), cut)
        taken = self.taken.get(int(Priority.MEDIA))
        if taken is not None:
            self._remember_inflight(int(Priority.MEDIA), min(taken, cut), "media_quota")
        groups = self._conn.execute(
            f"SELECT device, type, count(*), sum(size) FROM outbox WHERE {where} GROUP BY device, type",  # noqa: S608
            bounds,
        ).fetchall()
        self._conn.execute(f"DELETE FROM outbox WHERE {where}", bounds)  # noqa: S608
        freed = sum(size for _, _, _, size in groups)
        return freed, self._count_dropped({(d, t, int(Priority.MEDIA)): n for d, t, n, _ in groups}, "media_quota")

    def _rows_estimate(self) -> int:
        # An upper bound (ids may have holes): it only sizes a round, never the cut itself.
        row = self._conn.execute("SELECT max(id) - min(id) + 1 FROM outbox").fetchone()
        return max(1, int(row[0] or 1))

    def _peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        return _peek(self._conn, priority, after_id, limit)

    def _next_id(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) + 1 if row else 1

    def _priorities(self) -> list[int]:
        # Skip-scan down the (priority, id) index: one seek per class, not a full scan.
        found: list[int] = []
        row = self._conn.execute("SELECT max(priority) FROM outbox").fetchone()
        while row[0] is not None:
            found.append(row[0])
            row = self._conn.execute("SELECT max(priority) FROM outbox WHERE priority < ?", (row[0],)).fetchone()
        return found

    def _ack(self, ids: Sequence[int]) -> int:
        unique = list(dict.fromkeys(ids))
        deleted = freed = 0
        with self._unsynced(), self._transaction() as conn:
            start = 0
            for size in _chunk_sizes(len(unique), _CHUNK):
                chunk = unique[start : start + size]
                start += size
                marks = _placeholders(size)
                found = 0
                present: list[str] = []
                # Only "?" placeholders are interpolated, never values.
                query = f"SELECT device, count(*), sum(size), group_concat(id, ',') FROM outbox WHERE id IN ({marks})"  # noqa: S608
                for device, n, nbytes, packed in conn.execute(
                    query + " GROUP BY device",
                    chunk,
                ):
                    self._pending_rows[device] -= n
                    found += n
                    freed += nbytes
                    present.append(packed)
                if found:
                    conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608
                if found < len(chunk):
                    found += self._credit_absent(set(chunk) - {int(i) for p in present for i in p.split(",")})
                deleted += found
            self._bump("delivered", deleted)
        self._total -= freed
        return deleted

    def _credit_absent(self, absent: set[int]) -> int:
        """Acknowledged ids no longer buffered that were evicted or lost while in flight.

        The broker has them, so they move from their drop counter to delivered (the caller
        counts them); returns how many. Any other absent id was delivered before.
        """
        below, uncredited = self._corrupt_credit
        credited = 0
        for row_id in sorted(absent):
            reason = self._evicted_inflight.pop(row_id, None)
            if reason is None and row_id < below and uncredited > 0:
                reason, uncredited = "corrupt", uncredited - 1
            if reason is not None:
                self._bump(f"dropped_{reason}", -1)
                credited += 1
            else:
                # Not found, nothing explains it: a damaged page can hide a row from a lookup
                # without an error. Remembered, so a later replacement counts it as delivered.
                self._unexplained[row_id] = None
                if len(self._unexplained) > EVICTED_MEMORY:
                    del self._unexplained[next(iter(self._unexplained))]
        self._corrupt_credit = (below, uncredited)
        return credited

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        """Commit without fsync: kept across a process crash, maybe not across a power cut."""
        if self._synchronous not in ("FULL", "EXTRA"):
            yield
            return
        self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            with suppress(sqlite3.Error):
                self._conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _last_seqs(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT device, seq FROM sequences"))

    def _stats(self) -> BufferStats:
        conn = self._conn
        # GROUP BY priority is answered from the small covering index, not the payload pages.
        by_priority = dict(
            conn.execute("SELECT priority, count(*) FROM outbox GROUP BY priority ORDER BY priority DESC")
        )
        # Rows arrive in id order, so the lowest id is the oldest without scanning `created`.
        oldest = conn.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        counters = self._counts
        return BufferStats(
            rows=sum(by_priority.values()),
            bytes=self._total,
            max_bytes=self.max_bytes,
            rows_by_priority=by_priority,
            oldest_created=None if oldest is None else oldest[0],
            accepted=counters["accepted"],
            delivered=counters["delivered"],
            dropped_capacity=counters["dropped_capacity"],
            dropped_disk_full=counters["dropped_disk_full"],
            dropped_media_quota=counters["dropped_media_quota"],
            dropped_corrupt=counters["dropped_corrupt"],
            epoch=self.epoch,
        )

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        # IMMEDIATE takes the write lock up front, so a reader elsewhere cannot make us fail midway.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._pending_counts.clear()
            self._pending_rows.clear()
            # SQLite may already have rolled back (it does on some SQLITE_FULL paths).
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        # Only after COMMIT: the in-memory mirrors follow what the file holds, so after a
        # damaged file is replaced they still say what it held at its last commit.
        for name, by in self._pending_counts.items():
            self._counts[name] += by
        self._rows_by_device.update(self._pending_rows)
        self._pending_counts.clear()
        self._pending_rows.clear()

    def _bump(self, counter: str, by: int) -> None:
        self._conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, counter))
        self._pending_counts[counter] += by

    def _load_mirror(self) -> None:
        """Read counters, rows per device, sizes and seqs into memory (at open)."""
        conn = self._conn
        self._counts = dict.fromkeys(COUNTERS, 0) | dict(conn.execute("SELECT name, value FROM counters"))
        self._rows_by_device = Counter()
        self._total = 0
        for device, rows, size in conn.execute("SELECT device, count(*), sum(size) FROM outbox GROUP BY device"):
            self._rows_by_device[device] = rows
            self._total += size
        self._committed_seqs = dict(conn.execute("SELECT device, seq FROM sequences"))
        self._high_id = self._next_id() - 1

    @contextmanager
    def _disk_full_is_fatal(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if _is_disk_full(exc):
                raise self._full_error() from exc
            raise

    def _full_error(self) -> BufferFullError:
        return BufferFullError(
            f"buffer {self.path} is full: the disk has no room even after evicting old events;"
            " free disk space or lower the buffer's max_bytes"
        )

    def _path_error(self, exc: sqlite3.Error) -> BufferPathError:
        return BufferPathError(
            f"buffer {self.path} cannot be written ({exc}): make the file and its directory writable"
            " by the agent's user, check the volume is not mounted read-only and the file is not"
            " immutable (lsattr; chattr -i), or point buffer.path elsewhere"
        )

    def _guarded(self, op: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``op``; on corruption, quarantine and salvage, then run it once more.

        Every operation goes through here, so corruption found on any path (append, peek,
        ack, eviction, checkpoint, stats) is handled in this one place.
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

    def _reopen(self) -> None:
        """After a replacement that could not open its fresh file (say, the disk was full)."""
        self._conn = self._open_checked()
        self._broken = False
        self._load_mirror()
        self.generation += 1

    def _prepare_file(self) -> None:
        """Create the directory (0700) and the file (0600): events are nobody else's business."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            with suppress(OSError):
                if self.path.stat().st_mode & 0o077:
                    self.path.chmod(0o600)
        except OSError as exc:
            raise BufferPathError(
                f"cannot create buffer {self.path}: {exc.strerror or exc}; make its directory writable"
                " by the agent's user or point buffer.path elsewhere"
            ) from exc
        else:
            os.close(fd)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly.
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        # As many rows per INSERT as this SQLite binds parameters (999 before 3.32).
        self._rows_per_insert = max(1, min(1000, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _ROW_VALUES))
        return conn

    def _open_checked(self) -> sqlite3.Connection:
        # Checked before SQLite sees the file: closing a connection to a foreign file
        # deletes the -wal beside it, which may hold the last committed events.
        if _foreign_header(self.path):
            if not looks_like_damaged_outbox(self.path):
                raise BufferPathError(buffer_path_problem(self.path) or f"{self.path} is not a buffer file")
            raise _CheckFailed("file is not a database")
        wal_existed = Path(f"{self.path}-wal").exists()
        conn = self._connect()
        try:
            # Read the version before any write, so a newer file is left exactly as it was.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BufferSchemaError(
                    f"buffer {self.path} has schema version {version}, newer than this agent's"
                    f" {SCHEMA_VERSION}; run a newer agent or move the file away"
                )
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise _CheckFailed("quick_check: " + "; ".join(problems[:3]))
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("buffer %s could not use WAL (journal_mode=%s)", self.path, mode)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # A checkpoint may grow the file by the WAL's whole content at once, so the WAL must
            # stay well inside the reserve the buffer keeps free: a quarter of it. Otherwise one
            # checkpoint eats the reserve, and on a full disk neither a checkpoint (the file must
            # grow) nor a DELETE (its WAL frames need room) can run again.
            wal = max(64 * self._page_size, min(WAL_LIMIT, _reserve(self._disk_space()[1]) // 4))
            self._ballast_size = wal + BALLAST_EXTRA
            conn.execute(f"PRAGMA wal_autocheckpoint = {wal // self._page_size}")
            conn.execute(f"PRAGMA journal_size_limit = {wal}")
            if self._max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(self._max_page_count)}")
            conn.executescript(_SCHEMA)
            # After the tables: they are created idempotently, so a crash in between is harmless.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.epoch = self._start_epoch(conn, wal_existed=wal_existed)
        except BaseException:
            conn.close()
            raise
        return conn

    def _start_epoch(self, conn: sqlite3.Connection, *, wal_existed: bool) -> str:
        """The file's sequence epoch, renewed when its seqs cannot be trusted; mark it running.

        The running flag is checkpointed into the main file at once, so it says "1" there for
        as long as the agent runs. Finding it so with no write-ahead log beside the file means
        the log (holding the last commits, and with them the last seqs handed out) was lost:
        numbering goes on from what the file knows, in a new epoch.
        """
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        epoch = meta.get("epoch")
        if epoch is not None and meta.get("running") == "1" and not wal_existed:
            log.warning(
                "buffer %s was not closed cleanly and its write-ahead log (%s-wal) is gone: the last"
                " committed events and seq numbers may be lost; numbering goes on in a new sequence epoch",
                self.path,
                self.path,
            )
            epoch = None
        epoch = epoch or new_epoch()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?), ('running', '1')", (epoch,))
        conn.execute("COMMIT")
        with suppress(sqlite3.OperationalError):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return epoch

    def _replace_corrupt(self, exc: sqlite3.DatabaseError, *, running: bool) -> None:
        """Quarantine the unreadable file, start a fresh one, salvage into it and count the rest.

        ``running``: found while the agent ran, so the in-memory mirrors (counters, rows per
        device, committed seqs) say exactly what the file held at its last commit, and the
        store's hints hold committed events it has not handed out yet.
        """
        before = _Before(
            dict(self._counts), Counter(self._rows_by_device), dict(self._committed_seqs), self._high_id, self.epoch
        ) if running else None  # fmt: skip
        kept = self.hints() if running and self.hints is not None else []
        target = self._quarantine()
        log.error(
            "buffer file %s is corrupt (%s); moved it (with any -wal/-shm) to %s and started"
            " a fresh buffer. The moved files are kept only for forensics and are safe to delete.",
            self.path,
            exc,
            target,
        )
        self.quarantined = target
        self._pending_counts.clear()
        self._pending_rows.clear()
        try:
            self._conn = self._open_checked()
        except sqlite3.Error:
            self._broken = True  # e.g. the disk is full: the next operation tries again
            self.generation += 1
            raise
        self._broken = False
        found = salvage(target)
        rows = {row[0]: row for row in found.rows}
        for r in kept:
            rows.setdefault(r.id, (r.id, r.priority, r.device, r.type, r.seq, r.topic, r.payload, r.created,
                                   zlib.crc32(r.payload)))  # fmt: skip
        self.recovered_drops = []
        try:
            self._restore(found, list(rows.values()), before)
        except sqlite3.Error as exc2:
            found.problems.append(f"writing the salvage: {exc2}")
        self._load_mirror()
        # Last: other threads look at the epoch and the drops once they see a new generation.
        self.generation += 1
        log.log(
            logging.WARNING if found.problems else logging.INFO,
            "salvaged %d events and %d device sequences from %s%s",
            self._counts["accepted"]
            - self._counts["delivered"]
            - sum(self._counts[f"dropped_{r}"] for r in DROP_REASONS),
            len(found.seqs),
            target,
            f" (partial: {'; '.join(found.problems)})" if found.problems else "",
        )

    def _restore(self, found: Salvaged, rows: list[tuple[Any, ...]], before: _Before | None) -> None:
        """Write the salvage into the fresh file in one transaction: rows, seqs, epoch, counters."""
        seqs = dict(found.seqs)
        for device, seq in (before.seqs if before else {}).items():
            seqs[device] = max(seq, seqs.get(device, seq))
        for row in rows:
            seqs[row[2]] = max(row[4], seqs.get(row[2], row[4]))
        # The numbering is known whole only from memory (found while running) or from an
        # intact sequences table; otherwise it goes on from what is known, in a new epoch.
        if before is not None and before.epoch:
            self.epoch = before.epoch
        elif found.epoch and found.complete_sequences:
            self.epoch = found.epoch
        else:
            log.warning(
                "buffer %s: sequence numbers could not all be read back; numbering goes on in new sequence epoch %s",
                self.path,
                self.epoch,
            )
        sized = [(*row[:7], row_size(row[2], row[3], row[5], row[6]), row[7], row[8]) for row in rows]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (id, priority, device, type, seq, topic, payload,"
                " size, created, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                sized,
            )
            conn.executemany(_UPSERT_SEQS.format("(?, ?)"), seqs.items())
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (self.epoch,))
            # Ids are never given twice: one lost with the damaged file may still be in flight,
            # and its PUBACK must not delete the new event that would otherwise get its id.
            high_id = max(found.high_id, before.high_id if before is not None else 0, *(r[0] for r in rows))
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (high_id,))
            saved = len(sized)
            counts = before.counts if before is not None else found.counters
            if counts is None:
                # The old counters are unreadable: count from what survived; how many were lost
                # cannot be known (the log says so).
                self._bump("accepted", saved)
                log.error(
                    "buffer %s: the damaged file's counters could not be read; an unknown number of events may be lost",
                    self.path,
                )
            else:
                counts = {name: int(counts.get(name, 0)) for name in COUNTERS}
                if before is not None:
                    # Acknowledged while the damaged file hid them, and not salvaged: delivered.
                    saved_ids = {row[0] for row in rows}
                    counts["delivered"] += sum(1 for i in self._unexplained if i not in saved_ids)
                    self._unexplained.clear()
                held = counts["accepted"] - counts["delivered"] - sum(counts[f"dropped_{r}"] for r in DROP_REASONS)
                lost = held - saved
                if lost < 0:  # more came back than the counters knew of: accept them
                    counts["accepted"] -= lost
                    lost = 0
                counts["dropped_corrupt"] += lost
                for name, value in counts.items():
                    self._bump(name, value)
                if lost:
                    self.recovered_drops = _lost_by_device(lost, before, rows)
                    self._corrupt_credit = (before.high_id + 1, lost) if before is not None else (0, 0)
                    log.error(
                        "buffer %s: %d events could not be salvaged and are lost (counted as dropped, reason"
                        " corrupt): %s",
                        self.path,
                        lost,
                        "; ".join(_describe(d) for d in self.recovered_drops),
                    )
            excess = sum(s[7] for s in sized) - self.max_bytes
            if excess > 0:
                self._total = sum(s[7] for s in sized)
                self._evict(excess, "capacity")

    def _quarantine(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        # Move -wal/-shm first: a stale WAL left beside a fresh file would be replayed into it.
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
        return target


@dataclass(frozen=True, slots=True)
class _Before:
    """What the in-memory mirrors said of a file just before it was found corrupt."""

    counts: dict[str, int]
    rows_by_device: Counter[str]
    seqs: dict[str, int]
    high_id: int
    epoch: str


def _lost_by_device(lost: int, before: _Before | None, rows: list[tuple[Any, ...]]) -> list[Dropped]:
    """Who lost how many events, with the seq ranges, where the mirrors say (else one line)."""
    if before is None:
        return [Dropped("", "", 0, lost, "corrupt")]
    saved: dict[str, set[int]] = {}
    for row in rows:
        saved.setdefault(row[2], set()).add(row[4])
    drops = []
    for device, held in sorted(before.rows_by_device.items()):
        missing = held - len(saved.get(device, ()))
        if missing <= 0:
            continue
        # A device's buffered events are nearly always its last `held` seqs (delivery and
        # eviction both go oldest first): the ones not salvaged among them are the lost ones.
        last = before.seqs.get(device, 0)
        candidates = [s for s in range(max(1, last - held + 1), last + 1) if s not in saved.get(device, set())]
        drops.append(
            Dropped(device, "", 0, missing, "corrupt", _seq_ranges(candidates[-missing:]) if candidates else "")
        )
    return drops or [Dropped("", "", 0, lost, "corrupt")]


def _describe(drop: Dropped) -> str:
    seqs = f" (seq {drop.seqs})" if drop.seqs else ""
    return f"{drop.device or 'devices unknown'}: {drop.count}{seqs}"
