"""Reading what is left of a damaged buffer file, and telling a damaged buffer from a foreign file.

The outbox (agent/store/repair.py) quarantines a corrupt file and salvages it through this module;
``edge-agent validate`` asks :func:`buffer_path_problem` before anything runs, so that a
``buffer.path`` pointing at some other file (the site file, a log) is refused by name instead
of being moved aside and written over.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

MAGIC: Final = b"SQLite format 3\x00"
COLUMNS: Final = "id, priority, device, type, seq, topic, payload, created, crc"
_ROW_TYPES: Final[tuple[type | tuple[type, ...], ...]] = (int, int, str, str, int, str, bytes, (int, float), int)
_SNIFF: Final = 64 * 1024  # bytes read to recognise a damaged outbox
_OUR_SCHEMA: Final = b"CREATE TABLE outbox"


def header(path: Path) -> bytes:
    """The first 16 bytes of ``path`` (empty when missing or empty)."""
    try:
        with path.open("rb") as f:
            return f.read(len(MAGIC))
    except (FileNotFoundError, IsADirectoryError):
        return b""


def looks_like_damaged_outbox(path: Path) -> bool:
    """Whether a file without SQLite's header is still recognisably a buffer file.

    Header damage (zeroed or garbled first bytes) leaves the schema text of page 1 behind, and
    a zeroed file (a typical SD card failure) is page-sized zeros; anything else (a site file,
    a log) is somebody else's file and is never moved or written over.
    """
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF)
        size = path.stat().st_size
    except OSError:
        return False
    if _OUR_SCHEMA in head or head.startswith(MAGIC):
        return True
    if size < 1024 or size % 512:
        return False
    return not any(head[:100]) or _has_btree_pages(path, size)


_PAGE_KINDS: Final = frozenset({0x00, 0x02, 0x05, 0x0A, 0x0D})  # b-tree page types; 0: overflow or free


def _has_btree_pages(path: Path, size: int) -> bool:
    """Whether the pages after the first start like SQLite pages, for some page size.

    A first page overwritten with garbage still leaves the rest of the file recognisable;
    a text or log file never has these bytes at every page boundary.
    """
    with path.open("rb") as f:
        for page_size in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
            pages = size // page_size
            if size % page_size or pages < 2:
                continue
            sample = range(1, min(pages, 65))
            kinds = []
            for page in sample:
                f.seek(page * page_size)
                kinds.append(f.read(1)[0] in _PAGE_KINDS)
            if sum(kinds) >= 0.9 * len(kinds):
                return True
    return False


def buffer_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the buffer file, in one line with the fix; None when it can.

    A missing file, an empty one, a SQLite file or a damaged buffer file (which the agent
    quarantines and salvages) is fine. A directory, or a file that is not a buffer, is not.
    """
    try:
        return _path_problem(path)
    except OSError as exc:  # a name too long, a component that is a file, no permission
        name = str(path) if len(str(path)) <= 120 else str(path)[:117] + "..."
        return f"{name} cannot be used: {exc.strerror or exc}; point buffer.path at a file in a writable directory"


def _path_problem(path: Path) -> str | None:
    if path.is_dir():
        return f"{path} is a directory; point buffer.path at a file, e.g. {path / 'buffer.db'}"
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"{parent} is not a directory, so {path} cannot be created; point buffer.path elsewhere"
        return None
    if not path.is_file():
        return f"{path} is not a regular file; point buffer.path at a new file"
    if path.stat().st_size == 0 or looks_like_damaged_outbox(path):
        return None
    return (
        f"{path} exists and is not a buffer file (no SQLite header): the agent will not move or"
        " overwrite it; point buffer.path at a new file"
    )


@dataclass
class Salvaged:
    """What could be read back from a quarantined buffer file.

    ``complete_sequences`` says the ``sequences`` table was read whole, so the numbering of
    every device is known; ``counters`` is None when the counters could not be read.
    """

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)
    epoch: str | None = None
    complete_sequences: bool = False
    counters: dict[str, int] | None = None
    high_id: int = 0  # the highest row id the file ever gave, as far as can be read
    problems: list[str] = field(default_factory=list)


def salvage(source: Path) -> Salvaged:
    """Read what is still readable from ``source``: sequences, epoch, counters, whole rows."""
    found = Salvaged()
    if header(source) not in (b"", MAGIC):
        found.problems.append("not a SQLite database")
        return found
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        found.problems.append(str(exc))
        return found
    try:
        # A truncated file (shorter than its header says) fails every read as "malformed"
        # unless SQLite is told to trust the schema it can still read.
        with suppress(sqlite3.Error):
            src.execute("PRAGMA writable_schema = ON")
        try:
            for device, seq in src.execute("SELECT device, seq FROM sequences"):
                if isinstance(device, str) and isinstance(seq, int):
                    found.seqs[device] = max(seq, found.seqs.get(device, seq))
            found.complete_sequences = True
        except sqlite3.Error as exc:
            found.problems.append(f"sequences: {exc}")
        with suppress(sqlite3.Error):
            row = src.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            found.epoch = row[0] if row and isinstance(row[0], str) else None
        with suppress(sqlite3.Error):
            row = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            found.high_id = row[0] if row and isinstance(row[0], int) else 0
        try:
            counters = dict(src.execute("SELECT name, value FROM counters"))
            if all(isinstance(v, int) for v in counters.values()) and "accepted" in counters:
                found.counters = counters
        except sqlite3.Error as exc:
            found.problems.append(f"counters: {exc}")
        rows = _read_rows(src, found.problems)
    finally:
        src.close()
    # A damaged page can yield a row whose payload is cut or garbled: keep only whole events.
    found.rows = [row for row in rows if _intact(row)]
    if len(found.rows) < len(rows):
        found.problems.append(f"{len(rows) - len(found.rows)} damaged events left behind")
    for row in found.rows:
        found.seqs[row[2]] = max(row[4], found.seqs.get(row[2], row[4]))
        found.high_id = max(found.high_id, row[0])
    return found


def _intact(row: tuple[Any, ...]) -> bool:
    """Whether a salvaged row's payload is whole: its CRC-32 matches the one stored with it."""
    return bool(zlib.crc32(row[6]) == row[8])


def _read_rows(src: sqlite3.Connection, problems: list[str]) -> list[tuple[Any, ...]]:
    """Read outbox rows up to the first damaged page, then backwards from the end to it."""
    rows: list[tuple[Any, ...]] = []
    last_id = -1
    for order, query in (
        ("forward", f"SELECT {COLUMNS} FROM outbox WHERE id > ? ORDER BY id"),  # noqa: S608
        ("backward", f"SELECT {COLUMNS} FROM outbox WHERE id > ? ORDER BY id DESC"),  # noqa: S608
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


def seq_ranges(seqs: Iterable[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"`` (at most 5 ranges, then "...")."""
    out: list[str] = []
    ordered = sorted(set(seqs))
    start = prev = None
    for s in [*ordered, None]:
        if start is not None and (s is None or s != prev + 1):  # type: ignore[operator]
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if s is not None and start is None:
            start = s
        prev = s
    return ", ".join(out[:5]) + (", ..." if len(out) > 5 else "")
