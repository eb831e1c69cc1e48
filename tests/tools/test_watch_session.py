"""The watcher's persistent session: restarted with the same ``--client-id`` it gets what was sent while it was away."""

from __future__ import annotations

import pytest

from tests.conftest import Mosquitto
from tests.tools.watch_helpers import Publisher, Watcher, device, reading


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_restarted_watcher_with_its_client_id_misses_nothing(broker: Mosquitto, protocol: str) -> None:
    publisher = Publisher(broker.port)
    try:
        args = ("--client-id", f"city-acceptance-{protocol}", "--protocol", protocol)
        first = Watcher(broker.port, *args, duration=1.5)
        assert "(new session)" in first.first_line
        publisher.send(*(reading(s) for s in range(1, 6)))
        code, report, _ = first.result()
        assert (code, device(report)["epochs"][0]["last_seq"]) == (0, 5)
        publisher.send(*(reading(s) for s in range(6, 11)))  # while no watcher runs
        second = Watcher(broker.port, *args, duration=1.5)
        assert "(resumed session)" in second.first_line
        publisher.send(*(reading(s) for s in range(11, 16)))
        code, report, _ = second.result()
    finally:
        publisher.close()
    assert (code, report["violation_counts"]) == (0, {})
    meter = device(report)
    assert meter["events"] == 10
    assert [(e["first_seq"], e["last_seq"], e["gaps"]) for e in meter["epochs"]] == [(6, 15, [])]


def test_without_a_client_id_the_watcher_leaves_no_queue_behind(broker: Mosquitto) -> None:
    publisher = Publisher(broker.port)
    try:
        watcher = Watcher(broker.port, duration=1.0)
        client_id = watcher.first_line.split(" as ")[1].split(" ")[0]
        publisher.send(reading(1))
        assert watcher.result()[0] == 0
        publisher.send(reading(2))  # nobody subscribed under that id any more: nothing queued
        again = Watcher(broker.port, "--client-id", client_id, duration=1.0)
        code, report, _ = again.result()
    finally:
        publisher.close()
    assert (code, report["events"]) == (1, 0)  # nothing came: the generated session had unsubscribed
