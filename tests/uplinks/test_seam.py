"""The uplink seam end to end: a new uplink is one folder plus an entry point, with no edit in the core.

The test uplink (tests/uplinks/jsonl_uplink/: every accepted event as one line of a file,
fsynced before it is acknowledged) is registered only for the agent process under test: an
``edge_agent.uplinks`` entry point in a ``*.dist-info`` folder on its PYTHONPATH. The agent runs
it beside MQTT against a real Mosquitto; each uplink has its own outage, its own buffer file
and its own accounting, and neither loses an event to the other's outage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.store.inspect import inspect_buffer
from tests.conftest import ROOT, AgentProcess, Mosquitto, Subscriber, analyse, last_seqs, wait_for, write_config

DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 50ms}\n"
)
NAMES = ("meter-1", "bay-a1")
HEALTH = "city.gateway.health"
OUTAGE = 4.0  # seconds each far end is down (the meter makes ~200 readings meanwhile)


def register_jsonl(site: Path) -> None:
    """Install the test uplink's entry point as an installed package would: a dist-info folder."""
    info = site / "jsonl_uplink-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jsonl-uplink\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[edge_agent.uplinks]\njsonl = tests.uplinks.jsonl_uplink:PLUGIN\n")


def python_path(*first: Path) -> str:
    """PYTHONPATH with ``first`` ahead of this checkout (whose code wins over an installed copy)."""
    return os.pathsep.join([*map(str, first), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture
def jsonl_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The entry point, on the PYTHONPATH of every process the test starts (not of pytest itself)."""
    site = tmp_path / "site"
    register_jsonl(site)
    monkeypatch.setenv("PYTHONPATH", python_path(site))
    return site


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The events in a JSON-lines file so far (a line being written, without its newline yet, is left out)."""
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def seqs(events: list[dict[str, Any]], device: str) -> list[int]:
    return [e["seq"] for e in events if e["device"] == device]


def order_report(events: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """Loss and duplicates over the device's sequence; order within each event type (classes may overtake)."""
    mine = [e for e in events if e["device"] == device]
    report = analyse([e["seq"] for e in mine])
    types = {e["type"] for e in mine}
    report["inversions"] = sum(analyse([e["seq"] for e in mine if e["type"] == t])["inversions"] for t in types)
    return report


def assert_balanced(accounting: dict[str, Any], where: str) -> None:
    dropped = sum(accounting["dropped"].values())
    assert accounting["accepted"] == accounting["delivered"] + accounting["buffered"] + dropped, (where, accounting)


def health_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == HEALTH]


def seam_config(tmp_path: Path, broker: Mosquitto, jsonl_file: Path) -> Path:
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=DEVICES, health="1s")
    text = config.read_text()
    config.write_text(text.replace("uplink:\n", f"uplink:\n  jsonl: {{path: {jsonl_file}, retry: 100ms}}\n", 1))
    return config


def test_the_test_uplink_comes_only_from_its_entry_point_and_documents_itself(tmp_path: Path) -> None:
    sample = ROOT / "tests" / "uplinks" / "jsonl_uplink" / "sample.yaml"
    env = dict(os.environ, PYTHONPATH=python_path())
    without = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(sample)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert without.returncode == 2 and "uplink.jsonl" in without.stderr, without.stderr  # unknown without it
    site = tmp_path / "site"
    register_jsonl(site)
    # The folder meets the rules every shipped plugin meets (tests/test_layout.py), in a process
    # that has the entry point.
    check = (
        "from tests.test_layout import UPLINKS, layout_problems, plugin_folder, _model_keys\n"
        "from importlib.metadata import entry_points\n"
        "(ep,) = entry_points(group=UPLINKS, name='jsonl')\n"
        "print(layout_problems(plugin_folder(ep), UPLINKS, 'jsonl', _model_keys(ep.load())))\n"
    )
    env["PYTHONPATH"] = python_path(site)
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_second_durable_uplink_has_its_own_outages_and_accounting(
    tmp_path: Path, jsonl_site: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    jsonl_file = out / "events.jsonl"
    sub: Subscriber = subscriber_factory(broker.port, client_id="seam-subscriber")
    config = seam_config(tmp_path, broker, jsonl_file)
    agent: AgentProcess = agent_factory(config)

    # (a) Both uplinks receive the events.
    wait_for(lambda: len(seqs(read_lines(jsonl_file), "meter-1")) >= 20, 20, "meter events in the file")
    wait_for(lambda: len(sub.seqs("meter-1")) >= 20, 10, "meter events over MQTT")

    # (b) MQTT down: the file keeps growing without a gap; health events in it say MQTT buffers.
    broker.stop()
    in_file = len(seqs(read_lines(jsonl_file), "meter-1"))
    time.sleep(OUTAGE)
    wait_for(lambda: len(seqs(read_lines(jsonl_file), "meter-1")) > in_file + 100, 20,
             "the file to go on growing while MQTT is down")  # fmt: skip
    during = read_lines(jsonl_file)
    assert order_report(during, "meter-1")["lost"] == []
    mqtt_down = [h for h in health_events(during) if not h["uplinks"]["mqtt"]["connected"]]
    assert mqtt_down, "no health event in the file during the MQTT outage"
    assert mqtt_down[-1]["uplinks"]["mqtt"]["buffer"]["events"] > 50, mqtt_down[-1]["uplinks"]
    assert mqtt_down[-1]["uplinks"]["jsonl"]["connected"], mqtt_down[-1]["uplinks"]
    broker.start()
    reached = last_seqs(config.parent / "buffer.db")["meter-1"]
    sub.wait_for_all({"meter-1": reached}, 20)  # MQTT catches up after the broker is back

    # (c) The file's folder gone: MQTT keeps delivering; health events over MQTT say the file buffers.
    down = tmp_path / "out-down"
    out.rename(down)
    over_mqtt = len(sub.seqs("meter-1"))
    time.sleep(OUTAGE)
    # A loaded machine may deliver fewer than the ~200 readings in the outage: a floor, given time.
    wait_for(lambda: len(sub.seqs("meter-1")) > over_mqtt + 100, 20, "MQTT to go on delivering while the file is down")
    assert sub.report("meter-1")["lost"] == []
    jsonl_down = [h for h in health_events(sub.snapshot()) if not h["uplinks"]["jsonl"]["connected"]]
    assert jsonl_down, "no health event over MQTT during the file's outage"
    latest = jsonl_down[-1]["uplinks"]
    assert str(jsonl_file) in latest["jsonl"]["last_error"], latest
    assert latest["jsonl"]["buffer"]["events"] > 50, latest
    assert latest["mqtt"]["connected"], latest
    down.rename(out)
    reached = last_seqs(config.parent / "buffer.db")["meter-1"]
    wait_for(lambda: reached in seqs(read_lines(jsonl_file), "meter-1"), 20, "the file to catch up")

    # (d) Each uplink's own accounting balances in every health event; the top-level figures are MQTT's.
    reports = health_events(sub.snapshot())
    assert len(reports) >= 5, "too few health events"
    for report in reports:
        assert set(report["uplinks"]) == {"mqtt", "jsonl"}, report["uplinks"]
        assert report["accounting"] == report["uplinks"]["mqtt"]["accounting"], report
        assert report["buffer"] == report["uplinks"]["mqtt"]["buffer"], report
        for name, uplink in report["uplinks"].items():
            assert_balanced(uplink["accounting"], name)

    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0, agent.output()
    main, own = config.parent / "buffer.db", config.parent / "buffer.jsonl.db"
    last = last_seqs(main)
    assert last_seqs(own) == last  # one sequence per device, whatever the feed

    # No loss, per-device order, on both; the file never repeats an event (written once, then acknowledged).
    sub.wait_for_all(last, 20)
    in_file_events = read_lines(jsonl_file)
    for device in (*NAMES, "gateway"):
        for name, events in (("mqtt", sub.snapshot()), ("jsonl", in_file_events)):
            report = order_report(events, device)
            assert report["max"] == last[device] and report["lost"] == [], (name, device, report["lost"][:20])
            assert report["inversions"] == 0, (name, device, report)
        assert order_report(in_file_events, device)["duplicates"] == 0, device
    assert "JSON lines uplink lost" in agent.output()

    # Two buffer files with their own counters: both accepted every event, both delivered them all.
    files = {path.name: inspect_buffer(path) for path in (main, own)}
    for name, summary in files.items():
        assert summary.problem is None and summary.rows == 0, (name, summary)
        counters = summary.counters
        dropped = sum(v for k, v in counters.items() if k.startswith("dropped_"))
        assert counters["accepted"] == counters["delivered"] + summary.rows + dropped, (name, counters)
    assert files["buffer.db"].counters["accepted"] == files["buffer.jsonl.db"].counters["accepted"]
    assert files["buffer.db"].counters["accepted"] == sum(last.values())
