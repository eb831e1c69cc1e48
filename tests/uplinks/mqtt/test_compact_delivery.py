"""Compact payloads end to end: a real agent, a real Mosquitto (restarted mid-run), every event decoded exactly.

The agent runs the JSON-lines test uplink beside MQTT (tests/uplinks/test_seam.py): the file gets
every event's bytes as the agent built them, so each compact message decoded by the consumer's
decoder (agent.contract.compact) is compared byte for byte with what the plain uplink would send.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from agent.contract.compact import decompress
from agent.contract.compact_dictionary import DICTIONARY_V1_ID
from agent.contract.events import mark_backlog
from agent.contract.schemas import CloudEvent
from tests.conftest import AgentProcess, Mosquitto, Subscriber, analyse, last_seqs, wait_for, write_config
from tests.uplinks.test_seam import python_path, register_jsonl

DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 50ms}\n"
)
COMPACT_TOPIC = "ioc/v1/gw-test/deflate"


@pytest.fixture
def jsonl_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON-lines uplink's entry point, on the PYTHONPATH of the agent process."""
    register_jsonl(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", python_path(tmp_path / "site"))


def lines_by_key(path: Path) -> dict[tuple[str, int], bytes]:
    """The file's events, as the agent built them, by (device, seq)."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return {(e["device"], e["seq"]): line for line, e in ((line, json.loads(line)) for line in lines)}


def decoded(sub: Subscriber) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """Every compact message so far: its inflated JSON and the events in it."""
    with sub.lock:
        payloads = [p for t, p, _ in sub.raw if t == COMPACT_TOPIC]
    out = []
    for payload in payloads:
        text = decompress(payload)
        events = json.loads(text)
        out.append((text, events if isinstance(events, list) else [events]))
    return out


def seqs(sub: Subscriber, device: str) -> list[int]:
    return [e["seq"] for _, events in decoded(sub) for e in events if e["device"] == device]


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_compact_messages_decode_to_exactly_the_events_and_none_is_lost(
    tmp_path: Path,
    jsonl_entry_point: None,
    broker: Mosquitto,
    subscriber_factory: Any,
    agent_factory: Any,
    batched: bool,
) -> None:
    plain = subscriber_factory(broker.port, "ioc/v1/+/+/+")  # a consumer that cannot decode: gets nothing
    plain_batches = subscriber_factory(broker.port, "ioc/v1/+/batch")
    # Every topic, raw: the compact messages are not JSON, so this one is not made by the factory
    # (which fails a test on any payload that is not JSON).
    sub = Subscriber(broker.port, "ioc/v1/#", client_id=f"compact-{batched}")
    try:
        jsonl_file = tmp_path / "events.jsonl"
        config = write_config(tmp_path / "site.yaml", port=broker.port, devices=DEVICES, health="1s")
        compact = "compact: {enabled: true}" + (", batch: {enabled: true, max_events: 50}" if batched else "")
        text = config.read_text().replace("reconnect_max: 1s}", f"reconnect_max: 1s, {compact}}}")
        config.write_text(text.replace("uplink:\n", f"uplink:\n  jsonl: {{path: {jsonl_file}}}\n", 1))
        agent: AgentProcess = agent_factory(config)

        wait_for(lambda: len(seqs(sub, "meter-1")) >= 50, 20, "compact meter events")
        broker.stop()  # the agent buffers, then sends again over a new connection
        time.sleep(1.5)
        broker.start()
        wait_for(lambda: len(seqs(sub, "meter-1")) >= 150, 20, "compact events after the broker restart")
        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0, agent.output()

        last = last_seqs(config.parent / "buffer.db")
        assert set(last) == {"meter-1", "bay-a1", "gateway"}
        wait_for(lambda: all(set(range(1, last[d] + 1)) <= set(seqs(sub, d)) for d in last), 20, "every seq")
        for device, top in last.items():
            report = analyse(seqs(sub, device))
            assert report["max"] == top and report["lost"] == [], (device, report["lost"][:20])

        with sub.lock:
            topics = {t for t, _, _ in sub.raw}
        assert topics == {COMPACT_TOPIC, "ioc/v1/gw-test/status"}, topics
        assert plain.snapshot() == [] and plain_batches.snapshot() == []

        built = lines_by_key(jsonl_file)
        messages = decoded(sub)
        sizes = []
        with sub.lock:
            raw = [p for t, p, _ in sub.raw if t == COMPACT_TOPIC]
        for payload, (text, events) in zip(raw, messages, strict=True):
            assert int.from_bytes(payload[2:6], "big") == DICTIONARY_V1_ID
            # The stored event, marked as the MQTT uplink marks a delivery from its backlog (not stored).
            originals = [
                mark_backlog(built[(e["device"], e["seq"])]) if e.get("backlog") else built[(e["device"], e["seq"])]
                for e in events
            ]
            # Exactly what the plain uplink sends: the event, or the batch array of the events.
            assert text == (b"[" + b",".join(originals) + b"]" if batched else originals[0])
            for event in events:
                TypeAdapter(CloudEvent).validate_python(event)
            sizes.append((len(payload), len(text)))
        if batched:
            assert max(len(events) for _, events in messages) > 1, "batching never happened"
        assert any(e.get("backlog") for _, events in messages for e in events)  # what waited for the broker
        assert sum(c for c, _ in sizes) * 3 < sum(p for _, p in sizes), sizes[:5]  # it did compress
    finally:
        sub.close()
