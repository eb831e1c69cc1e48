"""The watcher takes the gateway's word on its clock: an event flagged ``timequality: unsynced`` is a violation."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from agent.contract import data
from agent.contract.events import METER_READING, Reading, TimeQuality, make_event, mark_backlog, topic_for
from agent.tools.watch.checks import Checker, Limits
from agent.tools.watch.state import UNSYNCED

TOPIC = topic_for("ioc/v1", "gw-1", "meter-1", METER_READING)


def _event(seq: int, quality: TimeQuality) -> bytes:
    body = data.meter_reading([data.measurement("active_power", 1.0, "kW")])
    reading = Reading(METER_READING, body)
    return make_event(gateway="gw-1", device="meter-1", seq=seq, reading=reading, now=datetime.now(UTC),
                      epoch="0123456789abcdef", timequality=quality)  # fmt: skip


def test_an_event_flagged_unsynced_is_reported_though_its_time_looks_right() -> None:
    checker = Checker("ioc/v1", Limits())
    now = time.time()
    checker.handle(TOPIC, _event(1, "synced"), False, now)
    checker.handle(TOPIC, _event(2, "unsynced"), False, now)  # a plausible time: only the flag gives it away
    checker.handle(TOPIC, _event(3, "unknown"), False, now)  # no word from the kernel: the time alone is judged
    checker.handle(TOPIC, mark_backlog(_event(4, "unsynced")), False, now)
    assert checker.findings.counts[UNSYNCED] == 2
    details = [v.detail for v in checker.findings.violations if v.kind == UNSYNCED]
    assert details[0].startswith("seq 2: timequality unsynced: the gateway's clock was not synchronised (time 20")
    assert details[1].startswith("seq 4: timequality unsynced")
    assert checker.gateways["gw-1"].devices["meter-1"].unsynced == 2
    assert checker.events == 4 and checker.findings.counts.total() == 2  # nothing else was wrong


def test_the_skew_bound_still_holds_for_an_event_flagged_synced() -> None:
    checker = Checker("ioc/v1", Limits(max_skew_s=60))
    checker.handle(TOPIC, _event(1, "synced"), False, time.time() + 3600)  # received an hour after its time
    (violation,) = checker.findings.violations
    assert violation.kind == UNSYNCED and "behind the receive time" in violation.detail
