"""``backlog``: set on exactly the deliveries of events accepted while no connection was taking them.

The feed's sessions on a real outbox file (from memory and from the file), the bytes the MQTT
publisher puts on the wire (single and batched), and end to end: a real agent, a real Mosquitto
stopped for an outage, and an agent killed and started again with a backlog in its buffer.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from agent.contract.events import Priority, Reading, make_event, mark_backlog
from agent.contract.schemas import CloudEvent
from agent.store.event_store import EventStore
from agent.store.outbox import Outbox, Stored
from agent.uplinks.mqtt.publisher import wire_payloads
from tests.conftest import AgentProcess, Mosquitto, Subscriber, last_seqs, wait_for, write_config

METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
TRUSTED = "fleet: {clock: trusted}\n"  # this host's kernel may not report NTP: the site vouches for the clock


def _reading(n: int) -> Reading:
    return Reading(
        "city.meter.reading", {"measurements": [{"quantity": "x", "value": n, "unit": "", "quality": "good"}]}
    )


def test_the_feed_marks_what_was_accepted_before_the_session_from_memory_and_from_the_file(tmp_path: Path) -> None:
    async def run() -> list[list[tuple[int, bool]]]:
        store = EventStore({"mqtt": lambda: Outbox(tmp_path / "b.db", 1 << 30)}, gateway="gw-1")
        await store.open()
        feed, taken = store.main, []

        async def take(cursors: dict[int, int]) -> list[Stored]:
            await store.flush()
            rows = await feed.next_batch(cursors, 100)
            for row in rows:
                cursors[row.priority] = row.id
            taken.append([(row.seq, row.backlog) for row in rows])
            return rows

        first: dict[int, int] = {}  # the uplink's first connection: nothing committed yet
        await take(first)
        for n in (1, 2):
            store.submit("m", _reading(n), Priority.TELEMETRY)
        live = await take(first)  # committed during the session: live, from memory
        for n in (3, 4, 5):
            store.submit("m", _reading(n), Priority.TELEMETRY)  # the link is down: nobody takes them
        await store.flush()
        await feed.ack([r.id for r in live])
        second: dict[int, int] = {}  # a new connection
        await take(second)  # 3-5 waited for it: backlog, though still in memory
        store.submit("m", _reading(6), Priority.TELEMETRY)
        await take(second)  # 6: live again
        third: dict[int, int] = {}  # a reconnect before 3-6 were acknowledged: re-sent from the file
        await take(third)
        await store.close()
        return taken

    assert asyncio.run(run()) == [
        [],
        [(1, False), (2, False)],
        [(3, True), (4, True), (5, True)],
        [(6, False)],
        [(3, True), (4, True), (5, True), (6, True)],
    ]


def test_after_a_restart_everything_buffered_is_backlog_and_new_events_are_live(tmp_path: Path) -> None:
    async def run() -> list[tuple[int, bool]]:
        path = tmp_path / "b.db"
        store = EventStore({"mqtt": lambda: Outbox(path, 1 << 30)}, gateway="gw-1")
        await store.open()
        for n in (1, 2):
            store.submit("m", _reading(n), Priority.TELEMETRY)
        await store.close()  # never sent
        store = EventStore({"mqtt": lambda: Outbox(path, 1 << 30)}, gateway="gw-1")
        await store.open()
        cursors: dict[int, int] = {}
        rows = await store.main.next_batch(cursors, 100)
        for row in rows:
            cursors[row.priority] = row.id
        store.submit("m", _reading(3), Priority.TELEMETRY)
        await store.flush()
        rows += await store.main.next_batch(cursors, 100)
        await store.close()
        return [(r.seq, r.backlog) for r in rows]

    assert asyncio.run(run()) == [(1, True), (2, True), (3, False)]


def _row(seq: int, payload: bytes, backlog: bool) -> Stored:
    return Stored(seq, 0, "meter-1", "city.meter.reading", seq, "", payload, 0.0, backlog)


def test_the_wire_bytes_carry_backlog_and_the_stored_bytes_do_not() -> None:
    events = [
        make_event(gateway="gw-1", device="meter-1", seq=seq, reading=_reading(seq), now="2026-11-23T08:00:00.000Z")
        for seq in (1, 2, 3)
    ]
    rows = [_row(1, events[0], True), _row(2, events[1], False), _row(3, events[2], True)]
    wire = wire_payloads(rows)
    decoded = [json.loads(p) for p in wire]
    assert [e.get("backlog") for e in decoded] == [True, None, True]  # absent, never false, when live
    assert wire[1] is rows[1].payload  # a live event is sent as stored: no copy
    assert [r.payload for r in rows] == events  # the stored bytes are not changed
    for event, original in zip(decoded, events, strict=True):
        TypeAdapter(CloudEvent).validate_python(event)
        assert {k: v for k, v in event.items() if k != "backlog"} == json.loads(original)
    assert len(wire[0]) - len(events[0]) == len(b',"backlog":true') == 15
    assert mark_backlog(events[0]) == wire[0]


def _first_copies(sub: Subscriber) -> dict[int, dict[str, Any]]:
    first: dict[int, dict[str, Any]] = {}
    for event in sub.snapshot():
        if event["device"] == "meter-1":
            first.setdefault(event["seq"], event)
    return first


def _accepted(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["recordedtime"]).timestamp()


def test_a_broker_outage_marks_what_waited_for_it_and_nothing_else(
    tmp_path: Path,
    broker: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    agent_factory: Callable[[Path], AgentProcess],
) -> None:
    sub = subscriber_factory(broker.port, client_id="backlog-subscriber")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER, extra=TRUSTED)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 30, 20, "live events")
    before = len(sub.snapshot())
    down = time.time()
    broker.stop()
    time.sleep(3)
    up = time.time()
    broker.start()
    time.sleep(4)
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    sub.wait_for_all({"meter-1": last_seqs(config.parent / "buffer.db")["meter-1"]}, 30)

    received = sub.snapshot()
    live_before = [e for e in received[:before] if e["device"] == "meter-1"][-20:]
    assert live_before and not any(e.get("backlog") for e in live_before)
    first = _first_copies(sub)
    during = [e for e in first.values() if down + 0.3 < _accepted(e) < up - 0.3]
    after = [e for e in first.values() if _accepted(e) > up + 2.5]  # reconnected by then (reconnect_max 1s)
    assert len(during) >= 30 and len(after) >= 10, (len(during), len(after))
    assert all(e.get("backlog") is True for e in during)
    assert not any(e.get("backlog") for e in after)
    for event in received:
        TypeAdapter(CloudEvent).validate_python(event)
        assert event["timequality"] == "synced"  # fleet.clock: trusted
        assert event["partitionkey"] == f"gw-test/{event['device']}"
        assert event["recordedtime"] >= event["time"]
        assert event.get("backlog") in (True, None)


def test_events_left_by_a_killed_agent_arrive_as_backlog_in_batches(
    tmp_path: Path,
    broker: Mosquitto,
    subscriber_factory: Callable[..., Subscriber],
    agent_factory: Callable[[Path], AgentProcess],
) -> None:
    sub = subscriber_factory(broker.port, client_id="backlog-subscriber-2")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER, extra=TRUSTED)
    config.write_text(
        config.read_text().replace("reconnect_max: 1s}", "reconnect_max: 1s, batch: {enabled: true, max_events: 20}}")
    )
    first_run = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 10, 20, "live events")
    broker.stop()
    sub.wait_quiet()  # what the broker sent before it stopped has all arrived (it can trail on a loaded machine)
    got_live = max(sub.seqs("meter-1"))  # everything after this can only come from the second run
    time.sleep(1.5)
    first_run.kill()  # SIGKILL with a backlog in the buffer
    killed_at = last_seqs(config.parent / "buffer.db")["meter-1"]
    second_run = agent_factory(config)
    time.sleep(1.0)
    up = time.time()
    broker.start()
    time.sleep(3)
    second_run.signal(signal.SIGTERM)
    assert second_run.wait(10) == 0
    last = last_seqs(config.parent / "buffer.db")["meter-1"]
    sub.wait_for_all({"meter-1": last}, 30)
    with sub.lock:
        assert all(t.endswith("/batch") for t, _, _ in sub.raw if not t.endswith("/status"))
    first = _first_copies(sub)
    assert not any(e.get("backlog") for s, e in first.items() if 5 < s <= got_live)  # sent live by the first run
    left = [e for s, e in first.items() if got_live < s <= killed_at]
    assert len(left) >= 20 and all(e.get("backlog") is True for e in left)
    after = [e for e in first.values() if _accepted(e) > up + 2.0]
    assert after and not any(e.get("backlog") for e in after)
