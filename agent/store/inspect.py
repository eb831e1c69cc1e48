"""Reading a buffer file from outside the agent, without changing it (for ``edge-agent doctor``).

The doctor usually runs as root beside a running agent. A read-only WAL connection still
creates ``-wal``/``-shm`` files when they are missing, and they would belong to root,
locking the agent out. Without them the file is complete, so it is opened immutable; with
them SQLite only reads; sidecar files it still creates are given the database's owner.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.store.outbox import SCHEMA_VERSION


@dataclass(frozen=True)
class BufferSummary:
    """What a buffer file holds, or why it cannot be read.

    ``problem`` is None for a sound file; otherwise ``unreadable: <SQLite's reason>`` (missing,
    not a database, malformed) or ``quick_check: <its first findings>`` (damaged pages).
    ``counters`` (see :data:`agent.store.outbox.COUNTERS`) and ``epoch`` are read only from a
    file that passed ``quick_check``; a file the agent has not opened yet has neither.
    """

    path: Path
    problem: str | None = None
    disk_bytes: int = 0  # the file and its write-ahead log, as they are on disk
    schema_version: int = 0
    rows: int = 0
    oldest_created: float | None = None
    counters: dict[str, int] = field(default_factory=dict)
    epoch: str | None = None

    @property
    def newer_schema(self) -> bool:
        """Written by a newer agent than this one (which would refuse to open it)."""
        return self.schema_version > SCHEMA_VERSION


def inspect_buffer(path: Path) -> BufferSummary:
    """Summarise the buffer file at ``path``; never writes to it (nor creates it)."""
    if not path.exists():
        return BufferSummary(path, problem=f"unreadable: {os.strerror(errno.ENOENT)}")
    try:
        with _read_only(path) as conn:
            summary = _summarize(conn, path)
    except sqlite3.DatabaseError as exc:
        summary = BufferSummary(path, problem=f"unreadable: {exc}")
    return replace(summary, disk_bytes=disk_bytes(path))


def disk_bytes(path: Path) -> int:
    """Bytes the buffer takes on its volume: the file and its write-ahead log (0 if absent)."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    existed = {p: p.exists() for p in sidecars}
    mode = "mode=ro" if any(existed.values()) else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=5)
    try:
        yield conn
    finally:
        conn.close()
        created = [p for p in sidecars if not existed[p] and p.exists()]
        with suppress(OSError):
            owner = path.stat()
            for p in created:
                with suppress(OSError):
                    os.chown(p, owner.st_uid, owner.st_gid)


def _summarize(conn: sqlite3.Connection, path: Path) -> BufferSummary:
    quick = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    rows, oldest = (
        conn.execute("SELECT count(*), min(created) FROM outbox").fetchone() if "outbox" in tables else (0, None)
    )
    if quick != ["ok"]:
        problem = f"quick_check: {'; '.join(quick[:2])}"
        return BufferSummary(path, problem, schema_version=version, rows=int(rows), oldest_created=oldest)
    counters = (
        {str(name): int(value) for name, value in conn.execute("SELECT name, value FROM counters")}
        if "counters" in tables
        else {}
    )
    epoch = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone() if "meta" in tables else None
    return BufferSummary(
        path,
        schema_version=version,
        rows=int(rows),
        oldest_created=oldest,
        counters=counters,
        epoch=str(epoch[0]) if epoch else None,
    )
