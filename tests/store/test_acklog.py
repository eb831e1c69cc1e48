"""The ack log (agent/store/acklog.py): acks survive a process crash and never delete what was not acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from agent.store.outbox import Outbox, Record
from agent.store.records import BufferStats

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "acklog_crash_child.py"


def records(first: int, n: int) -> list[Record]:
    return [Record("d", "t", 1, s, "", b"p%d" % s, 1000.0 + s) for s in range(first, first + n)]


def identity_holds(stats: BufferStats) -> bool:
    return stats.accepted == stats.delivered + stats.dropped + stats.rows


def remaining_seqs(box: Outbox) -> list[int]:
    return [r.seq for r in box.peek(1, 0, 1000)]


def test_logged_acks_survive_sigkill_and_are_applied_at_the_next_open(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), "50", "30"], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "logged"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    # The kill left the rows in the file and their ids in the log only.
    assert Path(f"{db}-acks").stat().st_size > 0
    with Outbox(db, max_bytes=1 << 30) as box:
        stats = box.stats()
        assert remaining_seqs(box) == list(range(31, 51))
        assert (stats.accepted, stats.delivered, stats.rows) == (50, 30, 20)
        assert identity_holds(stats)
    assert not Path(f"{db}-acks").exists()  # a clean close leaves no log behind


def test_a_log_is_applied_once_and_acks_after_it_still_count(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    crashed = Outbox(db, max_bytes=1 << 30)  # never closed: stands in for a crashed process
    first = crashed.append(records(1, 10)).first_id
    crashed.ack_later([first, first + 1, first + 2])
    with Outbox(db, max_bytes=1 << 30) as box:
        assert remaining_seqs(box) == list(range(4, 11))
        box.ack_later([first + 2, first + 3])  # a repeated PUBACK is not a second delivery
        assert box.apply_acks() == 1
        stats = box.stats()
        assert (stats.delivered, stats.rows) == (4, 6)
        assert identity_holds(stats)
    with Outbox(db, max_bytes=1 << 30) as box:  # the old log is not applied a second time
        stats = box.stats()
        assert (stats.delivered, stats.rows) == (4, 6)


def test_a_damaged_record_ends_the_replay_and_a_foreign_log_is_ignored(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    crashed = Outbox(db, max_bytes=1 << 30)
    first = crashed.append(records(1, 10)).first_id
    crashed.ack_later([first])
    crashed.ack_later([first + 1])
    log = Path(f"{db}-acks")
    data = bytearray(log.read_bytes())
    data[-1] ^= 0xFF  # the second record's id is garbled: its CRC no longer matches
    log.write_bytes(bytes(data))
    with Outbox(db, max_bytes=1 << 30) as box:
        assert remaining_seqs(box) == list(range(2, 11))
        box.ack_later([first + 1])  # logged under this opening's token
        other = tmp_path / "other.db"
        with Outbox(other, max_bytes=1 << 30) as fresh:
            fresh.append(records(1, 10))
        # Another file's log beside this one (a copied or restored file): its token does not match.
        Path(f"{other}-acks").write_bytes(log.read_bytes())
    with Outbox(other, max_bytes=1 << 30) as fresh:
        assert remaining_seqs(fresh) == list(range(1, 11))
        assert identity_holds(fresh.stats())


def test_stats_count_logged_acks_as_delivered(tmp_path: Path) -> None:
    with Outbox(tmp_path / "b.db", max_bytes=1 << 30) as box:
        first = box.append(records(1, 5)).first_id
        box.ack_later([first, first + 1])
        stats = box.stats()
        assert (stats.delivered, stats.rows) == (2, 3)
        assert box.acks.highest == 0
        box.ack_later([first + 2])
        assert box.acks.highest == first + 2  # not applied until asked: no transaction per ack
