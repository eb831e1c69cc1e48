"""``recordedtime`` and ``timequality`` through the real event store, with a faked clock source.

The clock is never changed: the store's :class:`ClockWatch` is given a wall clock, a monotonic
clock and a sync state the test steps by hand (a board booting in 1970, NTP's first answer
stepping it forwards, a clock set back by an hour), and the events come out of a real outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.contract.events import TIME_SYNCED, TIME_UNKNOWN, TIME_UNSYNCED, Priority, Reading, TimeQuality
from agent.contract.schemas import CloudEvent
from agent.observability.clock import RESAMPLE_S, ClockWatch, kernel_time_quality
from agent.store.event_store import EventStore
from agent.store.outbox import Outbox

BOOT = 1_000.0  # a board without a real-time clock: 1970-01-01T00:16:40Z
NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp()


class FakeClock:
    """A wall clock, a monotonic clock and the kernel's sync state, all moved by the test."""

    def __init__(self, wall: float, state: TimeQuality) -> None:
        self.now = wall
        self.mono = 100.0
        self.state = state
        self.reads = 0  # how often the sync state was read

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sync(self) -> TimeQuality:
        self.reads += 1
        return self.state

    def run(self, seconds: float) -> None:
        """Time passes: both clocks move together."""
        self.now += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        """The wall clock is set (NTP's step, ``date -s``): the monotonic clock does not move."""
        self.now += seconds

    def watch(self) -> ClockWatch:
        return ClockWatch(wall=self.wall, monotonic=self.monotonic, sync=self.sync)


def _reading(n: int, taken: datetime | None = None) -> Reading:
    return Reading(
        "city.meter.reading", {"measurements": [{"quantity": "x", "value": n, "unit": "", "quality": "good"}]}, taken
    )


class Recorder:
    """A real event store on a real file; readings go in, the stored events come out decoded."""

    def __init__(self, path: Path, clock: ClockWatch) -> None:
        self.store = EventStore({"mqtt": lambda: Outbox(path, 1 << 30)}, gateway="gw-1", clock=clock)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.store.open())

    def submit(self, n: int, taken: datetime | None = None) -> None:
        self.store.submit("meter-1", _reading(n, taken), Priority.TELEMETRY)

    def events(self) -> list[dict[str, Any]]:
        async def drain() -> list[dict[str, Any]]:
            await self.store.flush()
            rows = await self.store.main.next_batch({}, 1000)
            return [json.loads(r.payload) for r in rows]

        out = self.loop.run_until_complete(drain())
        for event in out:
            CloudEvent.model_validate(event)  # every attribute as the schema describes it
        return out

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


@pytest.fixture
def make(tmp_path: Path) -> Any:
    made: list[Recorder] = []

    def build(clock: ClockWatch) -> Recorder:
        made.append(Recorder(tmp_path / f"b{len(made)}.db", clock))
        return made[-1]

    yield build
    for recorder in made:
        recorder.close()


def _stamp(seconds: float) -> str:
    """The text of a wall clock reading, truncated to the millisecond as the store does."""
    return datetime.fromtimestamp(int(seconds * 1000) / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def test_a_board_booting_in_1970_is_flagged_until_ntp_steps_the_clock_forwards(make: Any, caplog: Any) -> None:
    clock = FakeClock(BOOT, TIME_UNSYNCED)
    watch = clock.watch()
    store = make(watch)
    store.submit(1)
    clock.run(0.2)
    store.submit(2)
    clock.run(0.01)
    clock.step(NOW - clock.now)  # NTP answers: a step forwards of 56 years, and the kernel is synchronised
    clock.state = TIME_SYNCED
    with caplog.at_level(logging.WARNING, logger="agent.observability.clock"):
        store.submit(3)
    clock.run(0.2)
    store.submit(4)
    events = store.events()
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["timequality"] for e in events] == ["unsynced", "unsynced", "synced", "synced"]
    assert [e["time"] for e in events] == [_stamp(BOOT), _stamp(BOOT + 0.2), _stamp(NOW), _stamp(NOW + 0.2)]
    assert all(e["recordedtime"] == e["time"] for e in events)  # no reading carried its own time
    # Flagged, not corrected: the events stamped in 1970 keep their 1970 time.
    assert events[0]["time"].startswith("1970-01-01T00:16:40")
    # The step was seen at once: one read of the state, 0.21 s after the first, long before a periodic one.
    assert clock.reads == 2
    assert watch.steps == 1 and watch.last_step_s == pytest.approx(NOW - BOOT - 0.21, abs=0.01)
    assert "the wall clock stepped +1795" in caplog.text


