"""Tests of the durable outbox against real SQLite files."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.errors import BufferError_
from agent.store.outbox import (
    DISK_FULL_MIN_EVICT,
    SCHEMA_VERSION,
    BufferFullError,
    BufferSchemaError,
    BufferStats,
    Dropped,
    Outbox,
    Record,
    Stored,
    row_size,
)

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "buffer_crash_child.py"
PAGE = 4096  # SQLite's default page size, which the buffer keeps


def rec(
    seq: int = 1,
    priority: int = 0,
    *,
    device: str = "d",
    type_: str = "t",
    payload: bytes = b"x" * 100,
) -> Record:
    return Record(device, type_, priority, seq, f"site/{device}", payload, 1000.0 + seq)


def size_of(r: Record) -> int:
    return row_size(r.device, r.type, r.topic, r.payload)


def all_rows(box: Outbox) -> list[Stored]:
    rows: list[Stored] = []
    for priority in box.priorities():
        after = 0
        while page := box.peek(priority, after, 1000):
            rows.extend(page)
            after = page[-1].id
    return sorted(rows, key=lambda s: s.id)


def assert_balanced(stats: BufferStats) -> None:
    assert stats.accepted == stats.delivered + stats.rows + stats.dropped
    assert stats.dropped == (
        stats.dropped_capacity + stats.dropped_disk_full + stats.dropped_media_quota + stats.dropped_corrupt
    )


def corrupt(path: Path, pages: list[int], seed: int = 7) -> None:
    """Overwrite whole pages (0-based) of a closed database with random bytes."""
    rng = random.Random(seed)
    with path.open("r+b") as f:
        for page in pages:
            f.seek(page * PAGE)
            f.write(rng.randbytes(PAGE))


# --- round trip, paging, sequences --------------------------------------------------------------


def test_round_trip_orders_by_id_within_priority(tmp_path: Path) -> None:
    records = [rec(1, 0), rec(2, 2), rec(3, 0), rec(4, 1), rec(5, 0)]
    with Outbox(tmp_path / "buf.db", 1 << 20) as box:
        result = box.append(records)
        assert result.accepted == 5
        assert result.dropped == []
        assert box.priorities() == [2, 1, 0]

        telemetry = box.peek(0, 0, 10)
        assert [s.seq for s in telemetry] == [1, 3, 5]
        assert [s.id for s in telemetry] == sorted(s.id for s in telemetry)
        first = telemetry[0]
        assert (first.device, first.type, first.topic, first.payload, first.created) == (
            "d",
            "t",
            "site/d",
            b"x" * 100,
            1001.0,
        )
        assert [s.seq for s in box.peek(2, 0, 10)] == [2]

        assert box.ack([s.id for s in telemetry]) == 3
        assert box.peek(0, 0, 10) == []
        assert box.priorities() == [2, 1]
        stats = box.stats()
        assert (stats.rows, stats.delivered, stats.accepted) == (2, 3, 5)
        assert stats.rows_by_priority == {2: 1, 1: 1}
        assert stats.bytes == size_of(records[1]) + size_of(records[3])
        assert stats.oldest_created == 1002.0
        assert_balanced(stats)


def test_peek_pages_with_after_id(tmp_path: Path) -> None:
    with Outbox(tmp_path / "buf.db", 1 << 20) as box:
        box.append([rec(n, 1) for n in range(1, 11)] + [rec(100, 0)])
        first = box.peek(1, 0, 4)
        second = box.peek(1, first[-1].id, 4)
        third = box.peek(1, second[-1].id, 4)
        assert [len(first), len(second), len(third)] == [4, 4, 2]
        assert [s.seq for s in first + second + third] == list(range(1, 11))
        assert box.peek(1, third[-1].id, 4) == []


def test_seq_survives_ack_of_every_row_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with Outbox(path, 1 << 20) as box:
        box.append([rec(n, device="a") for n in range(1, 6)] + [rec(9, device="b")])
        assert box.ack([s.id for s in all_rows(box)]) == 6
        assert box.stats().rows == 0
    with Outbox(path, 1 << 20) as box:
        assert box.last_seqs() == {"a": 5, "b": 9}


def test_sequences_never_go_backwards(tmp_path: Path) -> None:
    with Outbox(tmp_path / "buf.db", 1 << 20) as box:
        box.append([rec(10, device="a")])
        box.append([rec(5, device="a"), rec(3, device="b")])
        assert box.last_seqs() == {"a": 10, "b": 3}
        box.append([rec(12, device="a"), rec(11, device="a")])  # max of the batch, not the last
        assert box.last_seqs() == {"a": 12, "b": 3}


# --- eviction -----------------------------------------------------------------------------------


def test_eviction_takes_oldest_of_lowest_priority_first(tmp_path: Path) -> None:
    size = size_of(rec())
    with Outbox(tmp_path / "buf.db", 10 * size) as box:
        box.append([rec(1, 2), rec(2, 2), rec(3, 1), rec(4, 1), rec(5, 1)])
        box.append([rec(n, 0, device="ab"[n % 2]) for n in range(6, 11)])
        assert box.stats().bytes == 10 * size  # exactly full: nothing evicted yet

        result = box.append([rec(11, 0), rec(12, 0), rec(13, 0)])
        assert result.accepted == 3
        # Seqs 6, 7, 8 are the oldest telemetry: devices a, b, a.
        assert result.dropped == [
            Dropped("a", "t", 0, 2, "capacity"),
            Dropped("b", "t", 0, 1, "capacity"),
        ]
        assert [s.seq for s in box.peek(0, 0, 100)] == [9, 10, 11, 12, 13]
        assert [s.seq for s in box.peek(2, 0, 100)] == [1, 2]
        stats = box.stats()
        assert stats.bytes <= stats.max_bytes
        assert stats.dropped_capacity == 3
        assert_balanced(stats)


def test_alarms_go_only_when_no_lower_class_remains(tmp_path: Path) -> None:
    size = size_of(rec())
    with Outbox(tmp_path / "buf.db", 6 * size) as box:
        box.append([rec(1, 2), rec(2, 0), rec(3, 1), rec(4, 2), rec(5, 0), rec(6, 1)])
        result = box.append([rec(n, 2) for n in range(7, 11)])
        assert result.dropped == [
            Dropped("d", "t", 0, 2, "capacity"),
            Dropped("d", "t", 1, 2, "capacity"),
        ]
        assert box.priorities() == [2]

        result = box.append([rec(11, 2), rec(12, 2)])
        assert result.dropped == [Dropped("d", "t", 2, 2, "capacity")]
        assert [s.seq for s in all_rows(box)] == [7, 8, 9, 10, 11, 12]  # alarms 1 and 4 went


def test_media_quota_evicts_oldest_snapshots_only(tmp_path: Path) -> None:
    picture = rec(payload=b"j" * 1000, device="cam", type_="city.camera.snapshot")
    reading = rec()
    quota = 3 * size_of(picture)
    with Outbox(tmp_path / "buf.db", 100 * size_of(reading) + quota, media_max_bytes=quota) as box:
        box.append([rec(n) for n in range(1, 6)])
        box.append([rec(n, -1, device="cam", type_="city.camera.snapshot", payload=b"j" * 1000) for n in (1, 2, 3)])
        assert box.stats().dropped == 0  # exactly at the quota

        result = box.append([rec(6), rec(4, -1, device="cam", type_="city.camera.snapshot", payload=b"j" * 1000)])
        assert result.dropped == [Dropped("cam", "city.camera.snapshot", -1, 1, "media_quota")]
        assert [s.seq for s in box.peek(-1, 0, 10)] == [2, 3, 4]  # the oldest picture went
        assert [s.seq for s in box.peek(0, 0, 10)] == [1, 2, 3, 4, 5, 6]  # readings untouched
        stats = box.stats()
        assert stats.dropped_media_quota == 1
        assert_balanced(stats)
    # The counter survives a reopen, and a file from before the quota existed gains it.
    with Outbox(tmp_path / "buf.db", 1 << 20) as box:
        assert box.stats().dropped_media_quota == 1


def test_media_is_evicted_first_when_the_buffer_is_full(tmp_path: Path) -> None:
    size = size_of(rec())
    with Outbox(tmp_path / "buf.db", 4 * size, media_max_bytes=4 * size) as box:
        box.append([rec(1, -1), rec(1, 0), rec(2, -1), rec(2, 0)])
        result = box.append([rec(3, 0)])
        assert result.dropped == [Dropped("d", "t", -1, 1, "capacity")]  # not the older telemetry
        assert [(s.priority, s.seq) for s in all_rows(box)] == [(0, 1), (-1, 2), (0, 2), (0, 3)]
        assert_balanced(box.stats())


def test_batch_larger_than_capacity_evicts_its_own_oldest_rows(tmp_path: Path) -> None:
    size = size_of(rec())
    with Outbox(tmp_path / "buf.db", 3 * size) as box:
        box.append([rec(1, 1)])
        result = box.append([rec(n, 0) for n in range(2, 7)])
        assert result.accepted == 5
        assert result.dropped == [Dropped("d", "t", 0, 3, "capacity")]
        assert [s.seq for s in all_rows(box)] == [1, 5, 6]
        assert box.last_seqs() == {"d": 6}  # evicted rows still advance the sequence
        assert_balanced(box.stats())


def test_ack_of_evicted_id_is_not_delivered(tmp_path: Path) -> None:
    size = size_of(rec())
    with Outbox(tmp_path / "buf.db", 2 * size) as box:
        box.append([rec(1), rec(2)])
        in_flight = [s.id for s in box.peek(0, 0, 10)]
        box.append([rec(3), rec(4)])  # evicts both in-flight rows
        assert box.ack([*in_flight, in_flight[0], 999_999]) == 0
        survivor = box.peek(0, 0, 10)[0].id
        assert box.ack([survivor, survivor, *in_flight]) == 1
        stats = box.stats()
        assert (stats.delivered, stats.dropped_capacity, stats.rows) == (1, 2, 1)
        assert stats.bytes == size
        assert_balanced(stats)


class OutboxMachine(RuleBasedStateMachine):
    """Random appends, acks and reopens checked against a model of the eviction order."""

    MAX_BYTES = 4000

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-"))
        self.path = self.dir / "buf.db"
        self.box = Outbox(self.path, self.MAX_BYTES, synchronous="OFF")
        self.model: dict[int, tuple[int, int, str]] = {}  # id -> (priority, size, device)
        self.next_id = 1  # AUTOINCREMENT hands out consecutive ids when nothing fails
        self.seqs: dict[str, int] = {}

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from("ab"), st.integers(0, 2), st.integers(0, 1500)),
            min_size=1,
            max_size=6,
        )
    )
    def append(self, batch: list[tuple[str, int, int]]) -> None:
        records = []
        for device, priority, length in batch:
            self.seqs[device] = self.seqs.get(device, 0) + 1
            records.append(rec(self.seqs[device], priority, device=device, payload=b"p" * length))
        for r in records:
            self.model[self.next_id] = (r.priority, size_of(r), r.device)
            self.next_id += 1
        expected: Counter[tuple[str, int]] = Counter()
        total = sum(size for _, size, _ in self.model.values())
        for row_id in sorted(self.model, key=lambda i: (self.model[i][0], i)):
            if total <= self.MAX_BYTES:
                break
            priority, size, device = self.model.pop(row_id)
            total -= size
            expected[device, priority] += 1

        result = self.box.append(records)
        assert result.accepted == len(records)
        assert {(d.device, d.priority): d.count for d in result.dropped} == dict(expected)
        assert all(d.reason == "capacity" for d in result.dropped)

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.integers(1, self.next_id), max_size=8))
        expected = len(set(ids) & self.model.keys())
        for row_id in ids:
            self.model.pop(row_id, None)
        assert self.box.ack(ids) == expected

    @rule()
    def reopen(self) -> None:
        self.box.close()
        self.box = Outbox(self.path, self.MAX_BYTES, synchronous="OFF")

    @invariant()
    def matches_model(self) -> None:
        stats = self.box.stats()
        assert_balanced(stats)
        assert stats.bytes <= self.MAX_BYTES
        assert stats.bytes == sum(size for _, size, _ in self.model.values())
        assert [s.id for s in all_rows(self.box)] == sorted(self.model)
        assert self.box.last_seqs() == self.seqs

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxModel = OutboxMachine.TestCase
TestOutboxModel.settings = settings(max_examples=30, stateful_step_count=15, deadline=None, database=None)


# --- crash safety -------------------------------------------------------------------------------


def test_no_committed_event_is_lost_to_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random()
    printed: list[int] = []
    for _ in range(4):
        child = subprocess.Popen([sys.executable, str(CHILD), str(path)], stdout=subprocess.PIPE, env=env)
        try:
            child.communicate(timeout=rng.uniform(0.4, 0.9))
            pytest.fail("the crash child exited on its own")
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        # A line without its newline was cut by the kill mid-write.
        printed += [int(line) for line in out.decode().splitlines(keepends=True) if line.endswith("\n")]

        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with Outbox(path, 1 << 30) as box:
            assert box.quarantined is None
            seqs = [s.seq for s in all_rows(box)]
            # Gapless from 1: every printed (committed) batch is whole, and restarts resumed
            # from the stored seq. The child may have committed one batch it never printed.
            assert sorted(seqs) == list(range(1, len(seqs) + 1))
            assert max(seqs) >= max(printed)
            assert box.last_seqs() == {"dev": max(seqs)}
            assert_balanced(box.stats())
    assert len(printed) > 4


# --- corruption ---------------------------------------------------------------------------------


def fill(path: Path, batches: int, per_batch: int = 100, devices: int = 5) -> dict[str, int]:
    with Outbox(path, 1 << 30, synchronous="OFF") as box:
        for b in range(batches):
            box.append(
                [
                    rec(b * per_batch + i, d % 3, device=f"dev{d}", payload=bytes([i]) * 150)
                    for d in range(devices)
                    for i in range(per_batch // devices)
                ]
            )
        return box.last_seqs()


def assert_quarantined(box: Outbox, path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert box.quarantined is not None
    assert box.quarantined.exists()
    assert box.quarantined.parent == path.parent
    assert box.quarantined.name.startswith(f"{path.name}.corrupt-")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in errors[0]
    assert str(box.quarantined) in errors[0]
    assert "safe to delete" in errors[0]
    # At most one more line: what could not be salvaged, counted (or that it cannot be counted).
    assert len(errors) <= 2
    stats = box.stats()
    if stats.dropped_corrupt:
        assert f"{stats.dropped_corrupt} events could not be salvaged" in errors[1]
    # The fresh buffer works.
    box.append([rec(1_000_000, device="fresh")])
    assert box.peek(0, 0, 10**6)[-1].seq == 1_000_000
    assert_balanced(box.stats())


@pytest.mark.parametrize("damage", ["header", "random_pages", "zeroed"])
def test_corrupt_file_is_quarantined_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "buf.db"
    fill(path, batches=5)
    pages = path.stat().st_size // PAGE
    rng = random.Random(42)
    if damage == "zeroed":
        path.write_bytes(bytes(path.stat().st_size))
    else:
        corrupt(path, [0] if damage == "header" else rng.sample(range(1, pages), 5))
    original = path.read_bytes()

    caplog.set_level(logging.INFO, logger="agent.store.outbox")
    with Outbox(path, 1 << 20) as box:
        assert_quarantined(box, path, caplog)
        assert box.quarantined is not None
        assert box.quarantined.read_bytes() == original  # kept as it was, for forensics


def test_wal_left_by_a_crash_moves_with_the_quarantined_file(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    fill(path, batches=1)
    # A writer killed before its checkpoint leaves committed pages in buf.db-wal.
    crash = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
        " c.execute('UPDATE sequences SET seq = 77'); c.commit(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", crash, str(path)], check=True)
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 0
    corrupt(path, [0])

    with Outbox(path, 1 << 20) as box:
        assert box.quarantined is not None
        moved = box.quarantined.with_name(box.quarantined.name + "-wal")
        assert moved.exists()
        # The fresh file picked up nothing from the old WAL.
        assert box.last_seqs() == {}


def test_salvage_keeps_sequences_and_readable_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "buf.db"
    seqs = fill(path, batches=20)
    pages = path.stat().st_size // PAGE
    # The small tables' root pages come first; damage only the tail, where outbox grew.
    corrupt(path, list(range(pages - 3, pages)))

    caplog.set_level(logging.INFO, logger="agent.store.outbox")
    with Outbox(path, 1 << 30) as box:
        assert box.quarantined is not None
        assert box.last_seqs() == seqs
        rows = all_rows(box)
        assert 1000 < len(rows) < 2000  # most rows survived, the damaged pages' did not
        assert all(s.payload == bytes([s.seq % 100]) * 150 for s in rows)  # fill()'s pattern
        stats = box.stats()
        # The counters were readable: what was not salvaged is counted, not forgotten.
        assert stats.accepted == 2000
        assert stats.dropped_corrupt == 2000 - len(rows)
        assert stats.bytes == sum(row_size(s.device, s.type, s.topic, s.payload) for s in rows)
        assert_balanced(stats)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "partial" in warnings[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{2000 - len(rows)} events could not be salvaged" in errors[-1]


def test_corruption_found_at_runtime_is_recovered_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "buf.db"
    # Bigger than SQLite's default 2 MB page cache, so the damaged pages are read from disk.
    with Outbox(path, 1 << 30, synchronous="OFF") as box:
        for b in range(30):
            box.append([rec(b * 200 + i, i % 3, payload=b"y" * 1000) for i in range(200)])
    caplog.set_level(logging.INFO, logger="agent.store.outbox")
    with Outbox(path, 1 << 30) as box:
        assert box.quarantined is None
        corrupt(path, list(range(20, 60)))
        rows = box.peek(0, 0, 10_000)  # hits the damage, recovers, retries on the fresh file
        assert box.quarantined is not None
        assert 1500 < len(rows) < 2000
        assert box.last_seqs() == {"d": 5999}
        assert_quarantined(box, path, caplog)


# --- disk full ----------------------------------------------------------------------------------


def test_disk_full_evicts_oldest_lowest_class_and_retries(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    payload = b"z" * 10_000
    with Outbox(path, 1 << 30, synchronous="OFF", max_page_count=600) as box:
        box.append([rec(n, 2, payload=payload) for n in range(1, 21)])
        seq = 20
        for _ in range(1000):
            seq += 1
            result = box.append([rec(seq, 0, payload=payload)])
            if result.dropped:
                break
        else:
            pytest.fail("max_page_count never filled up")

        assert result.accepted == 1
        (dropped,) = result.dropped
        assert (dropped.priority, dropped.reason) == (0, "disk_full")
        assert dropped.count * size_of(rec(payload=payload)) >= DISK_FULL_MIN_EVICT
        telemetry = [s.seq for s in box.peek(0, 0, 10_000)]
        # The oldest telemetry went; the newest, including this append, is kept.
        assert telemetry == list(range(21 + dropped.count, seq + 1))
        assert [s.seq for s in box.peek(2, 0, 100)] == list(range(1, 21))
        stats = box.stats()
        assert stats.dropped_disk_full == dropped.count
        assert stats.dropped_capacity == 0
        assert_balanced(stats)


def test_disk_full_with_nothing_to_evict_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with Outbox(path, 1 << 30, max_page_count=20) as box:
        with pytest.raises(BufferFullError, match=str(path)) as info:
            box.append([rec(1, 2, payload=b"w" * 200_000)])
        assert isinstance(info.value, BufferError_)
        # Nothing half-written: the failed append left no row and no count behind.
        stats = box.stats()
        assert (stats.rows, stats.bytes, stats.accepted) == (0, 0, 0)
        assert box.last_seqs() == {}
        box.append([rec(2, 2)])
        assert box.stats().rows == 1


@pytest.mark.parametrize("batch", [100, 1000, 5000])
def test_a_small_volume_filled_in_big_commits_keeps_taking_events(small_volume: Path, batch: int) -> None:
    # A checkpoint can grow the file by the whole WAL at once; a WAL bigger than the reserve once
    # left the disk with no room for a checkpoint nor a DELETE: every later append and ack failed.
    payload = b"{" + b"m" * 540 + b"}"
    with Outbox(small_volume / "buf.db", 1 << 30) as box:
        seq = 0
        for _ in range((40 << 20) // (batch * 700)):  # ~40 MiB of rows through a 16 MiB volume
            box.append([rec(seq := seq + 1, payload=payload) for _ in range(batch)])
        stats = box.stats()
        assert stats.dropped_disk_full > 0 and stats.rows > 0
        assert_balanced(stats)
        oldest = box.peek(0, 0, 1000)
        assert box.ack([r.id for r in oldest]) == len(oldest)  # delivery still deletes
        assert shutil.disk_usage(small_volume).free > 0


# --- schema -------------------------------------------------------------------------------------


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    before = path.read_bytes()
    with pytest.raises(BufferSchemaError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer") as info:
        Outbox(path, 1 << 20)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_a_version_2_file_is_upgraded_with_its_rows(tmp_path: Path) -> None:
    """Version 2 rows carry a topic; they stay, in order and counted, once the file is version 3."""
    path = tmp_path / "buf.db"
    with Outbox(path, 1 << 20) as box:
        box.append([rec(n, device="m") for n in range(1, 4)])
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 2")
    raw.close()
    with Outbox(path, 1 << 20) as box:
        rows = box.peek(0, 0, 10)
        assert [(r.seq, r.topic) for r in rows] == [(1, "site/m"), (2, "site/m"), (3, "site/m")]
        assert box.stats().accepted == 3 and box.stats().rows == 3
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    raw.close()


def test_fresh_file_is_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "buf.db"
    Outbox(path, 1 << 20).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    raw.close()


def test_byte_total_is_recomputed_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    records = [rec(n, n % 3, payload=b"q" * n) for n in range(1, 30)]
    with Outbox(path, 1 << 20) as box:
        box.append(records)
        box.ack([s.id for s in box.peek(1, 0, 5)])
        before = box.stats()
    with Outbox(path, 1 << 20) as box:
        after = box.stats()
        remaining = all_rows(box)
    assert after == before
    assert after.rows == len(records) - 5
    assert after.bytes == sum(row_size(s.device, s.type, s.topic, s.payload) for s in remaining)


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Outbox(tmp_path / "a.db", 1 << 20, synchronous="FULL; DROP TABLE outbox")
    with pytest.raises(ValueError, match="max_bytes"):
        Outbox(tmp_path / "b.db", 0)
