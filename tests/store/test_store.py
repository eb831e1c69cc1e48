"""The event store: sequencing, group commit and the order the uplink drains in."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test

from agent.contract.events import Priority, Reading
from agent.store.outbox import Outbox
from tests.store.helpers import StoreOnLoop, make_store, reading


def test_seq_is_per_device_and_continues_after_reopen(tmp_path: Path) -> None:
    async def run() -> list[tuple[str, int]]:
        out = []
        for _ in range(2):
            store = make_store(tmp_path / "b.db")
            await store.open()
            for n in range(3):
                store.submit("a", reading(n), Priority.TELEMETRY)
                store.submit("b", reading(n), Priority.TELEMETRY)
            await store.flush()
            rows = await store.main.next_batch({}, 100)
            out = [(r.device, r.seq) for r in rows]
            await store.main.ack([r.id for r in rows])
            await store.close()
        return out

    assert asyncio.run(run()) == [(d, s) for s in (4, 5, 6) for d in ("a", "b")]


def test_unencodable_reading_is_dropped_without_a_seq_gap(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], int]:
        store = make_store(tmp_path / "b.db")
        await store.open()
        store.submit("a", reading(1), Priority.TELEMETRY)
        store.submit("a", Reading("city.meter.reading", {"v": float("nan")}), Priority.TELEMETRY)
        store.submit("a", reading(2), Priority.TELEMETRY)
        await store.flush()
        rows = await store.main.next_batch({}, 10)
        await store.close()
        return [json.loads(r.payload)["seq"] for r in rows], store.not_accepted

    seqs, refused = asyncio.run(run())
    assert seqs == [1, 2]
    assert refused == 1


def test_next_batch_drains_highest_class_first_and_follows_cursors(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], list[int]]:
        store = make_store(tmp_path / "b.db")
        await store.open()
        for n in range(4):
            store.submit("m", reading(n), Priority.TELEMETRY)
            store.submit("s", Reading("city.device.status", {"n": n}), Priority.ALARM)
        await store.flush()
        first = await store.main.next_batch({}, 6)
        cursors: dict[int, int] = {}
        for row in first:
            cursors[row.priority] = row.id
        second = await store.main.next_batch(cursors, 10)
        await store.close()
        return [r.priority for r in first], [r.priority for r in second]

    first, second = asyncio.run(run())
    assert first == [2, 2, 2, 2, 0, 0]
    assert second == [0, 0]


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    async def run() -> None:
        store = make_store(tmp_path / "b.db")
        await store.open()
        writer = asyncio.create_task(store.run_writer())
        for n in range(1000):
            store.submit("a", reading(n), Priority.TELEMETRY)
        writer.cancel()
        await store.close()

    asyncio.run(run())
    with Outbox(tmp_path / "b.db", 1 << 30) as outbox:
        assert outbox.stats().rows == 1000
        assert outbox.last_seqs() == {"a": 1000}


class StoreMachine(StoreOnLoop):
    """The uplink's view through reconnects: every unacknowledged event, in order, once per session.

    Exercises the in-memory tail and the file path together (a tiny TAIL_MAX forces overflow).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seq = dict.fromkeys(range(3), 0)
        self.unacked: dict[int, list[int]] = {p: [] for p in range(3)}  # seqs, per class, in order
        self.cursors: dict[int, int] = {}
        self.expected: dict[int, list[int]] = {p: [] for p in range(3)}  # this session, in order
        self.taken: dict[int, list[tuple[int, int]]] = {p: [] for p in range(3)}  # (id, seq)
        self.acked_ids: set[int] = set()

    @rule(priority=st.integers(0, 2), count=st.integers(1, 6))
    def commit(self, priority: int, count: int) -> None:
        for _ in range(count):
            self.seq[priority] += 1
            self.store.submit(f"d{priority}", reading(self.seq[priority]), priority)
            self.unacked[priority].append(self.seq[priority])
            self.expected[priority].append(self.seq[priority])
        self.loop.run_until_complete(self.store.flush())

    @rule(limit=st.integers(1, 8))
    def take(self, limit: int) -> None:
        rows = self.loop.run_until_complete(self.store.main.next_batch(self.cursors, limit))
        assert len(rows) <= limit
        assert [r.priority for r in rows] == sorted((r.priority for r in rows), reverse=True)
        for row in rows:
            self.cursors[row.priority] = row.id
            self.taken[row.priority].append((row.id, row.seq))

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        pending = [(p, i, q) for p in range(3) for i, q in self.taken[p] if i not in self.acked_ids]
        chosen = data.draw(st.lists(st.sampled_from(pending), unique=True)) if pending else []
        self.loop.run_until_complete(self.store.main.ack([i for _, i, _ in chosen]))
        for p, i, q in chosen:
            self.acked_ids.add(i)
            self.unacked[p].remove(q)

    @rule()
    def reconnect(self) -> None:
        self.cursors = {}
        self.expected = {p: list(self.unacked[p]) for p in range(3)}
        self.taken = {p: [] for p in range(3)}

    @invariant()
    def each_session_sees_a_prefix_of_what_is_unacked_in_order(self) -> None:
        for p in range(3):
            seqs = [q for _, q in self.taken[p]]
            assert seqs == self.expected[p][: len(seqs)], (p, seqs, self.expected[p])


@pytest.mark.usefixtures("tiny_tail")
def test_uplink_view_through_reconnects() -> None:
    run_state_machine_as_test(StoreMachine, settings=settings(max_examples=60, stateful_step_count=30, deadline=None))