def test_a_clock_set_back_an_hour_is_flagged_from_the_first_event_after_the_step(make: Any) -> None:
    clock = FakeClock(NOW, TIME_SYNCED)
    watch = clock.watch()
    store = make(watch)
    walls = [clock.now]
    store.submit(1)
    clock.run(0.1)
    clock.step(-3600.0)  # set by hand: the kernel marks the clock unsynchronised
    clock.state = TIME_UNSYNCED
    walls.append(clock.now)
    store.submit(2)
    clock.run(0.1)
    clock.step(-5.0)  # the time server is back and steps it again: synchronised once more
    clock.state = TIME_SYNCED
    walls.append(clock.now)
    store.submit(3)
    events = store.events()
    assert [e["timequality"] for e in events] == ["synced", "unsynced", "synced"]
    assert [e["seq"] for e in events] == [1, 2, 3]  # seq orders the device's events; time went backwards
    assert [e["time"] for e in events] == [_stamp(w) for w in walls]
    assert events[1]["time"] < events[0]["time"] and events[1]["time"].startswith("2026-11-23T07:00:00.1")
    assert watch.steps == 2 and watch.last_step_s == pytest.approx(-5.0)


def test_without_a_step_the_state_is_read_again_after_a_second(make: Any) -> None:
    clock = FakeClock(NOW, TIME_UNSYNCED)
    store = make(clock.watch())
    reads = clock.reads
    for n in range(50):  # thousands of events a second read the state at most once a second
        store.submit(n)
        clock.run(0.01)
    assert clock.reads - reads == 0
    clock.state = TIME_SYNCED  # NTP slewed the clock into sync: no step
    store.submit(50)  # 0.5 s after the last look: the old state still holds
    clock.run(RESAMPLE_S)
    store.submit(51)
    qualities = [e["timequality"] for e in store.events()]
    assert qualities == ["unsynced"] * 51 + ["synced"]
    assert clock.reads - reads == 1


def test_slewing_over_a_quiet_hour_is_no_step() -> None:
    clock = FakeClock(NOW, TIME_SYNCED)
    watch = clock.watch()
    clock.run(3600.0)
    clock.step(1.2)  # 333 ppm: what NTP may slew in an hour, more than a step's threshold
    assert watch.quality(clock.wall()) == TIME_SYNCED
    assert watch.steps == 0
    clock.run(0.1)
    clock.step(0.6)  # the same amount within a tenth of a second is a step
    assert watch.quality(clock.wall()) == TIME_SYNCED
    assert watch.steps == 1


def test_a_reading_with_its_own_time_keeps_it_beside_the_accept_time(make: Any) -> None:
    clock = FakeClock(NOW, TIME_SYNCED)
    store = make(clock.watch())
    store.submit(1, taken=datetime.fromtimestamp(NOW - 2.5, UTC))
    (event,) = store.events()
    assert (event["time"], event["recordedtime"]) == (_stamp(NOW - 2.5), _stamp(NOW))


def test_unknown_when_the_kernel_cannot_tell_and_synced_when_the_site_trusts_its_clock(make: Any) -> None:
    clock = FakeClock(NOW, TIME_UNKNOWN)
    watch = clock.watch()
    store = make(watch)
    store.submit(1)
    clock.run(0.01)
    clock.state = TIME_UNSYNCED
    watch.trusted = True  # fleet.clock: trusted (GPS, PTP): the kernel's word does not count
    store.submit(2)
    clock.run(0.01)
    watch.trusted = False
    clock.run(RESAMPLE_S)
    store.submit(3)
    assert [e["timequality"] for e in store.events()] == ["unknown", "synced", "unsynced"]


def test_the_default_source_is_the_kernel_and_the_system_clock(make: Any) -> None:
    store = make(ClockWatch())
    store.submit(1)
    (event,) = store.events()
    assert event["timequality"] == kernel_time_quality()  # this host's own state, whatever it is
    stamped = datetime.fromisoformat(event["recordedtime"]).timestamp()
    assert abs(stamped - datetime.now(UTC).timestamp()) < 5
    assert event["partitionkey"] == "gw-1/meter-1"
