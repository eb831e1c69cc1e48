"""The buffer file damaged under a running agent (issue 12): a real agent process, a real
Mosquitto, a counting subscriber. Nothing may be lost without being counted, delivery must
resume within seconds without a restart, and a (device, seqepoch, seq) key is never reused."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.store.salvage import seq_ranges
from tests.conftest import Mosquitto, Subscriber, buffer_counters, last_seqs, wait_for, write_config

BURSTY = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 10ms, burst: 8}\n"
    "  - {id: meter-2, driver: virtual, kind: meter, interval: 10ms, burst: 8}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 50ms}\n"
)
DEVICES = ("meter-1", "meter-2", "bay-a1")


def by_epoch(sub: Subscriber, device: str) -> dict[str, dict[int, set[str]]]:
    """seqepoch -> seq -> the distinct event ids received with it."""
    seen: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for e in sub.snapshot():
        if e["device"] == device:
            seen[e.get("seqepoch", "")][e["seq"]].add(e["id"])
    return seen


@pytest.mark.timeout(120)
def test_live_truncation_during_an_outage_is_recovered_without_a_restart(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port, client_id="truncation-subscriber")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=BURSTY, health="2s")
    buffer = tmp_path / "buffer.db"
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 50, 20, "first events")

    broker.stop()
    time.sleep(5)  # a backlog of several MB
    db = sqlite3.connect(buffer)
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # in the main file, as it is after a while
    db.close()
    os.truncate(buffer, buffer.stat().st_size // 3)
    time.sleep(0.5)
    back = datetime.now(UTC)
    broker.start()
    started = time.monotonic()

    def live() -> bool:
        return any(datetime.fromisoformat(e["time"]) > back for e in sub.snapshot() if e["device"] == "meter-1")

    wait_for(live, 15, "live events after the broker came back")
    resumed = time.monotonic() - started
    print(f"live delivery resumed {resumed:.1f} s after the broker came back")
    assert resumed <= 10
    assert agent.proc is not None and agent.proc.poll() is None  # no restart, no crash
    time.sleep(2)
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    sub.wait_quiet()  # what the broker acknowledged has reached the subscriber
    log = agent.output()
    assert "is corrupt" in log and "Traceback" not in log

    c = buffer_counters(buffer)
    drops = sum(v for k, v in c.items() if k.startswith("dropped_"))
    buffered = c["accepted"] - c["delivered"] - drops
    assert buffered >= 0
    # Every seq handed out either arrived or is counted: lost uncounted = 0.
    last = last_seqs(buffer)
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True)
    still = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    db.close()
    assert still == buffered
    missing = 0
    for device in DEVICES:
        epochs = by_epoch(sub, device)
        assert len(epochs) == 1, epochs.keys()  # a live replacement keeps the epoch
        seqs = next(iter(epochs.values()))
        assert all(len(ids) == 1 for ids in seqs.values())  # a seq never carries two events
        gone = set(range(1, last[device] + 1)) - set(seqs)
        print(device, "last", last[device], "missing", seq_ranges(gone))
        missing += len(gone)
    assert c["dropped_corrupt"] > 0
    assert not sub.garbage  # a damaged event is never published
    # No loss goes uncounted: every seq that never arrived is counted. The count may exceed it by
    # what was in flight when the broker stopped: a message the broker forwarded but whose PUBACK
    # the stop cut off is still buffered, so it is lost with the file and counted, though the
    # subscriber has it (QoS 1's ambiguity, seen once: 5,071 missing, 5,072 counted). At most one
    # in-flight window (max_inflight, 100).
    counted = c["dropped_corrupt"] + buffered
    assert missing <= counted <= missing + 100, (missing, c)
    health = [e for e in sub.snapshot() if e["type"] == "city.gateway.health"]
    assert any(e["data"]["accounting"]["dropped"].get("corrupt") for e in health)
    reported = [d for e in health for d in e["data"]["dropped_since_last_report"] if d["reason"] == "corrupt"]
    assert reported and all(d["device"] in DEVICES and d["seqs"] for d in reported)


@pytest.mark.timeout(90)
def test_a_write_ahead_log_lost_before_a_crash_never_reuses_a_seq(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port, client_id="wal-loss-subscriber")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=BURSTY)
    buffer = tmp_path / "buffer.db"
    first = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 300, 20, "first events")
    Path(f"{buffer}-wal").unlink()  # an operator "cleans up" while the agent runs
    time.sleep(1)
    first.kill()
    second = agent_factory(config)
    wait_for(lambda: len({e.get("seqepoch") for e in sub.snapshot() if e["device"] == "meter-1"}) == 2, 20,
             "events of a new epoch")  # fmt: skip
    time.sleep(1)
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0
    for device in DEVICES:
        for epoch, seqs in by_epoch(sub, device).items():
            reused = {s: ids for s, ids in seqs.items() if len(ids) > 1}
            assert not reused, (device, epoch, list(reused.items())[:3])
    assert "write-ahead log" in second.output()
