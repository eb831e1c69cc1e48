"""The ack log: PUBACKed row ids written to a plain file at once, deleted from the outbox in groups.

A delete of its own for every few PUBACKs (a transaction, WAL pages, a hand-off to the buffer
thread) cost more than the commit of the events themselves at 10k events/s. The log records
acknowledged ids with one ``write`` on the caller's thread instead: in the page cache, so a process
crash keeps it (a power cut may not, and then those events are only sent again, as before). The
outbox deletes the logged rows in groups (:meth:`Outbox.apply_acks`) and rewrites the log to hold
only the ids not applied yet; on open it applies what a crash left in the log, then starts a new one.

A log belongs to one opening of one file: a random token in the file's ``meta`` table and in the
log's first line must match, or the log is ignored. So a log can never delete rows of another file
(a replaced, reinstalled or rolled-back one), and it is replayed before anything new is appended:
every row it can delete is the acknowledged event that had that id. Each record carries a CRC-32,
so a torn or garbled write ends the replay instead of deleting anything.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import struct
import threading
import zlib
from array import array
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.store.writes import delete_acked

if TYPE_CHECKING:
    from agent.store.accounting import Accounting

_MAGIC: Final = b"edge-agent acks 1 "
_HEADER_LEN: Final = len(_MAGIC) + 16 + 1  # magic, 16 hex digits of token, newline
_RECORD: Final = struct.Struct("<II")  # ids in the record, CRC-32 of their bytes
_ID_SIZE: Final = array("q").itemsize


def _record(ids: Sequence[int]) -> bytes:
    data = array("q", ids).tobytes()
    return _RECORD.pack(len(ids), zlib.crc32(data)) + data


def read_ids(path: Path, token: str) -> list[int]:
    """The ids logged under ``token`` at ``path``, up to the first damaged record; [] if it is not that log."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    if data[:_HEADER_LEN] != _MAGIC + token.encode() + b"\n":
        return []
    ids: list[int] = []
    at = _HEADER_LEN
    while at + _RECORD.size <= len(data):
        count, crc = _RECORD.unpack_from(data, at)
        body = data[at + _RECORD.size : at + _RECORD.size + count * _ID_SIZE]
        if len(body) != count * _ID_SIZE or zlib.crc32(body) != crc:
            break  # a write cut short (crash mid-write) or garbage: nothing after it is trusted
        ids += array("q", body)
        at += _RECORD.size + len(body)
    return ids


class AckLog:
    """The ack log of one outbox file at ``<file>-acks``.

    :meth:`record` may be called from any thread (the event loop's); the rest runs on the outbox's
    thread. A lock keeps the file and the ids not yet applied in step.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}-acks")
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending: list[int] = []
        self._highest = 0  # the highest id in _pending (0: none)

    @property
    def highest(self) -> int:
        """The highest logged id not applied yet, 0 if none: a read past it need not apply first."""
        return self._highest

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, conn: sqlite3.Connection, acct: Accounting, synchronous: str, *, replay: bool) -> None:
        """Begin a new log for the file on ``conn``; with ``replay`` (at open) first apply the old one.

        The old log's deletes commit first, then the new token, then the new log replaces the old:
        a crash in between leaves the old log, applied again (deleting is idempotent) or ignored
        (its token no longer matches). Ids recorded in this process and not applied yet (the file
        was replaced while running) are carried over.
        """
        row = conn.execute("SELECT value FROM meta WHERE key = 'acks'").fetchone() if replay else None
        if row and (left := read_ids(self.path, row[0])):
            delete_acked(conn, acct, left, synchronous, replay=True)
        token = secrets.token_hex(8)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('acks', ?)", (token,))
            conn.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        with self._lock:
            self._close_fd()
            fresh = Path(f"{self.path}.new")
            fd = os.open(fresh, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            try:
                os.write(fd, _MAGIC + token.encode() + b"\n" + (_record(self._pending) if self._pending else b""))
            finally:
                os.close(fd)
            os.replace(fresh, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def record(self, ids: Sequence[int]) -> None:
        """Log acknowledged ids (any thread). Raises OSError if the log cannot be written."""
        if not ids:
            return
        with self._lock:
            if self._fd is None:
                raise OSError("the ack log is not open")
            os.write(self._fd, _record(ids))
            self._pending += ids
            self._highest = max(self._highest, max(ids))

    def apply(self, conn: sqlite3.Connection, acct: Accounting, synchronous: str) -> int:
        """Delete the logged rows (on the outbox's thread); return how many counted as delivered.

        The log then keeps only the ids recorded meanwhile. A crash between its truncation and
        the write of those loses them from the log: they are only sent again.
        """
        with self._lock:
            ids, self._pending, self._highest = self._pending, [], 0
        if not ids:
            return 0
        try:
            delivered = delete_acked(conn, acct, ids, synchronous)
        except BaseException:
            with self._lock:  # still logged: the next apply deletes them
                self._pending[:0] = ids
                self._highest = max(self._highest, max(ids))
            raise
        with self._lock:
            if self._fd is not None:
                os.ftruncate(self._fd, _HEADER_LEN)
                if self._pending:
                    os.write(self._fd, _record(self._pending))
        return delivered

    def close(self) -> None:
        """Close the log; remove it when everything logged was applied (a clean stop)."""
        with self._lock:
            self._close_fd()
            if not self._pending:
                with suppress(FileNotFoundError):
                    self.path.unlink()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None
