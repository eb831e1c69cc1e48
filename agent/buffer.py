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
import sqlite3
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, ParamSpec, Self, TypeVar

from agent.errors import BufferError_
from agent.events import Priority

log = logging.getLogger("agent.buffer")

SCHEMA_VERSION: Final = 1
ROW_OVERHEAD: Final = 64
"""Bytes added to each row's logical size for keys, indexes and page slack."""
DISK_FULL_MIN_EVICT: Final = 1024 * 1024
"""Least logical bytes evicted when the disk is full, so we do not hit it again at once."""
DISK_RESERVE: Final = 8 * 1024 * 1024  # free space the buffer leaves on its volume (for WAL, sqlite temp)
WAL_LIMIT: Final = 2 * 1024 * 1024  # most WAL bytes between checkpoints (less on small volumes)
EVICT_STEP_MIN: Final = 64 * 1024
"""Least logical bytes one eviction transaction deletes on a nearly full disk (see _evict_for_disk)."""

_CHUNK: Final = 500  # stays far below SQLite's limit on bound parameters
_SYNC_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_CORRUPTION_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_ROW_TYPES: Final[tuple[type | tuple[type, ...], ...]] = (
    int,
    int,
    str,
    str,
    int,
    str,
    bytes,
    (int, float),
    int,
)
_COLUMNS: Final = "id, priority, device, type, seq, topic, payload, created, crc"
_MAGIC: Final = b"SQLite format 3\x00"

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
    ('dropped_media_quota', 0);
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
    " group_concat(CAST(payload AS TEXT), char(30))"
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
    """Events of one (device, type, priority) evicted for ``reason``: "capacity", "disk_full" or "media_quota"."""

    device: str
    type: str
    priority: int
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    """How many records an append committed, their ids, and what it had to evict to do so.

    The records got the consecutive ids ``first_id .. first_id + accepted - 1``, in order.
    """

    accepted: int
    dropped: list[Dropped]
    first_id: int = 0


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

    @property
    def dropped(self) -> int:
        """Every eviction, whatever the reason."""
        return self.dropped_capacity + self.dropped_disk_full + self.dropped_media_quota


def row_size(device: str, type_: str, topic: str, payload: bytes) -> int:
    """Return the logical size a row counts against ``max_bytes``."""
    return len(payload) + len(topic) + len(device) + len(type_) + ROW_OVERHEAD


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
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
    try:
        with path.open("rb") as f:
            head = f.read(len(_MAGIC))
    except FileNotFoundError:
        return False
    # An empty file is a valid empty database to SQLite.
    return bool(head) and head != _MAGIC


