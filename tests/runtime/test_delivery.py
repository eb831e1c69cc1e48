"""End to end against a real Mosquitto: contract, outages, crashes, a full buffer.

The agent runs as a real process (``python -m agent run``); an independent subscriber
counts every (device, seq) it receives.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

from pydantic import TypeAdapter

from agent.contract.schemas import EVENT_MODELS, CloudEvent
from tests.conftest import AgentProcess, Mosquitto, last_seqs, wait_for, write_config

FAST_DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 50ms}\n"
    "  - {id: cross-n, driver: virtual, kind: crosswalk, interval: 50ms}\n"
)
DEVICES = ("meter-1", "bay-a1", "cross-n")


def test_events_follow_the_contract_and_shutdown_is_clean(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=FAST_DEVICES)
    agent: AgentProcess = agent_factory(config)
    wait_for(lambda: all(len(sub.seqs(d)) >= 5 for d in DEVICES), 20, "events from every device")
    wait_for(lambda: sub.seqs("gateway"), 10, "the first health event")
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    assert time.monotonic() - started < 5
    time.sleep(0.3)

    events = sub.snapshot()
    adapter = TypeAdapter(CloudEvent)
    for event, topic in zip(events, sub.topics, strict=True):
        adapter.validate_python(event)  # envelope contract
        EVENT_MODELS[event["type"]].model_validate(event["data"])  # data contract per type
        assert event["specversion"] == "1.0"
        assert event["gateway"] == "gw-test"
        assert event["source"] == f"/gateways/gw-test/devices/{event['device']}"
        assert topic == f"ioc/v1/gw-test/{event['device']}/{event['type'].rsplit('.', 1)[1]}"
        assert event["time"].endswith("Z")
        assert len(event["time"]) == 24
    assert len({e["id"] for e in events}) == len(events)
    types = {e["type"] for e in events}
    assert {
        "city.meter.reading",
        "city.parking.occupancy",
        "city.crosswalk.presence",
        "city.device.status",
        "city.gateway.health",
    } <= types
    for device in DEVICES:
        report = sub.report(device)
        assert report["lost"] == [] and report["inversions"] == 0, (device, report)
    # Everything read before SIGTERM was delivered: the buffer is empty after a clean stop.
    assert last_seqs(config.parent / "buffer.db")["meter-1"] == max(sub.seqs("meter-1"))
    # Availability: online while running, offline (retained) after a clean stop.
    statuses = sub.status_payloads()
    assert statuses[0] == b"online"
    assert statuses[-1] == b"offline"
    late = subscriber_factory(broker.port, "ioc/v1/gw-test/status")
    wait_for(lambda: late.status_payloads() == [b"offline"], 5, "retained offline status")


def test_broker_outage_loses_nothing_and_keeps_order(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port, client_id="counting-subscriber")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=FAST_DEVICES)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 20, 20, "first events")
    broker.stop()  # the broker is gone for 10 s while devices keep producing
    time.sleep(10)
    broker.start()
    time.sleep(2)
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    last = last_seqs(config.parent / "buffer.db")
    assert last["meter-1"] > 400  # 20 ms interval: the meter kept producing during the outage
    sub.wait_for_all({d: last[d] for d in DEVICES}, 30)
    for device in DEVICES:
        report = sub.report(device)
        print(device, {k: v for k, v in report.items() if k != "lost"})
        assert report["lost"] == [], (device, report["lost"][:20])
        assert report["inversions"] == 0, (device, report)
        assert report["duplicates"] <= 100, (device, report)  # at most one window in flight
    assert "uplink lost" in agent.output()


def test_sigkill_during_outage_leaves_no_seq_gap(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port, client_id="counting-subscriber-2")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=FAST_DEVICES)
    first = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 10, 20, "first events")
    broker.stop()
    time.sleep(1.5)
    first.kill()  # SIGKILL mid-outage, with a backlog in the buffer
    killed_at = last_seqs(config.parent / "buffer.db")
    second = agent_factory(config)
    time.sleep(1.0)
    broker.start()
    wait_for(lambda: max(sub.seqs("meter-1")) > killed_at["meter-1"] + 10, 20,
             "the restarted agent's own events delivered")  # fmt: skip
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0
    last = last_seqs(config.parent / "buffer.db")
    assert last["meter-1"] > killed_at["meter-1"]  # numbering continued after the restart
    sub.wait_for_all({d: last[d] for d in DEVICES}, 30)
    for device in DEVICES:
        report = sub.report(device)
        assert report["lost"] == [], (device, report["lost"][:20])
        assert report["inversions"] == 0, (device, report)


def test_full_buffer_drops_oldest_reports_it_and_keeps_running(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    devices = (
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 10ms, burst: 20}\n"
        "  - {id: bay-a1, driver: virtual, kind: parking, interval: 100ms}\n"
    )
    sub = subscriber_factory(broker.port, client_id="counting-subscriber-3")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=devices, max_bytes="256KiB")
    broker.stop()
    agent = agent_factory(config)
    time.sleep(4)  # ~8,000 meter readings of ~500 bytes: far past 256 KiB
    assert agent.proc is not None and agent.proc.poll() is None, agent.output()
    broker.start()

    def reports() -> list[dict]:
        return [e["data"] for e in sub.snapshot() if e["type"] == "city.gateway.health"]

    def dropped(device: str) -> int:
        return sum(d["count"] for h in reports() for d in h["dropped_since_last_report"] if d["device"] == device)

    wait_for(lambda: dropped("meter-1") > 1000, 30, "health events reporting the dropped meter readings")
    assert {d["reason"] for h in reports() for d in h["dropped_since_last_report"]} == {"capacity"}
    assert dropped("bay-a1") == 0  # parking is class `event`: telemetry goes first
    for health in reports():
        acc = health["accounting"]
        assert acc["accepted"] == acc["delivered"] + acc["buffered"] + sum(acc["dropped"].values())
        assert health["buffer"]["bytes"] <= health["buffer"]["max_bytes"]
    # The newest meter readings survived (oldest were dropped), and parking lost nothing.
    time.sleep(1)
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    last = last_seqs(config.parent / "buffer.db")
    with sqlite3.connect(config.parent / "buffer.db") as db:  # what the 2 s shutdown drain left for next time
        kept = {(d, q) for d, q in db.execute("SELECT device, seq FROM outbox")}
    for device in ("bay-a1", "meter-1"):
        newest = {(device, q) for q in range(max(1, last[device] - 20), last[device] + 1)}
        # A PUBACK comes before the broker's delivery to the subscriber: the last ones may still be on the way.
        wait_for(lambda: newest <= {(device, q) for q in sub.seqs(device)} | kept, 10, f"the newest {device} events")  # noqa: B023 - called at once
        assert newest <= {(device, q) for q in sub.seqs(device)} | kept, device
    assert not [q for q in sub.report("bay-a1")["lost"] if ("bay-a1", q) not in kept]
    assert "buffer full: dropped" in agent.output()


def test_lwt_offline_when_agent_dies(tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory) -> None:
    sub = subscriber_factory(broker.port, "ioc/v1/gw-test/status")
    config = write_config(
        tmp_path / "site.yaml",
        port=broker.port,
        devices="  - {id: meter-1, driver: virtual, kind: meter, interval: 1s}\n",
    )
    agent = agent_factory(config)
    wait_for(lambda: b"online" in sub.status_payloads(), 10, "online status")
    agent.kill()
    wait_for(lambda: sub.status_payloads()[-1:] == [b"offline"], 10, "last will")


def test_batch_mode_carries_every_event_in_json_arrays(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=FAST_DEVICES)
    config.write_text(
        config.read_text().replace("reconnect_max: 1s}", "reconnect_max: 1s, batch: {enabled: true, max_events: 50}}")
    )
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 100, 20, "events in batches")
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    time.sleep(0.3)
    with sub.lock:
        raw = [(t, json.loads(p)) for t, p, _ in sub.raw if t.endswith("/batch")]
    assert raw, "nothing arrived on the batch topic"
    assert all(t == "ioc/v1/gw-test/batch" and isinstance(b, list) and 1 <= len(b) <= 50 for t, b in raw)
    assert max(len(b) for _, b in raw) > 1  # batching happened
    assert not [t for t in sub.topics if not t.endswith("/batch")]  # no event outside a batch
    for event in sub.snapshot():
        TypeAdapter(CloudEvent).validate_python(event)
    last = last_seqs(config.parent / "buffer.db")
    for device in DEVICES:
        report = sub.report(device)
        assert report["max"] == last[device]
        assert report["lost"] == [] and report["inversions"] == 0, (device, report)


def test_mqtt5_delivers_through_a_broker_restart(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port, client_id="counting-subscriber-v5")
    config = write_config(
        tmp_path / "site.yaml",
        port=broker.port,
        devices="  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n",
    )
    config.write_text(config.read_text().replace("reconnect_max: 1s}", 'reconnect_max: 1s, protocol: "5"}'))
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 20, 20, "first events over MQTT 5")
    broker.stop()
    time.sleep(2)
    broker.start()
    time.sleep(2)
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    last = last_seqs(config.parent / "buffer.db")
    sub.wait_for_all({"meter-1": last["meter-1"]}, 20)
    report = sub.report("meter-1")
    assert report["inversions"] == 0, report
    assert agent.output().count("uplink connected") == 2
