"""What goes into the outbox and comes out of it, what it reports, and the errors it raises.

The value types (:class:`Record` in, :class:`Stored` out, :class:`Dropped`, :class:`AppendResult`,
:class:`BufferStats`), the logical row size the bounds count in, and how a SQLite error is told
apart: corruption (replace the file), a full disk (evict), a file that cannot be written.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Final

from agent.errors import BufferError_

ROW_OVERHEAD: Final = 64
"""Bytes added to each row's logical size for keys, indexes and page slack."""
DROP_REASONS: Final = ("capacity", "disk_full", "media_quota", "corrupt")
COUNTERS: Final = ("accepted", "delivered", *(f"dropped_{r}" for r in DROP_REASONS))

_CORRUPTION_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_READONLY_CODES: Final = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN})


class BufferFullError(BufferError_):
    """The disk holding the buffer is full even after evicting old events."""


class BufferSchemaError(BufferError_):
    """The buffer file was written by a newer agent; it is left untouched."""


class BufferPathError(BufferError_):
    """``buffer.path`` cannot hold the buffer (a directory, someone else's file, read-only)."""


class CheckFailed(sqlite3.DatabaseError):
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
    """A buffered event as returned by :meth:`Outbox.peek`; ``id`` is what to ack.

    ``backlog`` is set by the feed that hands it out: accepted before the uplink's current
    session began, so it waited for a connection (docs/events.md's ``backlog`` attribute).
    """

    id: int
    priority: int
    device: str
    type: str
    seq: int
    topic: str
    payload: bytes
    created: float
    backlog: bool = False


@dataclass(slots=True, eq=False)
class Lanes:
    """One session's two cursors on a feed (``Feed.next_lanes``), per class the last id handed out.

    ``live``: events committed since the session began, handed out as they come; ``backlog``:
    the ones from before (``id < live_from``), read behind them at the consumer's pace. The
    feed advances both; make a new one per connection (its first use starts the session).
    """

    live: dict[int, int] = field(default_factory=dict)
    backlog: dict[int, int] = field(default_factory=dict)
    taken: dict[int, int] = field(default_factory=dict)  # per class, the highest id of either lane
    live_from: int = 0  # the session's first live id, set by the feed
    drained: set[int] = field(default_factory=set)  # classes whose backlog is all handed out


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
    if isinstance(exc, CheckFailed):
        return True
    # Extended codes carry the primary code in the low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPTION_CODES


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether SQLite found no room for its pages (SQLITE_FULL)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


def is_readonly(exc: sqlite3.Error) -> bool:
    """Whether SQLite could not write the file (read-only, no permission, cannot open)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _READONLY_CODES
