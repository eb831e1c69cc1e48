"""The running agent: reload on SIGHUP, fault isolation, a corrupt buffer at start."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from agent.store.outbox import Outbox
from tests.conftest import Mosquitto, free_port, wait_for, write_config

METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
BAY = "  - {id: bay-a1, driver: virtual, kind: parking, interval: 100ms}\n"
BAY_CHANGED = "  - {id: bay-a1, driver: virtual, kind: parking, interval: 200ms, bay: B7}\n"
CROSS = "  - {id: cross-n, driver: virtual, kind: crosswalk, interval: 100ms}\n"


def _times(events: list[dict], device: str, event_type: str) -> list[float]:
    return [
        datetime.fromisoformat(e["time"]).timestamp()
        for e in events
        if e["device"] == device and e["type"] == event_type
    ]


def _meter_running(tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory):
    """An agent with one meter, already publishing, and a subscriber counting its events."""
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 5, 20, "first events")
    return sub, config, agent


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
    wait_for(
        lambda: any(e["data"].get("bay") == "B7" for e in sub.snapshot() if e["type"] == "city.parking.occupancy"),
        10,
        "the changed device's new settings",
    )
    time.sleep(0.5)
    events = sub.snapshot()

    statuses = [(e["device"], e["data"]["status"]) for e in events if e["type"] == "city.device.status"]
    assert statuses.count(("meter-1", "online")) == 1, "the unchanged device was restarted"
    assert statuses.count(("bay-a1", "online")) == 2, "the changed device was not restarted"
    meter = _times(events, "meter-1", "city.meter.reading")
    around = [b - a for a, b in itertools.pairwise(meter) if reloaded_at - 1 < b < reloaded_at + 2]
    assert around, "no meter readings around the reload"
    assert max(around) < 0.5, f"unchanged device paused during reload: gaps {sorted(around)[-3:]}"
    assert sub.report("meter-1")["lost"] == []
    assert "config reloaded" in agent.output()
    assert "+cross-n" in agent.output()


def test_sighup_with_an_invalid_config_changes_nothing(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub, config, agent = _meter_running(tmp_path, broker, subscriber_factory, agent_factory)
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
        return next(
            (
                e
                for e in sub.snapshot()
                if e["device"] == "bad-1" and e["type"] == "city.device.status" and e["data"]["status"] == "offline"
            ),
            None,
        )

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
    Outbox(buffer, 1 << 20).close()
    garbled = b"a power cut garbled the first page" * 120 + bytes(4096 - 34 * 120)
    with buffer.open("r+b") as f:
        f.write(garbled)
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER, buffer=buffer)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 5, 20, "events through a fresh buffer")
    quarantined = list(tmp_path.glob("buffer.db.corrupt-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes().startswith(b"a power cut garbled")
    assert str(quarantined[0]) in agent.output()


def test_a_buffer_path_at_someone_elses_file_is_refused_and_left_alone(tmp_path: Path, agent_factory) -> None:
    """Pointing buffer.path at the site file itself: refused by name, the file untouched."""
    config = write_config(tmp_path / "site.yaml", port=free_port(), devices=METER, buffer=tmp_path / "site.yaml")
    before = config.read_bytes()
    agent = agent_factory(config)
    assert agent.wait(30) != 0
    assert config.read_bytes() == before
    assert not list(tmp_path.glob("site.yaml.corrupt-*"))
    assert f"{config} exists and is not a buffer file" in agent.output()
    assert "Traceback" not in agent.output()


def _disk_used(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bavail) * stat.f_frsize


def test_a_full_disk_is_survived_and_reported(
    tmp_path: Path, small_volume: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    """R8: the buffer's file system fills up while the uplink is down (a real 16 MiB tmpfs)."""
    disk = small_volume
    sub = subscriber_factory(broker.port)
    devices = "  - {id: meter-1, driver: virtual, kind: meter, interval: 10ms, burst: 100}\n" + BAY
    config = write_config(
        tmp_path / "site.yaml", port=broker.port, devices=devices, buffer=disk / "buffer.db", max_bytes="1GiB"
    )  # the disk, not max_bytes, is the limit here
    broker.stop()
    agent = agent_factory(config)
    wait_for(lambda: "disk_full" in agent.output() or _disk_used(disk) > 12 << 20, 60, "the disk to fill")
    time.sleep(3)  # keep producing on a full disk
    assert agent.proc is not None
    assert agent.proc.poll() is None, agent.output()
    assert "Traceback" not in agent.output()
    broker.start()

    def health_with_disk_full() -> dict | None:
        for e in sub.snapshot():
            if e["type"] == "city.gateway.health" and e["data"]["accounting"]["dropped"]["disk_full"]:
                return e["data"]
        return None

    health = wait_for(health_with_disk_full, 30, "a health event counting disk_full drops")
    acc = health["accounting"]
    assert acc["accepted"] == acc["delivered"] + acc["buffered"] + sum(acc["dropped"].values())
    before = len(sub.seqs("meter-1"))
    wait_for(lambda: len(sub.seqs("meter-1")) > before + 100, 20, "events to flow again")
    # Only the lowest class paid: the parking bay (class event) and health (alarm) lost nothing.
    dropped_devices = {
        d["device"]
        for e in sub.snapshot()
        if e["type"] == "city.gateway.health"
        for d in e["data"]["dropped_since_last_report"]
    }
    assert dropped_devices == {"meter-1"}
    wait_for(lambda: not sub.report("bay-a1")["lost"], 20, "every parking event")
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0


def test_a_buffer_from_a_newer_agent_is_refused_cleanly(tmp_path: Path) -> None:
    buffer = tmp_path / "buffer.db"
    with sqlite3.connect(buffer) as db:
        db.execute("PRAGMA user_version = 99")
    config = write_config(tmp_path / "site.yaml", port=1, devices=METER, buffer=buffer)
    run = subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 1
    assert "schema version 99" in run.stderr
    assert "Traceback" not in run.stderr
    with sqlite3.connect(buffer) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 99  # left untouched


def test_sighup_with_a_new_topic_prefix_moves_new_events(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub, config, agent = _meter_running(tmp_path, broker, subscriber_factory, agent_factory)
    config.write_text(config.read_text().replace("topic_prefix: ioc/v1", "topic_prefix: city/v2"))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: any(t.startswith("city/v2/gw-test/meter-1/") for t in sub.topics), 10, "events on the new prefix")
    assert "config reloaded" in agent.output()
    assert sub.report("meter-1")["lost"] == []
