"""The outbox file's layout and how it is opened: SQL text, checks, the sequence epoch, reads.

:func:`open_checked` creates or upgrades the tables, refuses a foreign or newer file and raises
on damage (the outbox then replaces the file, see agent/store/repair.py); :func:`peek` reads a
class's rows packed into one result row, for the outbox and for :class:`OutboxReader`.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.store.disk import wal_limit
from agent.store.records import BufferPathError, BufferSchemaError, CheckFailed, Stored
from agent.store.salvage import MAGIC, buffer_path_problem, header, looks_like_damaged_outbox

# The outbox's own logger, whichever of its modules speaks: log lines keep their logger name.
log = logging.getLogger("agent.store.outbox")

# 2: meta (sequence epoch, running flag), counter dropped_corrupt. 3: new rows carry no topic (the
# uplink chooses it when it sends), so an older agent, which would publish them to an empty topic,
# must refuse the file; older rows keep theirs, unused.
SCHEMA_VERSION: Final = 3
SYNC_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
CHUNK: Final = 500  # stays far below SQLite's limit on bound parameters

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
INSERT_ROWS: Final = "INSERT INTO outbox (priority, device, type, seq, topic, payload, size, created, crc) VALUES "
ROW_MARKS: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
ROW_VALUES: Final = 9
# A stored seq is never lowered: a late or replayed batch must not rewind a device.
UPSERT_SEQS: Final = (
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


def chunk_sizes(n: int, most: int) -> list[int]:
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


def placeholders(n: int) -> str:
    """``n`` comma-separated "?" marks."""
    return ",".join("?" * n)


def peek(conn: sqlite3.Connection, priority: int, after_id: int, limit: int) -> list[Stored]:
    """Rows of that priority after ``after_id``, oldest first, at most ``limit``.

    Raises:
        CheckFailed: a row is unreadable or its payload does not match its CRC-32.
    """
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
        raise CheckFailed(f"unreadable rows ({exc})") from exc
    if not intact:
        raise CheckFailed("an event's payload does not match its CRC-32")
    stored.sort(key=lambda r: r.id)  # group_concat's order is not promised; the alignment is
    return stored


def next_id(conn: sqlite3.Connection) -> int:
    """The id the next appended row will get (ids are never reused)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return int(row[0]) + 1 if row else 1


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
        return peek(self._conn, priority, after_id, limit)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


@contextmanager
def unsynced(conn: sqlite3.Connection, synchronous: str) -> Iterator[None]:
    """Commit without fsync: kept across a process crash, maybe not across a power cut."""
    if synchronous not in ("FULL", "EXTRA"):
        yield
        return
    conn.execute("PRAGMA synchronous = NORMAL")
    try:
        yield
    finally:
        with suppress(sqlite3.Error):
            conn.execute(f"PRAGMA synchronous = {synchronous}")


def new_epoch() -> str:
    """A fresh sequence epoch: 16 random hex digits, unique without coordination."""
    return secrets.token_hex(8)


def prepare_file(path: Path) -> None:
    """Create the directory (0700) and the file (0600): events are nobody else's business."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        with suppress(OSError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
    except OSError as exc:
        raise BufferPathError(
            f"cannot create buffer {path}: {exc.strerror or exc}; make its directory writable"
            " by the agent's user or point buffer.path elsewhere"
        ) from exc
    else:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Opened:
    """A checked connection to the buffer file, and what opening it settled."""

    conn: sqlite3.Connection
    page_size: int
    rows_per_insert: int  # as many rows per INSERT as this SQLite binds parameters
    wal: int  # most WAL bytes between checkpoints
    epoch: str


def open_checked(path: Path, synchronous: str, max_page_count: int | None) -> Opened:
    """Open the buffer file, check it, create or upgrade its tables and mark it running.

    Raises:
        BufferPathError: ``path`` is somebody else's file.
        BufferSchemaError: a newer agent wrote the file.
        sqlite3.DatabaseError: the file is damaged (:func:`is_corruption` says so) or unusable.
    """
    # Checked before SQLite sees the file: closing a connection to a foreign file
    # deletes the -wal beside it, which may hold the last committed events.
    if header(path) not in (b"", MAGIC):  # an empty file is a valid empty database to SQLite
        if not looks_like_damaged_outbox(path):
            raise BufferPathError(buffer_path_problem(path) or f"{path} is not a buffer file")
        raise CheckFailed("file is not a database")
    wal_existed = Path(f"{path}-wal").exists()
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly.
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    # As many rows per INSERT as this SQLite binds parameters (999 before 3.32).
    rows_per_insert = max(1, min(1000, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // ROW_VALUES))
    try:
        # Read the version before any write, so a newer file is left exactly as it was.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BufferSchemaError(
                f"buffer {path} has schema version {version}, newer than this agent's"
                f" {SCHEMA_VERSION}; run a newer agent or move the file away"
            )
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CheckFailed("quick_check: " + "; ".join(problems[:3]))
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("buffer %s could not use WAL (journal_mode=%s)", path, mode)
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        wal = wal_limit(page_size, path.parent)
        conn.execute(f"PRAGMA wal_autocheckpoint = {wal // page_size}")
        conn.execute(f"PRAGMA journal_size_limit = {wal}")
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
        conn.executescript(_SCHEMA)
        # After the tables: they are created idempotently, so a crash in between is harmless.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        epoch = _start_epoch(conn, path, wal_existed=wal_existed)
    except BaseException:
        conn.close()
        raise
    return Opened(conn, page_size, rows_per_insert, wal, epoch)


def _start_epoch(conn: sqlite3.Connection, path: Path, *, wal_existed: bool) -> str:
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
            path,
            path,
        )
        epoch = None
    epoch = epoch or new_epoch()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?), ('running', '1')", (epoch,))
    conn.execute("COMMIT")
    with suppress(sqlite3.OperationalError):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return epoch