def _peek(conn: sqlite3.Connection, priority: int, after_id: int, limit: int) -> list[Stored]:
    row = conn.execute(_PEEK_PACKED, (priority, after_id, limit)).fetchone()
    if not row or row[0] is None:
        return []
    ids, seqs, createds, devices, types, topics, payloads = row
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
        path: The SQLite file; parent directories are created.
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
        ValueError: ``max_bytes`` or ``synchronous`` is invalid.

    A corrupt or foreign file never raises: it is quarantined beside the
    original as ``<name>.corrupt-<UTC stamp>``, whatever is readable is salvaged
    into a fresh file, and :attr:`quarantined` names the quarantined copy.
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
        self._synchronous = synchronous.upper()
        self._max_page_count = max_page_count
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open_checked()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._replace_corrupt(exc)
        self._total = self._sum_sizes()

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
        """Delete delivered rows; return how many existed (evicted ids are not counted)."""
        if not ids:
            return 0
        return self._guarded(self._ack, ids)

    def last_seqs(self) -> dict[str, int]:
        """Return the last committed seq per device; it survives delivery of the rows."""
        return self._guarded(self._last_seqs)

    def stats(self) -> BufferStats:
        """Return a snapshot of sizes and counters."""
        return self._guarded(self._stats)

    def close(self) -> None:
        """Close the connection; further calls raise ``sqlite3.ProgrammingError``."""
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
        # Pages freed by deletes stay in the file for reuse: they are room too.
        free += self._conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
        short = _reserve(volume) + 2 * batch_bytes - free
        if short > 0 and self._total > 0:
            try:
                early = self._evict_for_disk(short + batch_bytes)
            except sqlite3.OperationalError as exc:
                if not _is_disk_full(exc):
                    raise
                # Not even a small step fits: the append below meets the full disk and says so.
        try:
            result = self._append_once(records)
        except sqlite3.OperationalError as exc:
            if not _is_disk_full(exc):
                raise
            # Something else filled the disk: checkpoint and truncate the WAL, free room, retry once.
            with self._disk_full_is_fatal():
                more = self._evict_for_disk(max(2 * batch_bytes, DISK_FULL_MIN_EVICT))
                if not more:
                    raise self._full_error() from exc
                result = self._append_once(records)
            early += more
        return AppendResult(result.accepted, early + result.dropped, result.first_id)

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
                if not _is_disk_full(exc) or step <= EVICT_STEP_MIN:
                    raise
                step = max(EVICT_STEP_MIN, step // 4)
                continue
            self._total -= freed
            self._checkpoint()  # freed pages go back to the file's free list for the next inserts
            return freed, dropped

    def _checkpoint(self) -> None:
        with suppress(sqlite3.OperationalError):  # may itself lack room; eviction still tries
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
        added = 0
        media = False
        for r in records:
            size = row_size(r.device, r.type, r.topic, r.payload)
            values += (r.priority, r.device, r.type, r.seq, r.topic, r.payload, size, r.created, zlib.crc32(r.payload))
            added += size
            last[r.device] = max(r.seq, last.get(r.device, r.seq))
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
            if media and self.media_max_bytes is not None:
                freed, dropped = self._evict_media()
            if total - freed > self.max_bytes:
                more, more_dropped = self._evict(total - freed - self.max_bytes, "capacity")
                freed += more
                dropped += more_dropped
        # Only after COMMIT: a rolled-back append must not move the in-memory total.
        self._total = total - freed
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
        count = sum(groups.values())
        if count:
            self._bump(f"dropped_{reason}", count)
        return freed, [Dropped(d, t, p, n, reason) for (d, t, p), n in groups.items()]

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
        groups = self._conn.execute(
            f"SELECT device, type, count(*), sum(size) FROM outbox WHERE {where} GROUP BY device, type",  # noqa: S608
            bounds,
        ).fetchall()
        self._conn.execute(f"DELETE FROM outbox WHERE {where}", bounds)  # noqa: S608
        count = sum(n for _, _, n, _ in groups)
        self._bump("dropped_media_quota", count)
        freed = sum(size for _, _, _, size in groups)
        return freed, [Dropped(d, t, int(Priority.MEDIA), n, "media_quota") for d, t, n, _ in groups]

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
        with self._transaction() as conn:
            start = 0
            for size in _chunk_sizes(len(unique), _CHUNK):
                chunk = unique[start : start + size]
                start += size
                marks = _placeholders(size)
                # Only "?" placeholders are interpolated, never values.
                n, size = conn.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE id IN ({marks})",  # noqa: S608
                    chunk,
                ).fetchone()
                conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608
                deleted += n
                freed += size
            self._bump("delivered", deleted)
        self._total -= freed
        return deleted

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
        counters = dict(conn.execute("SELECT name, value FROM counters"))
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
            # SQLite may already have rolled back (it does on some SQLITE_FULL paths).
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _bump(self, counter: str, by: int) -> None:
        self._conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, counter))

    def _sum_sizes(self) -> int:
        return int(self._conn.execute("SELECT coalesce(sum(size), 0) FROM outbox").fetchone()[0])

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

    def _guarded(self, op: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``op``; on corruption, quarantine and salvage, then run it once more."""
        try:
            return op(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            with suppress(sqlite3.Error):
                self._conn.close()
            self._replace_corrupt(exc)
        return op(*args, **kwargs)

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
            raise _CheckFailed("file is not a database")
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
            conn.execute(f"PRAGMA wal_autocheckpoint = {wal // self._page_size}")
            conn.execute(f"PRAGMA journal_size_limit = {wal}")
            if self._max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(self._max_page_count)}")
            conn.executescript(_SCHEMA)
            # After the tables: they are created idempotently, so a crash in between is harmless.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _replace_corrupt(self, exc: sqlite3.DatabaseError) -> None:
        """Quarantine the unreadable file, start a fresh one and salvage into it."""
        target = self._quarantine()
        log.error(
            "buffer file %s is corrupt (%s); moved it (with any -wal/-shm) to %s and started"
            " a fresh buffer. The moved files are kept only for forensics and are safe to delete.",
            self.path,
            exc,
            target,
        )
        self.quarantined = target
        self.generation += 1
        self._conn = self._open_checked()
        self._salvage(target)
        self._total = self._sum_sizes()

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

    def _salvage(self, source: Path) -> None:
        """Copy what is still readable from ``source``: sequences first, then rows."""
        problems: list[str] = []
        seqs: dict[str, int] = {}
        rows: list[tuple[Any, ...]] = []
        if _foreign_header(source):
            log.warning("nothing to salvage from %s: it is not a SQLite database", source)
            return
        try:
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            log.warning("could not salvage anything from %s: %s", source, exc)
            return
        try:
            # A truncated file (shorter than its header says) fails every read as "malformed"
            # unless SQLite is told to trust the schema it can still read.
            with suppress(sqlite3.Error):
                src.execute("PRAGMA writable_schema = ON")
            try:
                for device, seq in src.execute("SELECT device, seq FROM sequences"):
                    if isinstance(device, str) and isinstance(seq, int):
                        seqs[device] = max(seq, seqs.get(device, seq))
            except sqlite3.Error as exc:
                problems.append(f"sequences: {exc}")
            rows = _read_rows(src, problems)
        finally:
            src.close()
        # A damaged page can yield a row whose payload is cut or garbled: publish only events
        # that are still whole.
        whole = [row for row in rows if _intact(row)]
        if len(whole) < len(rows):
            problems.append(f"{len(rows) - len(whole)} damaged events left behind")
        rows = whole
        for row in rows:
            seqs[row[2]] = max(row[4], seqs.get(row[2], row[4]))

        saved_seqs = saved_rows = 0
        try:
            with self._transaction() as conn:
                conn.executemany(_UPSERT_SEQS.format("(?, ?)"), seqs.items())
            saved_seqs = len(seqs)
        except sqlite3.Error as exc:
            problems.append(f"writing sequences: {exc}")
        try:
            saved_rows = self._restore_rows(rows)
        except sqlite3.Error as exc:
            problems.append(f"writing rows: {exc}")

        if problems:
            log.warning(
                "salvage from %s was partial (%s); recovered %d events and %d device sequences",
                source,
                "; ".join(problems),
                saved_rows,
                saved_seqs,
            )
        else:
            log.info("salvaged %d events and %d device sequences from %s", saved_rows, saved_seqs, source)

    def _restore_rows(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert salvaged rows, keeping their ids so in-flight acks still match.

        Counters restart from the salvaged rows: the old ones cannot be trusted
        to match what survived, and the accounting identity must hold.
        """
        sized = [(*row[:7], row_size(row[2], row[3], row[5], row[6]), row[7], row[8]) for row in rows]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (id, priority, device, type, seq, topic, payload,"
                " size, created, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                sized,
            )
            saved = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
            self._bump("accepted", saved)
            excess = self._sum_sizes() - self.max_bytes
            if excess > 0:
                self._evict(excess, "capacity")
        return saved


def _intact(row: tuple[Any, ...]) -> bool:
    """Whether a salvaged row's payload is whole: its CRC-32 matches the one stored with it."""
    return bool(zlib.crc32(row[6]) == row[8])


def _read_rows(src: sqlite3.Connection, problems: list[str]) -> list[tuple[Any, ...]]:
    """Read outbox rows up to the first damaged page, then backwards from the end to it."""
    rows: list[tuple[Any, ...]] = []
    last_id = -1
    for order, query in (
        ("forward", f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id"),  # noqa: S608
        ("backward", f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id DESC"),  # noqa: S608
    ):
        try:
            for row in src.execute(query, (last_id,)):
                if all(isinstance(v, t) for v, t in zip(row, _ROW_TYPES, strict=True)):
                    rows.append(row)
                if order == "forward" and isinstance(row[0], int):
                    last_id = row[0]
        except sqlite3.Error as exc:
            problems.append(f"outbox ({order}): {exc}")
            continue
        break  # the forward pass read everything
    return rows
