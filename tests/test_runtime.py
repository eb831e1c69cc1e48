"""The running agent: reload on SIGHUP, fault isolation, a corrupt buffer at start."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path

from tests.conftest import Mosquitto, wait_for, write_config

METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
BAY = "  - {id: bay-a1, driver: virtual, kind: parking, interval: 100ms}\n"
BAY_CHANGED = "  - {id: bay-a1, driver: virtual, kind: parking, interval: 200ms, bay: B7}\n"
CROSS = "  - {id: cross-n, driver: virtual, kind: crosswalk, interval: 100ms}\n"


def _times(events: list[dict], device: str, event_type: str) -> list[float]:
    return [datetime.fromisoformat(e["time"]).timestamp() for e in events
            if e["device"] == device and e["type"] == event_type]


def test_sighup_applies_a_valid_config_and_keeps_unchanged_devices_running(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER + BAY)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 10 and len(sub.seqs("bay-a1")) >= 5, 20, "first events")

    write_config(config, port=broker.port, devices=METER + BAY_CHANGED + CROSS)
    reloaded_at = time.time()
    agent.signal(signal.SIGHUP)
    wait_for(lambda: len(sub.seqs("cross-n")) >= 5, 20, "events from the added device")
    wait_for(lambda: any(e["data"].get("bay") == "B7" for e in sub.snapshot()
                         if e["type"] == "city.parking.occupancy"), 10, "the changed device's new settings")
    time.sleep(0.5)
    events = sub.snapshot()

    statuses = [(e["device"], e["data"]["status"]) for e in events if e["type"] == "city.device.status"]
    assert statuses.count(("meter-1", "online")) == 1, "the unchanged device was restarted"
    assert statuses.count(("bay-a1", "online")) == 2, "the changed device was not restarted"
    meter = _times(events, "meter-1", "city.meter.reading")
    around = [b - a for a, b in zip(meter, meter[1:], strict=False) if reloaded_at - 1 < b < reloaded_at + 2]
    assert around, "no meter readings around the reload"
    assert max(around) < 0.5, f"unchanged device paused during reload: gaps {sorted(around)[-3:]}"
    assert sub.report("meter-1")["lost"] == []
    assert "config reloaded" in agent.output()
    assert "+cross-n" in agent.output()


def test_sighup_with_an_invalid_config_changes_nothing(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 5, 20, "first events")
    config.write_text(config.read_text().replace("interval: 50ms", "interval: soon"))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in agent.output(), 10, "the refusal in the log")
    before = len(sub.seqs("meter-1"))
    wait_for(lambda: len(sub.seqs("meter-1")) >= before + 10, 10, "events to keep flowing")
    assert "devices[0].interval" in agent.output()
    assert agent.proc is not None
    assert agent.proc.poll() is None


def test_a_failing_device_is_reported_and_isolated(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    broken = "  - {id: bad-1, driver: virtual, kind: meter, interval: 50ms, fail_every: 1, offline_after: 3}\n"
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER + broken)
    agent_factory(config)

    def offline() -> dict | None:
        return next((e for e in sub.snapshot() if e["device"] == "bad-1"
                     and e["type"] == "city.device.status" and e["data"]["status"] == "offline"), None)

    event = wait_for(offline, 10, "an offline status for the failing device")
    assert "simulated timeout" in event["data"]["reason"]
    assert event["data"]["consecutive_failures"] == 3
    before = len(sub.seqs("meter-1"))
    wait_for(lambda: len(sub.seqs("meter-1")) >= before + 20, 10, "the healthy device to keep publishing")
    assert not any(e["type"] == "city.meter.reading" for e in sub.snapshot() if e["device"] == "bad-1")


def test_a_corrupt_buffer_is_quarantined_and_the_agent_runs(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    buffer = tmp_path / "buffer.db"
    buffer.write_bytes(b"this is not a database, a power cut garbled it" * 100)
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER, buffer=buffer)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 5, 20, "events through a fresh buffer")
    quarantined = list(tmp_path.glob("buffer.db.corrupt-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes().startswith(b"this is not a database")
    assert str(quarantined[0]) in agent.output()
