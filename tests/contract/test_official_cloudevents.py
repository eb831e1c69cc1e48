"""Every event type the agent emits, and its batches, against the shipped schema files, the CloudEvents
specification's JSON Schema and the official Python SDK; and the official conformance vectors through
the same envelope checks.

Events are built by the agent's own code: make_event with the data builders (the snapshot from a real
vtest.avi frame by the camera driver's Snapshotter with the real CenterFace), and published by a real
agent process to a real Mosquitto (every stream type, the retained inventory, batches).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.contract import data as build
from agent.contract.events import (
    CAMERA_SNAPSHOT,
    CROSSWALK_PRESENCE,
    DEVICE_HEALTH,
    DEVICE_STATUS,
    DEVICE_UNDECODED,
    EVENT_TYPES,
    GATEWAY_CERT_EXPIRING,
    GATEWAY_HEALTH,
    GATEWAY_INVENTORY,
    METER_READING,
    PARKING_OCCUPANCY,
    Reading,
    dataschema_for,
    make_event,
)
from agent.fleet.keys import generate_key
from agent.inference import Detector
from drivers.camera.snapshot import Snapshotter
from tests.conftest import AgentProcess, Mosquitto, Subscriber, wait_for, write_config
from tests.contract.cloudevents_checks import (
    VECTORS,
    check_batch,
    check_event,
    core_batch_validator,
    core_validator,
    errors,
    spec_validator,
)
from tests.models.test_models import built_models, footage, fp32, frames  # noqa: F401 - session fixtures

pytestmark = pytest.mark.timeout(300)

NOW = datetime(2026, 11, 23, 8, 12, 27, 158000, tzinfo=UTC)
# LoRaWAN's types need a network server: tests/drivers/lorawan checks them from a running agent.
LORAWAN = (DEVICE_HEALTH, DEVICE_UNDECODED)
EPOCH = "5f0c2a9e81d34b17"


def _built(event_type: str, data: dict[str, Any], device: str = "meter-1") -> bytes:
    return make_event(
        gateway="gw-demo-01", device=device, seq=42, reading=Reading(event_type, data), now=NOW, epoch=EPOCH
    )


EXPIRING = {"subject": "CN=gw-demo-01", "serial_number": "1f", "not_after": "2026-11-30T08:00:00Z",
            "seconds_left": 604000, "days_left": 6, "last_error": "no answer", "next_attempt": None}  # fmt: skip
BUILT = {
    "meter, every optional field": lambda: _built(
        METER_READING,
        build.meter_reading(
            [
                build.measurement("active_power", 42.1, "kW", point="P_total"),
                build.measurement("voltage", 230.2, "V", phase="L1"),
                build.measurement("current", None, "A", "bad", reason="timeout", phase="L2"),
                build.measurement("active_energy", 12345.678, "kWh", "stale"),
            ]
        ),
    ),
    "parking": lambda: _built(
        PARKING_OCCUPANCY, build.parking_occupancy("P-07", True, 0.93, NOW, point="bay7"), "bay-7"
    ),
    "crosswalk": lambda: _built(CROSSWALK_PRESENCE, build.crosswalk_presence("north", 3, 5), "cross-n"),
    "device offline": lambda: _built(
        DEVICE_STATUS, build.device_status("offline", "connection refused", "modbus", 3, NOW - timedelta(seconds=9))
    ),
    "device online": lambda: _built(DEVICE_STATUS, build.device_status("online", None, "virtual", 0, NOW)),
    "certificate expiring": lambda: _built(GATEWAY_CERT_EXPIRING, EXPIRING, "gateway"),
    "lorawan health, id from the uplink": lambda: make_event(
        gateway="gw-demo-01",
        device="bay-7",
        seq=42,
        now=NOW,
        epoch=EPOCH,
        reading=Reading(
            DEVICE_HEALTH,
            {
                "battery": {"volts": 2.948, "class": "low"},
                "rssi": -97.0,
                "snr": 3.5,
                "gateways": 2,
                "missed_uplinks": 1,
                "margin": None,
                "f_cnt": 4,
                "dev_eui": "70b3d50000000001",
            },
            id="5d2c0b8e7a1f4c3d9e6b2a7f0c1d8e3b",
        ),
    ),
    "lorawan undecoded": lambda: _built(
        DEVICE_UNDECODED,
        {
            "dev_eui": "70b3d50000000001",
            "f_port": 2,
            "f_cnt": 7,
            "payload": "AQ==",
            "codec": "nwave-nps405",
            "reason": "too_short",
            "error": "fPort 2 heartbeat: byte 1 (battery): payload too short (1 of 3 bytes)",
        },
        "bay-7",
    ),
}


@pytest.mark.parametrize("name", BUILT)
def test_built_events_pass_every_check(name: str) -> None:
    event = check_event(BUILT[name]())
    assert event["seq"] == 42 and event["seqepoch"] == EPOCH


def test_a_camera_snapshot_passes_every_check(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
    fp32: Detector,  # noqa: F811
) -> None:
    faces = Detector.from_manifest(built_models["centerface"], threads=1)
    snapshotter = Snapshotter("cam-north", faces, persons={"person"}, vehicles={"car"}, max_width=320, jpeg_quality=70)
    frame = next(iter(frames.values()))
    snap = snapshotter.make(frame, fp32.detect(frame).detections, "change", "area north: 3 waiting")
    assert snap is not None and snap["blurred"]["persons"] > 0
    event = check_event(_built(CAMERA_SNAPSHOT, snap, "cam-north"))
    assert event["data"]["width"] == 320 and event["data"]["image"].startswith("/9j/")  # a JPEG, base64
    # A batch of one snapshot and a reading, as the MQTT uplink joins them.
    check_batch(b"[" + _built(CAMERA_SNAPSHOT, snap, "cam-north") + b"," + BUILT["parking"]() + b"]")


DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 100ms}\n"
    "  - {id: cross-n, driver: virtual, kind: crosswalk, interval: 100ms}\n"
)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, bytes]]]:
    """(topic, payload) of two real agents on one broker: gw-single with the fleet channel (so the
    retained inventory) and gw-batch with batching; until every type and a few batches arrived."""
    folder = tmp_path_factory.mktemp("published")
    broker = Mosquitto(folder)
    broker.start()
    sub = Subscriber(broker.port, "ioc/v1/#")
    _, public, key_id = generate_key()
    key = f"{{id: {key_id}, public_key: '{public}', scopes: [read]}}"
    fleet = f"fleet:\n  enabled: true\n  clock: trusted\n  keys: [{key}]\n"
    agents = []
    for gateway, extra in (("gw-single", fleet), ("gw-batch", "")):
        (folder / gateway).mkdir()
        config = write_config(
            folder / gateway / "site.yaml", port=broker.port, devices=DEVICES, extra=extra, health="1s"
        )
        text = config.read_text().replace("gw-test", gateway)
        if gateway == "gw-batch":
            text = text.replace("reconnect_max: 1s}", "reconnect_max: 1s, batch: {enabled: true, max_events: 20}}")
        config.write_text(text)
        agents.append(AgentProcess(config, folder / f"{gateway}.log").start())

    def received() -> list[tuple[str, bytes]]:
        with sub.lock:
            return [(t, p) for t, p, _ in sub.raw if not t.endswith("/status") or t.count("/") > 3]

    def complete() -> bool:
        got = received()
        single = {json.loads(p)["type"] for t, p in got if t.startswith("ioc/v1/gw-single/")}
        batches = [p for t, p in got if t == "ioc/v1/gw-batch/batch"]
        batched = {e["type"] for p in batches for e in json.loads(p)}
        expected = set(EVENT_TYPES) - {CAMERA_SNAPSHOT, GATEWAY_CERT_EXPIRING, *LORAWAN}
        return expected <= single and {GATEWAY_HEALTH, DEVICE_STATUS} <= batched

    try:
        wait_for(complete, 30, "every event type from gw-single and batches with health and status from gw-batch")
        time.sleep(0.2)
        yield received()
    finally:
        for agent in agents:
            agent.kill()
        sub.close()
        broker.stop()


def test_a_running_agents_events_of_every_type_pass_every_check(published: list[tuple[str, bytes]]) -> None:
    seen: dict[str, int] = {}
    for topic, payload in published:
        if topic.startswith("ioc/v1/gw-single/"):
            event = check_event(payload)
            seen[event["type"]] = seen.get(event["type"], 0) + 1
    # the snapshot: the test above; the certificate warning: tests/fleet/test_renewal_e2e.py
    assert set(seen) == set(EVENT_TYPES) - {CAMERA_SNAPSHOT, GATEWAY_CERT_EXPIRING, *LORAWAN}, seen


def test_a_running_agents_batches_pass_every_check(published: list[tuple[str, bytes]]) -> None:
    batches = [p for t, p in published if t == "ioc/v1/gw-batch/batch"]
    events = [e for p in batches for e in check_batch(p)]
    assert len(events) > len(batches)  # at least one batch held several events
    assert {e["type"] for e in events} == set(EVENT_TYPES) - {
        CAMERA_SNAPSHOT,
        GATEWAY_INVENTORY,
        GATEWAY_CERT_EXPIRING,
        *LORAWAN,
    }


def test_the_inventory_names_its_schema(published: list[tuple[str, bytes]]) -> None:
    [inventory, *_] = [json.loads(p) for t, p in published if t == "ioc/v1/gw-single/inventory"]
    assert inventory["dataschema"] == dataschema_for(GATEWAY_INVENTORY)


# ---- the official conformance vectors, through the same envelope checks ------------------------------


def _vectors(name: str) -> list[Any]:
    return [pytest.param(t, id=t["id"]) for t in json.loads((VECTORS / f"{name}.json").read_text())["tests"]]


@pytest.mark.parametrize("vector", _vectors("valid-events"))
def test_valid_vectors_are_accepted(vector: dict[str, Any]) -> None:
    assert vector.get("testType", "ValidSingleEvent") == "ValidSingleEvent"
    assert errors(core_validator(), vector["event"]) == []
    assert errors(spec_validator(), vector["event"]) == []


@pytest.mark.parametrize("vector", _vectors("invalid-events"))
def test_invalid_vectors_are_rejected(vector: dict[str, Any]) -> None:
    assert vector.get("testType", "InvalidSingleEvent") == "InvalidSingleEvent"
    assert errors(core_validator(), vector["event"]) != []


@pytest.mark.parametrize("vector", _vectors("valid-batches"))
def test_valid_batch_vectors_are_accepted(vector: dict[str, Any]) -> None:
    assert errors(core_batch_validator(), vector["batch"]) == []
    assert all(errors(core_validator(), e) == [] and errors(spec_validator(), e) == [] for e in vector["batch"])


@pytest.mark.parametrize("vector", _vectors("invalid-batches"))
def test_invalid_batch_vectors_are_rejected(vector: dict[str, Any]) -> None:
    assert errors(core_batch_validator(), vector["batch"]) != []
