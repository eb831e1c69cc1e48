"""The feed's live lane (Feed.next_lanes): events accepted during a session come at once while a
second cursor drains the backlog; acks from both lanes; a reopen keeps what was not acked."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test

from agent.contract.events import Priority
from agent.store import feed as feed_module
from agent.store.event_store import EventStore
from agent.store.outbox import Outbox
from agent.store.records import Lanes
from tests.store.helpers import StoreOnLoop, make_store, reading


def _store(path: Path, max_bytes: int = 1 << 30) -> EventStore:
    return make_store(path, max_bytes, feed="spb")


async def _submit(store: EventStore, device: str, count: int, priority: int = Priority.TELEMETRY) -> None:
    for n in range(count):
        store.submit(device, reading(n), priority)
    await store.flush()


async def _held(store: EventStore) -> tuple[int, int]:
    stats = await store.main.stats()
    return stats.accepted - stats.delivered - stats.dropped, stats.rows


def test_live_rows_come_at_once_while_the_backlog_cursor_is_behind(tmp_path: Path) -> None:
    async def run() -> None:
        store = _store(tmp_path / "b.db")
        await store.open()
        await _submit(store, "old", 50)  # accepted before the session: backlog
        feed, lanes = store.main, Lanes()
        first = await feed.next_lanes(lanes, 10, 5)
        assert [r.device for r in first] == ["old"] * 5 and all(r.backlog for r in first)
        await _submit(store, "new", 3)
        rows = await feed.next_lanes(lanes, 10)  # no backlog asked for: live only
        assert [(r.device, r.backlog) for r in rows] == [("new", False)] * 3
        more = await feed.next_lanes(lanes, 10, 10)
        assert [r.device for r in more] == ["old"] * 10, "the backlog goes on where it stopped"
        assert [r.id for r in more] == list(range(first[-1].id + 1, first[-1].id + 11))
        assert lanes.backlog[Priority.TELEMETRY] == more[-1].id and lanes.live[Priority.TELEMETRY] == rows[-1].id
        assert lanes.taken[Priority.TELEMETRY] == rows[-1].id
        await _submit(store, "newer", 2)
        rest = await feed.next_lanes(lanes, 0, 100)  # the backlog lane stops where the session began
        assert [(r.device, r.backlog) for r in rest] == [("old", True)] * 35
        assert Priority.TELEMETRY in lanes.drained
        assert [r.device for r in await feed.next_lanes(lanes, 10, 100)] == ["newer"] * 2
        await store.close()

    asyncio.run(run())


def test_acks_from_both_lanes_and_a_reopen_keeps_the_rest(tmp_path: Path) -> None:
    async def run() -> None:
        store = _store(tmp_path / "b.db")
        await store.open()
        await _submit(store, "old", 20)
        await _submit(store, "alarm", 4, Priority.ALARM)
        lanes = Lanes()
        backlog = await store.main.next_lanes(lanes, 100, 8)
        assert [r.priority for r in backlog] == [Priority.ALARM] * 4 + [Priority.TELEMETRY] * 4, "highest class first"
        await _submit(store, "new", 6)
        live = await store.main.next_lanes(lanes, 100)
        assert len(live) == 6
        acked = {r.id for r in backlog[:5]} | {r.id for r in live[:3]}
        assert await store.main.ack(sorted(acked)) == len(acked)
        held = (30 - len(acked), 30 - len(acked))
        for _ in range(100):  # the logged acks are deleted within ACK_APPLY_DELAY
            if await _held(store) == held:
                break
            await asyncio.sleep(feed_module.ACK_APPLY_DELAY / 10)
        assert await _held(store) == held
        # A crash: the store goes away without the uplink acking the rest.
        await store.close()
        store = _store(tmp_path / "b.db")
        await store.open()
        lanes = Lanes()
        again = await store.main.next_lanes(lanes, 100, 100)
        assert sorted(r.id for r in again) == sorted(set(range(1, 31)) - acked)
        assert all(r.backlog for r in again), "after a reopen every row is backlog"
        assert len({r.id for r in again}) == len(again), "each handed out once"
        assert await store.main.next_lanes(lanes, 100, 100) == []
        assert lanes.drained >= {Priority.TELEMETRY, Priority.ALARM}
        await store.main.ack([r.id for r in again])
        await store.close()
        with Outbox(tmp_path / "b.db", 1 << 30) as outbox:
            stats = outbox.stats()
            assert (stats.rows, stats.accepted, stats.delivered, stats.dropped) == (0, 30, 30, 0)

    asyncio.run(run())


class LaneMachine(StoreOnLoop):
    """Through commits, takes from either lane, acks, reconnects and reopens: each session hands out
    every unacked event exactly once, each lane in order per class, and the accounting holds."""

    feed = "spb"

    def __init__(self) -> None:
        super().__init__()
        self.committed = 0
        self.unacked: dict[int, int] = {}  # id -> class, in id order
        self.lanes = Lanes()
        self.at_start: set[int] = set()  # unacked when this session began: its backlog
        self.taken: list[tuple[int, int, bool]] = []  # (id, class, backlog) this session
        self.acked: set[int] = set()

    @rule(priority=st.sampled_from([0, 2]), count=st.integers(1, 6))
    def commit(self, priority: int, count: int) -> None:
        before = self.loop.run_until_complete(self.store.main.stats()).accepted
        for _ in range(count):
            self.store.submit(f"d{priority}", reading(self.committed), priority)
            self.committed += 1
        self.loop.run_until_complete(self.store.flush())
        first = self.store.feeds["spb"]._next_id - count
        assert self.loop.run_until_complete(self.store.main.stats()).accepted == before + count
        for row_id in range(first, first + count):
            self.unacked[row_id] = priority

    @rule(live=st.integers(0, 5), backlog=st.integers(0, 5))
    def take(self, live: int, backlog: int) -> None:
        if not self.lanes.live_from:  # the session begins with its first call
            self.at_start = set(self.unacked)
        rows = self.loop.run_until_complete(self.store.main.next_lanes(self.lanes, live, backlog))
        live_rows = [r for r in rows if not r.backlog]
        old_rows = [r for r in rows if r.backlog]
        assert rows == live_rows + old_rows and len(live_rows) <= live and len(old_rows) <= backlog
        for r in rows:
            assert r.id in self.unacked, f"event {r.id} handed out but acked or never committed"
            assert r.backlog == (r.id in self.at_start), r.id
            self.taken.append((r.id, r.priority, r.backlog))

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        pending = [i for i, _, _ in self.taken if i not in self.acked]
        chosen = data.draw(st.lists(st.sampled_from(pending), unique=True)) if pending else []
        assert self.loop.run_until_complete(self.store.main.ack(chosen)) == len(chosen)
        for i in chosen:
            self.acked.add(i)
            del self.unacked[i]

    @rule()
    def reconnect(self) -> None:
        self.lanes = Lanes()
        self.at_start = set(self.unacked)
        self.taken = []

    @rule()
    def reopen(self) -> None:
        self.reopen_store()
        self.reconnect()

    @invariant()
    def each_lane_is_in_order_once_and_misses_nothing(self) -> None:
        ids = [i for i, _, _ in self.taken]
        assert len(ids) == len(set(ids)), "an event handed out twice in one session"
        for p in (0, 2):
            for backlog in (True, False):
                lane = [i for i, q, b in self.taken if q == p and b == backlog]
                expected = sorted(i for i, q in self.unacked.items() if q == p and (i in self.at_start) == backlog)
                assert lane == sorted(lane), "out of order within a lane"
                # What the lane handed out is a prefix of what it had to hand out (acked ones included).
                whole = sorted(set(expected) | set(lane))
                assert lane == whole[: len(lane)], (p, backlog, lane, whole)

    def teardown(self) -> None:
        held, rows = self.loop.run_until_complete(_held(self.store))
        assert held == rows == len(self.unacked), "accepted - delivered - dropped = rows buffered"
        super().teardown()


@pytest.mark.usefixtures("tiny_tail")
def test_lanes_through_reconnects_and_reopens() -> None:
    run_state_machine_as_test(LaneMachine, settings=settings(max_examples=20, stateful_step_count=25, deadline=None))


def test_settled_waits_for_queued_readings_and_gives_up_when_commits_stall(tmp_path: Path) -> None:
    async def run() -> None:
        store = _store(tmp_path / "b.db")
        await store.open()
        lanes = Lanes()
        assert await store.main.next_lanes(lanes, 10) == []
        store.submit("m", reading(1), Priority.TELEMETRY)
        started = time.monotonic()
        assert not await store.settled(0.2), "no writer: not settled"
        assert 0.2 <= time.monotonic() - started < 1.0
        writer = asyncio.create_task(store.run_writer())
        try:
            assert await store.main.settled()
            assert not store._pending and not store._committing
            rows = await store.main.next_lanes(lanes, 10)
            assert [(r.device, r.backlog) for r in rows] == [("m", False)]
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await store.close()

    asyncio.run(run())
