"""The buffer under faults found by a hostile operator: live corruption, lost logs, foreign files,
full disks filled by someone else, evictions racing delivery (issue 12). Real files, real tmpfs."""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.outbox import (
    BufferPathError,
    BufferStats,
    Outbox,
    OutboxReader,
    Record,
    is_corruption,
)
from agent.store.salvage import buffer_path_problem

PAGE = 4096


def rec(seq: int, priority: int = 0, *, device: str = "d", payload: bytes = b"x" * 200) -> Record:
    return Record(device, "t", priority, seq, f"site/{device}", payload, 1000.0 + seq)


def balanced(stats: BufferStats) -> bool:
    return stats.accepted == stats.delivered + stats.rows + stats.dropped


def fill(box: Outbox, devices: int = 4, batches: int = 40, per: int = 50) -> None:
    seq = dict.fromkeys(range(devices), 0)
    for _ in range(batches):
        rows = []
        for d in range(devices):
            for _ in range(per // devices):
                seq[d] += 1
                rows.append(rec(seq[d], device=f"dev{d}", payload=b"%03d" % (seq[d] % 1000) * 100))
        box.append(rows)


# --- buffer.path that cannot be a buffer ---------------------------------------------------------


def test_a_foreign_file_is_refused_by_name_and_left_untouched(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("gateway: {id: gw-1}\n" * 50)
    before = site.read_bytes()
    with pytest.raises(BufferPathError, match=r"site\.yaml exists and is not a buffer file.*point buffer.path"):
        Outbox(site, 1 << 20)
    assert site.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]


def test_a_directory_at_buffer_path_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BufferPathError, match=r"is a directory; point buffer.path at a file, e.g. .*buffer.db"):
        Outbox(tmp_path, 1 << 20)


def test_buffer_path_problem_tells_damaged_buffers_from_foreign_files(tmp_path: Path) -> None:
    assert buffer_path_problem(tmp_path / "missing.db") is None
    (tmp_path / "empty.db").touch()
    assert buffer_path_problem(tmp_path / "empty.db") is None
    good = tmp_path / "good.db"
    with Outbox(good, 1 << 20) as box:
        fill(box, batches=5)
    assert buffer_path_problem(good) is None
    for name, damage in [
        ("zeroed", lambda b: bytes(len(b))),
        ("header", lambda b: random.Random(1).randbytes(PAGE) + b[PAGE:]),
        ("first-100", lambda b: bytes(100) + b[100:]),
    ]:
        damaged = tmp_path / f"{name}.db"
        damaged.write_bytes(damage(good.read_bytes()))
        assert buffer_path_problem(damaged) is None, name
    text = tmp_path / "notes.txt"
    text.write_text("x" * 8192)  # page-sized, but text: not a buffer
    assert "is not a buffer file" in (buffer_path_problem(text) or "")
    assert "is a directory" in (buffer_path_problem(tmp_path) or "")


@pytest.fixture
def read_only_volume(small_volume: Path) -> Iterator[Path]:
    with Outbox(small_volume / "buffer.db", 1 << 20) as box:
        fill(box, batches=2)
    subprocess.run(["mount", "-o", "remount,ro", str(small_volume)], check=True)
    try:
        yield small_volume
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_volume)], check=False)


def test_a_read_only_buffer_names_the_file_and_the_fix(read_only_volume: Path) -> None:
    path = read_only_volume / "buffer.db"
    with pytest.raises(BufferPathError) as info:
        Outbox(path, 1 << 20)
    assert str(path) in str(info.value)
    assert "read-only" in str(info.value)
    assert "chattr -i" in str(info.value)


def test_state_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "state" / "buffer.db"
        with Outbox(path, 1 << 20) as box:
            box.append([rec(1)])
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        path.chmod(0o644)  # an older agent's file is tightened on open
        Outbox(path, 1 << 20).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


# --- the sequence epoch ---------------------------------------------------------------------------

_CRASH = """
import os, sys
from agent.store.outbox import Outbox, Record
box = Outbox(sys.argv[1], 1 << 30)
for n in range(1, 201):
    box.append([Record("d", "t", 0, n, "site/d", b"y" * 100, 1000.0 + n)])
print(box.epoch, flush=True)
os._exit(0)  # no close: as a SIGKILL leaves it
"""


