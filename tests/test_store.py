"""The event store: sequencing, group commit and the order the uplink drains in."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.buffer import Outbox
from agent.events import Priority, Reading
from agent.store import EventStore


def _store(path: Path, max_bytes: int = 1 << 30) -> EventStore:
    return EventStore(lambda: Outbox(path, max_bytes), gateway="gw-1", topic_prefix="ioc/v1")


def _reading(n: int) -> Reading:
    measurement = {"quantity": "x", "value": n, "unit": "", "quality": "good"}
    return Reading("city.meter.reading", {"measurements": [measurement]})


def test_seq_is_per_device_and_continues_after_reopen(tmp_path: Path) -> None:
    async def run() -> list[tuple[str, int]]:
        out = []
        for _ in range(2):
            store = _store(tmp_path / "b.db")
            await store.open()
            for n in range(3):
                store.submit("a", _reading(n), Priority.TELEMETRY)
                store.submit("b", _reading(n), Priority.TELEMETRY)
            await store.flush()
            rows = await store.next_batch({}, 100)
            out = [(r.device, r.seq) for r in rows]
            await store.ack([r.id for r in rows])
            await store.close()
        return out

    assert asyncio.run(run()) == [(d, s) for s in (4, 5, 6) for d in ("a", "b")]


def test_unencodable_reading_is_dropped_without_a_seq_gap(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], int]:
        store = _store(tmp_path / "b.db")
        await store.open()
        store.submit("a", _reading(1), Priority.TELEMETRY)
        store.submit("a", Reading("city.meter.reading", {"v": float("nan")}), Priority.TELEMETRY)
        store.submit("a", _reading(2), Priority.TELEMETRY)
        await store.flush()
        rows = await store.next_batch({}, 10)
        await store.close()
        return [json.loads(r.payload)["seq"] for r in rows], store.not_accepted

    seqs, refused = asyncio.run(run())
    assert seqs == [1, 2]
    assert refused == 1


def test_next_batch_drains_highest_class_first_and_follows_cursors(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], list[int]]:
        store = _store(tmp_path / "b.db")
        await store.open()
        for n in range(4):
            store.submit("m", _reading(n), Priority.TELEMETRY)
            store.submit("s", Reading("city.device.status", {"n": n}), Priority.ALARM)
        await store.flush()
        first = await store.next_batch({}, 6)
        cursors: dict[int, int] = {}
        for row in first:
            cursors[row.priority] = row.id
        second = await store.next_batch(cursors, 10)
        await store.close()
        return [r.priority for r in first], [r.priority for r in second]

    first, second = asyncio.run(run())
    assert first == [2, 2, 2, 2, 0, 0]
    assert second == [0, 0]


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    async def run() -> None:
        store = _store(tmp_path / "b.db")
        await store.open()
        writer = asyncio.create_task(store.run_writer())
        for n in range(1000):
            store.submit("a", _reading(n), Priority.TELEMETRY)
        writer.cancel()
        await store.close()

    asyncio.run(run())
    with Outbox(tmp_path / "b.db", 1 << 30) as outbox:
        assert outbox.stats().rows == 1000
        assert outbox.last_seqs() == {"a": 1000}
