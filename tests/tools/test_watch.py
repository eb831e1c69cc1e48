"""``edge-agent watch`` against faked streams: a test client publishes events the agent's own builders
made to a real Mosquitto, and the watcher (a real process) must find each kind of violation.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from agent.contract.compact import ENCODING, compress
from tests.conftest import Mosquitto
from tests.tools.watch_helpers import (
    GATEWAY,
    PREFIX,
    Publisher,
    Watcher,
    availability,
    batch,
    device,
    inventory,
    kinds,
    reading,
    status_event,
)


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    p = Publisher(broker.port)
    yield p
    p.close()


def test_a_gap_is_a_violation_with_its_range(broker: Mosquitto, publisher: Publisher) -> None:
    watcher = Watcher(broker.port)
    publisher.send(*(reading(s) for s in (1, 2, 3, 6, 7, 9)))
    code, report, _ = watcher.result()
    assert code == 1
    assert kinds(report) == ["gap"]
    meter = device(report)
    assert meter["events"] == 6
    assert meter["epochs"][0]["gaps"] == [[4, 5], [8, 8]]
    assert meter["epochs"][0]["missing"] == 3
    assert "4-5, 8" in report["violations"][0]["detail"]


def test_a_duplicate_with_different_content_is_a_violation_an_equal_one_is_not(
    broker: Mosquitto, publisher: Publisher
) -> None:
    watcher = Watcher(broker.port)
    first, second = reading(1), reading(2)
    publisher.send(first, second, second, reading(3), reading(3, value=99.0), reading(4))
    code, report, _ = watcher.result()
    assert code == 1
    assert kinds(report) == ["duplicate-different"]
    assert "seq 3" in report["violations"][0]["detail"]
    meter = device(report)
    assert (meter["events"], meter["duplicates"], meter["duplicates_different"]) == (4, 1, 1)


def test_a_reorder_within_a_class_is_a_violation(broker: Mosquitto, publisher: Publisher) -> None:
    watcher = Watcher(broker.port)
    publisher.send(reading(1), reading(3), reading(2), reading(4))
    code, report, _ = watcher.result()
    assert code == 1
    assert kinds(report) == ["reorder"]  # 2 came after all: a reorder, not a gap
    assert "seq 2" in report["violations"][0]["detail"] and "after seq 3" in report["violations"][0]["detail"]
    assert device(report)["epochs"][0]["gaps"] == []


def test_across_classes_order_is_not_promised_and_a_later_filled_hole_is_no_loss(
    broker: Mosquitto, publisher: Publisher
) -> None:
    # After an outage the alarm (seq 3) overtakes the backlog of readings (docs/delivery.md, section 4).
    watcher = Watcher(broker.port)
    publisher.send(status_event(3), reading(1), reading(2), reading(4))
    code, report, _ = watcher.result()
    assert (code, report["violation_counts"]) == (0, {})
    assert device(report)["events"] == 4


def test_an_unsynchronised_clock_is_a_violation(broker: Mosquitto, publisher: Publisher) -> None:
    watcher = Watcher(broker.port)
    epoch_start = datetime(1970, 1, 1, 0, 0, 42, tzinfo=UTC)  # a board without RTC before NTP
    ahead = datetime.now(UTC) + timedelta(days=3)
    publisher.send(reading(1), reading(2, taken=epoch_start), reading(3, taken=ahead), reading(4))
    code, report, _ = watcher.result()
    assert code == 1
    assert kinds(report) == ["unsynchronised-clock", "unsynchronised-clock"]
    assert "before 2000" in report["violations"][0]["detail"]
    assert "ahead of the receive time" in report["violations"][1]["detail"]
    assert device(report)["unsynchronised"] == 2


def test_malformed_messages_are_counted_with_topic_and_reason_and_the_watch_goes_on(
    broker: Mosquitto, publisher: Publisher
) -> None:
    watcher = Watcher(broker.port)
    topic, good = reading(1)
    wrong_quality = json.loads(reading(3)[1])
    wrong_quality["data"]["measurements"][0]["quality"] = "excellent"
    publisher.send(
        (topic, good),
        (topic, b"{not json"),
        (topic, b"\xff\xfe"),
        reading(2),
        (topic, b'{"hello": "world"}'),
        (topic, json.dumps(wrong_quality).encode()),
        (f"{PREFIX}/{GATEWAY}/meter-2/reading", reading(3)[1]),  # meter-1's event on meter-2's topic
        availability(b"maybe"),
        reading(3),
        reading(4),
    )
    code, report, _ = watcher.result()
    assert code == 1
    assert report["violation_counts"] == {"malformed": 6}
    reasons = {r["reason"].split(" ")[0]: r for r in report["malformed"]}
    assert [r["topic"] for r in report["malformed"]][:2] == [topic, topic]
    assert "not" in reasons and "data.measurements.0.quality:" in reasons
    assert any("device 'meter-1' on device meter-2's topic" in r["reason"] for r in report["malformed"])
    assert any(r["topic"] == f"{PREFIX}/{GATEWAY}/status" and "maybe" in r["reason"] for r in report["malformed"])
    assert any("envelope" in r["reason"] or "specversion" in r["reason"] for r in report["malformed"])
    meter = device(report)
    assert (meter["events"], meter["epochs"][0]["gaps"]) == (4, [])  # every good event after the bad ones


def test_a_clean_stream_with_batches_a_restart_and_retained_topics_passes(
    broker: Mosquitto, publisher: Publisher
) -> None:
    publisher.send(availability(), inventory(), retain=True)
    watcher = Watcher(broker.port, "--gateway", GATEWAY)
    two, three = reading(2), reading(3)
    publisher.send(
        reading(1),
        batch(two, three, reading(1, device="meter-2")),
        batch(two, three),  # a batch re-sent whole: duplicates
        reading(4, epoch="fedcba9876543210"),  # the buffer file was replaced: a new epoch
        reading(5, epoch="fedcba9876543210"),
        reading(1, gateway="gw-other"),  # not the watched gateway
    )
    code, report, _ = watcher.result()
    assert (code, report["violation_counts"], report["malformed"]) == (0, {}, [])
    assert list(report["gateways"]) == [GATEWAY]
    gateway = report["gateways"][GATEWAY]
    assert (gateway["availability"], gateway["inventories"], gateway["clock_synchronised"]) == ("online", 1, True)
    meter = device(report)
    assert (meter["events"], meter["duplicates"]) == (5, 2)
    assert [(e["first_seq"], e["last_seq"]) for e in meter["epochs"]] == [(1, 3), (4, 5)]
    assert any("new seqepoch fedcba9876543210" in n for n in report["notes"])


def test_lateness_is_counted_and_fails_only_when_strict(broker: Mosquitto, publisher: Publisher) -> None:
    old = datetime.now(UTC) - timedelta(minutes=10)  # a backlog after an outage
    lenient = Watcher(broker.port, "--max-late", "60")
    strict = Watcher(broker.port, "--max-late", "60", "--strict-late")
    publisher.send(reading(1, taken=old), reading(2, taken=old), reading(3))
    code, report, _ = lenient.result()
    assert (code, report["violation_counts"]) == (0, {})
    assert device(report)["late"] == 2 and device(report)["max_late_s"] > 590
    code, report, _ = strict.result()
    assert (code, report["violation_counts"]) == (1, {"late": 2})


def test_nothing_received_fails_and_the_live_line_says_so(broker: Mosquitto) -> None:
    code, report, err = Watcher(broker.port, "--every", "0.5", duration=1.5).result()
    assert code == 1 and kinds(report) == ["no-events"]
    assert re.search(
        r"^watch [01]s: 0 events \(0\.0/s\); violations 0, malformed 0, late 0, open gaps 0$", err, re.M
    ), err


def test_ctrl_c_ends_the_watch_with_the_report(broker: Mosquitto, publisher: Publisher) -> None:
    watcher = Watcher(broker.port, "--every", "0.2", duration=0)  # until Ctrl-C
    publisher.send(reading(1), reading(2))
    assert watcher.proc.stderr is not None
    while not re.match(r"watch \d+s: 2 events", line := watcher.proc.stderr.readline().decode()):
        assert line, "the watcher ended before it saw both events"
    watcher.proc.send_signal(signal.SIGINT)
    code, report, _ = watcher.result()
    assert (code, report["events"], report["violation_counts"]) == (0, 2, {})


def test_compact_messages_are_decoded_and_checked_like_plain_ones(broker: Mosquitto, publisher: Publisher) -> None:
    """``{prefix}/{gateway}/deflate`` (uplink.mqtt.compact): single events and batches, deflated;
    the watch checks the events inside, and a payload that does not inflate is malformed."""
    watcher = Watcher(broker.port)
    topic = f"{PREFIX}/{GATEWAY}/{ENCODING}"
    single = reading(1)[1]
    batched = batch(reading(2), reading(3), reading(5))[1]
    publisher.send((topic, compress(single)), (topic, compress(batched)), (topic, b"\x78\x9c not deflate"))
    code, report, _ = watcher.result()
    assert code == 1
    assert device(report)["events"] == 4
    assert report["violation_counts"] == {"gap": 1, "malformed": 1}, report["violation_counts"]
    assert [r["reason"].split(":")[0] for r in report["malformed"]] == ["compact payload"], report["malformed"]
    assert device(report)["epochs"][0]["gaps"] == [[4, 4]]
