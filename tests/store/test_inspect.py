"""Reading a buffer file from outside the agent: what it holds, why it cannot be read, and never a write."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from agent.store.inspect import inspect_buffer
from agent.store.outbox import COUNTERS, SCHEMA_VERSION, Outbox, Record


def _records(first: int, last: int, payload: bytes = b"{}") -> list[Record]:
    """Events with seqs ``first`` to ``last``, the one with seq n created at 1.7e9 + n."""
    return [Record("m-1", "city.meter.reading", 2, n, "ioc/v1/x", payload, 1.7e9 + n) for n in range(first, last + 1)]


def _state(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` with its content's hash and its modification time."""
    return {p.name: f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}" for p in folder.iterdir()}


def test_a_closed_buffer_is_summarised_without_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Outbox(path, 1 << 20) as outbox:
        outbox.append(_records(1, 3))
        first = outbox.peek(2, 0, 1)[0]
        assert outbox.ack([first.id]) == 1
        epoch = outbox.epoch
    before = _state(tmp_path)

    summary = inspect_buffer(path)

    assert summary.problem is None
    assert summary.rows == 2
    assert summary.oldest_created == 1.7e9 + 2  # the first row was delivered
    assert summary.counters == dict.fromkeys(COUNTERS, 0) | {"accepted": 3, "delivered": 1}
    assert summary.epoch == epoch and len(epoch) == 16
    assert summary.schema_version == SCHEMA_VERSION and not summary.newer_schema
    assert summary.disk_bytes == path.stat().st_size > 0
    assert _state(tmp_path) == before  # not a byte changed, no -wal/-shm left behind
    assert not [name for name in before if name.endswith(("-wal", "-shm"))]


def test_a_live_buffer_is_read_beside_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    outbox = Outbox(path, 1 << 20)
    try:
        outbox.append(_records(1, 5))
        wal = Path(f"{path}-wal")
        assert wal.exists()  # the agent's connection is open: the rows may be in the WAL alone

        summary = inspect_buffer(path)

        assert summary.problem is None
        assert (summary.rows, summary.oldest_created) == (5, 1.7e9 + 1)
        assert summary.counters["accepted"] == 5
        assert summary.epoch == outbox.epoch
        assert summary.disk_bytes == path.stat().st_size + wal.stat().st_size
        outbox.append(_records(6, 6))  # the writer is not locked out
        assert outbox.stats().rows == 6
        assert inspect_buffer(path).rows == 6
    finally:
        outbox.close()


def test_a_missing_file_is_reported_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    summary = inspect_buffer(path)
    assert summary.problem == "unreadable: No such file or directory"
    assert (summary.rows, summary.disk_bytes, summary.counters, summary.epoch) == (0, 0, {}, None)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_database_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    path.write_bytes(b"hello world\n" * 500)
    before = _state(tmp_path)
    summary = inspect_buffer(path)
    assert summary.problem == "unreadable: file is not a database"
    assert summary.disk_bytes == 6000
    assert _state(tmp_path) == before


def test_damaged_pages_are_found_by_quick_check_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Outbox(path, 1 << 20) as outbox:
        outbox.append(_records(1, 200, b"{}" * 300))
    with sqlite3.connect(path) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    data[3 * page + 100 : 3 * page + 400] = bytes(300)  # cells of a table page, not its header
    path.write_bytes(bytes(data))
    before = _state(tmp_path)

    summary = inspect_buffer(path)

    assert summary.problem is not None and summary.problem.startswith("quick_check: "), summary.problem
    assert "On tree page" in summary.problem
    assert (summary.counters, summary.epoch) == ({}, None)  # a damaged file's numbers are not reported
    assert _state(tmp_path) == before

    data[page + 8 : 2 * page] = b"\xff" * (page - 8)  # a whole page garbled: SQLite refuses to read on
    path.write_bytes(bytes(data))
    assert inspect_buffer(path).problem == "unreadable: database disk image is malformed"


def test_a_newer_schema_is_read_and_flagged(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Outbox(path, 1 << 20) as outbox:
        outbox.append(_records(1, 1))
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    summary = inspect_buffer(path)
    assert summary.problem is None and summary.newer_schema
    assert (summary.schema_version, summary.rows) == (SCHEMA_VERSION + 1, 1)


def test_an_empty_file_is_an_empty_buffer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    path.write_bytes(b"")
    summary = inspect_buffer(path)
    assert summary.problem is None
    assert (summary.rows, summary.oldest_created, summary.counters, summary.epoch) == (0, None, {}, None)
    assert summary.schema_version == 0 and summary.disk_bytes == 0