def crash_after_appends(path: Path) -> str:
    out = subprocess.run([sys.executable, "-c", _CRASH, str(path)], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_the_epoch_lasts_while_the_numbering_is_known(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Outbox(path, 1 << 20) as box:
        epoch = box.epoch
        assert len(epoch) == 16 and int(epoch, 16) >= 0
        box.append([rec(1)])
    with Outbox(path, 1 << 20) as box:
        assert box.epoch == epoch  # a clean restart
    assert crash_after_appends(path) == epoch
    with Outbox(path, 1 << 20) as box:
        assert box.epoch == epoch  # a crash with its log intact
        assert box.last_seqs() == {"d": 200}


def test_a_lost_write_ahead_log_starts_a_new_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "buffer.db"
    epoch = crash_after_appends(path)
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0  # the last commits live only there
    wal.unlink()
    Path(f"{path}-shm").unlink(missing_ok=True)
    with Outbox(path, 1 << 20) as box:
        # The main file knows fewer seqs than were handed out: numbering from it would reuse
        # (device, seq) pairs with new content, so the epoch changes.
        assert box.last_seqs()["d"] < 200
        assert box.epoch != epoch
    assert "write-ahead log" in caplog.text
    assert "new sequence epoch" in caplog.text


def test_a_zeroed_file_starts_a_new_epoch(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Outbox(path, 1 << 20) as box:
        fill(box, batches=3)
        epoch = box.epoch
    path.write_bytes(bytes(path.stat().st_size))
    with Outbox(path, 1 << 20) as box:
        assert box.quarantined is not None
        assert box.epoch != epoch


def test_salvage_with_intact_sequences_keeps_the_epoch(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Outbox(path, 1 << 30, synchronous="OFF") as box:
        fill(box, batches=40)
        epoch, seqs = box.epoch, box.last_seqs()
    pages = path.stat().st_size // PAGE
    with path.open("r+b") as f:  # the outbox's last pages; schema and sequences come first
        f.seek((pages - 3) * PAGE)
        f.write(random.Random(3).randbytes(3 * PAGE))
    with Outbox(path, 1 << 30) as box:
        assert box.quarantined is not None
        assert box.last_seqs() == seqs
        assert box.epoch == epoch


def read_everything(reader: OutboxReader) -> None:
    after = 0
    while rows := reader.peek(0, after, 100):
        after = rows[-1].id


# --- corruption found while running ---------------------------------------------------------------


def test_live_truncation_found_by_a_reader_is_recovered_and_counted(tmp_path: Path) -> None:
    """A third of the file is cut away while the agent runs: found by the uplink's read, which
    is not the writer's connection. The file is replaced within the call, new events flow, the
    loss is counted per device with its seq ranges, and the numbering and epoch carry on."""
    path = tmp_path / "buffer.db"
    box = Outbox(path, 1 << 30, synchronous="NORMAL")
    try:
        fill(box, devices=4, batches=60)
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # rows in the main file, as after a while
        epoch, seqs, before = box.epoch, box.last_seqs(), box.stats()
        os.truncate(path, path.stat().st_size // 3)

        reader = OutboxReader(path)
        with pytest.raises(sqlite3.DatabaseError) as info:
            read_everything(reader)
        reader.close()
        assert is_corruption(info.value)
        box.recover(info.value, box.generation)

        assert box.quarantined is not None
        assert box.epoch == epoch
        assert box.last_seqs() == seqs
        stats = box.stats()
        assert balanced(stats)
        assert stats.accepted == before.accepted
        lost = before.rows - stats.rows
        assert lost > 0
        assert stats.dropped_corrupt == lost
        assert sum(d.count for d in box.recovered_drops) == lost
        assert all(d.reason == "corrupt" and d.device.startswith("dev") and d.seqs for d in box.recovered_drops)
        # New events go on from the last seq, in the same epoch, and the file is sound.
        box.append([rec(seqs["dev0"] + 1, device="dev0")])
        assert box.last_seqs()["dev0"] == seqs["dev0"] + 1
        assert box._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        box.close()


def test_events_lost_in_flight_then_acknowledged_count_as_delivered(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    box = Outbox(path, 1 << 30, synchronous="NORMAL")
    try:
        fill(box, devices=2, batches=60)
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        last = box.next_id() - 1
        in_flight = list(range(last - 49, last + 1))  # the newest, at the file's end: handed to the broker
        os.truncate(path, PAGE * 4)
        reader = OutboxReader(path)
        with pytest.raises(sqlite3.DatabaseError) as info:
            read_everything(reader)
        reader.close()
        box.recover(info.value, box.generation)
        lost = box.stats().dropped_corrupt
        assert lost >= 50
        assert not {r.id for r in box.peek(0, last - 50, 100)}  # they went with the damaged pages
        box.ack(in_flight)  # but their PUBACKs come: the broker had them after all
        stats = box.stats()
        assert balanced(stats)
        assert stats.delivered == 50
        assert stats.dropped_corrupt == lost - 50
    finally:
        box.close()


# --- evictions racing delivery --------------------------------------------------------------------


def test_an_evicted_event_whose_puback_comes_counts_as_delivered(tmp_path: Path) -> None:
    with Outbox(tmp_path / "buffer.db", 30_000) as box:
        box.append([rec(n) for n in range(1, 101)])
        taken = box.peek(0, 0, 20)
        box.taken = {0: taken[-1].id}  # the uplink holds these in flight
        result = box.append([rec(n) for n in range(101, 161)])  # over max_bytes: the oldest go
        assert sum(d.count for d in result.dropped) >= 20
        assert box.ack([r.id for r in taken]) == 20
        stats = box.stats()
        assert stats.delivered == 20
        assert stats.dropped_capacity == sum(d.count for d in result.dropped) - 20
        assert balanced(stats)
        assert box.ack([r.id for r in taken]) == 0  # a second PUBACK is not a second delivery
        assert box.stats() == stats


def test_acks_survive_a_process_crash_and_restore_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    script = """
import os, sys
from agent.store.outbox import Outbox, Record
box = Outbox(sys.argv[1], 1 << 30)
box.append([Record("d", "t", 0, n, "site/d", b"y" * 100, 1.0) for n in range(1, 101)])
box.ack(list(range(1, 61)))
assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for appends
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    with Outbox(path, 1 << 30) as box:
        stats = box.stats()
        assert (stats.rows, stats.delivered) == (40, 60)


# --- a full disk filled by someone else -----------------------------------------------------------


def fill_disk(volume: Path) -> Path:
    """Take every free byte of ``volume`` with another program's file."""
    filler = volume / "other-program.log"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_disk_filled_by_another_program_still_takes_alarms_and_events(small_volume: Path) -> None:
    """R8: telemetry buffered during an outage, then another file takes every free byte. Alarms
    and events must still be accepted, by evicting telemetry (counted), never refused."""
    path = small_volume / "buffer.db"
    with Outbox(path, 1 << 30) as box:
        seq = 0
        for _ in range(20):  # about 4 MB of telemetry
            box.append([rec(seq := seq + 1, 0, payload=b"t" * 2000) for _ in range(100)])
        telemetry = box.stats().rows
        fill_disk(small_volume)
        accepted = refused = 0
        for round_ in range(5):
            batch = [
                *(rec(seq + i, 2, device="gateway", payload=b"a" * 1500) for i in range(1, 4)),
                *(rec(seq + i, 1, device="bay", payload=b"e" * 800) for i in range(4, 34)),
                *(rec(seq + i, 0, payload=b"t" * 2000) for i in range(34, 84)),
            ]
            seq += 84
            result = box.append(batch)
            accepted += result.accepted
            refused += result.refused
            # Alarms and events first: whatever was refused is telemetry only.
            assert result.accepted >= 33, f"round {round_}: {result}"
        stats = box.stats()
        assert balanced(stats)
        assert stats.rows_by_priority.get(2, 0) == 15 and stats.rows_by_priority.get(1, 0) == 150
        assert stats.dropped_disk_full > 0
        assert stats.rows_by_priority.get(0, 0) < telemetry
        assert box._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_keeping_the_disk_reserve_never_costs_the_alarms(small_volume: Path) -> None:
    """Less buffered than the 2 MiB reserve wants, and another file takes the disk: the
    precautionary eviction takes telemetry only; buffered alarms and events all stay."""
    path = small_volume / "buffer.db"
    with Outbox(path, 1 << 30) as box:
        box.append([rec(n, 2, device="gateway", payload=b"a" * 1000) for n in range(1, 101)])
        box.append([rec(n, 1, device="bay", payload=b"e" * 1000) for n in range(1, 101)])
        box.append([rec(n, 0, payload=b"t" * 2000) for n in range(1, 301)])
        fill_disk(small_volume)
        for n in range(101, 111):
            result = box.append([rec(n, 2, device="gateway", payload=b"a" * 1000)])
            assert result.accepted == 1
        stats = box.stats()
        assert stats.rows_by_priority[2] == 110
        assert stats.rows_by_priority[1] == 100
        assert stats.dropped_disk_full > 0
        assert balanced(stats)


def test_acks_logged_before_the_file_was_found_damaged_count_as_delivered(tmp_path: Path) -> None:
    """PUBACKs in the ack log, not yet applied, when a read finds the file damaged: the salvage
    counts their rows as lost with the file, the carried-over log then credits them back."""
    path = tmp_path / "buffer.db"
    box = Outbox(path, 1 << 30, synchronous="NORMAL")
    try:
        fill(box, devices=2, batches=60)
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        last = box.next_id() - 1
        acked = list(range(last - 29, last + 1))  # the newest, at the file's end
        box.ack_later(acked)
        os.truncate(path, PAGE * 4)
        reader = OutboxReader(path)
        with pytest.raises(sqlite3.DatabaseError) as info:
            read_everything(reader)
        reader.close()
        box.recover(info.value, box.generation)
        stats = box.stats()  # applies the log first
        assert balanced(stats)
        assert stats.delivered == 30
        lost_rows = stats.accepted - stats.delivered - stats.rows
        assert stats.dropped_corrupt == lost_rows > 0
    finally:
        box.close()
