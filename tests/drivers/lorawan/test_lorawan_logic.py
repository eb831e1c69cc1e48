"""One device's messages into events: dedupe that survives a restart, frame counters, bays, health, bad payloads."""

from __future__ import annotations

import base64
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.contract.events import DEVICE_HEALTH, DEVICE_UNDECODED, METER_READING, PARKING_OCCUPANCY, Reading
from agent.contract.schemas import EVENT_MODELS
from drivers.lorawan.codecs import get_codec
from drivers.lorawan.config import LorawanConfig
from drivers.lorawan.journal import LOG, SNAPSHOT, Journal
from drivers.lorawan.logic import DeviceLogic, event_id
from drivers.lorawan.messages import Join, Status, Uplink
from drivers.lorawan.state import KEEP_KEYS, DeviceState

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
HEARTBEAT_OK = bytes([0x00, 0xD3, 0x14, 0x00, 0x59, 0x0B])  # free, 3.344 V, 20 °C
HEARTBEAT_LOW = bytes([0x01, 112, 0x14, 0x00, 0x59, 0x0B])  # occupied, 2.948 V: low above -5 °C


def _config(tmp_path: Path, codec: str = "nwave-nps405", **keys: object) -> LorawanConfig:
    doc = {"id": "bay-17", "driver": "lorawan", "dev_eui": "70B3D50000000001", "codec": codec,
           "application": "2d7c1f0a-4b8e-4f3a-9c1d-5e6f7a8b9c0d",
           "network_server": {"type": "chirpstack", "broker": "127.0.0.1", "state_dir": str(tmp_path / "state")},
           **({"bay": "P1-017"} if codec != "milesight-em300-th" else {}), **keys}  # fmt: skip
    return LorawanConfig.model_validate(doc)


def _logic(config: LorawanConfig, state: DeviceState | None = None) -> DeviceLogic:
    return DeviceLogic(config, get_codec(config.codec), state or DeviceState())


def _up(f_cnt: int, data: bytes, port: int = 1, key: str | None = None, at: int = 0) -> Uplink:
    return Uplink("70b3d50000000001", key or f"dedup-{f_cnt}", f_cnt, port, data, T0 + timedelta(minutes=at),
                  -97.0, 3.5, 2, "bay-17", "Nwave NPS405")  # fmt: skip


def _types(readings: list[Reading] | None) -> list[str]:
    return [r.type for r in readings or []]


def _valid(readings: list[Reading]) -> None:
    for r in readings:
        EVENT_MODELS[r.type].model_validate(r.data)
        assert r.id is not None and len(r.id) == 32 and int(r.id, 16) >= 0


def test_a_duplicate_makes_nothing_and_the_state_survives_a_restart(tmp_path: Path) -> None:
    config = _config(tmp_path, health_interval="1h")
    logic = _logic(config)
    first = logic.uplink(_up(1, b"\x95"), now=0.0)
    assert _types(first) == [PARKING_OCCUPANCY, DEVICE_HEALTH]
    assert first is not None
    _valid(first)
    assert first[0].id == event_id("70b3d50000000001", "dedup-1", PARKING_OCCUPANCY)
    assert first[0].time == T0  # the server's receive time
    assert logic.uplink(_up(1, b"\x95"), now=1.0) is None
    assert logic.duplicates == 1
    folder = config.network_server.state_dir
    journal = Journal(folder)
    journal.load()
    [key] = logic.new_keys
    journal.record(config.dev_eui, logic.state, key)
    journal.flush()  # the agent is killed: no compaction, the log alone has it
    assert stat.S_IMODE((folder / LOG).stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / SNAPSHOT).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    restarted = Journal(folder)
    restarted.load()
    again = _logic(config, restarted.state(config.dev_eui))  # the broker redelivers
    assert again.uplink(_up(1, b"\x95"), now=0.0) is None
    assert again.state.f_cnt == 1 and again.state.occupied is True
    assert (folder / LOG).stat().st_size == 0  # folded into the snapshot at load


def test_only_the_last_64_keys_are_kept(tmp_path: Path) -> None:
    logic = _logic(_config(tmp_path))
    for n in range(1, KEEP_KEYS + 2):
        assert logic.uplink(_up(n, b"\x94"), now=float(n)) is not None
    assert len(logic.state.keys) == KEEP_KEYS
    assert not logic.state.seen("dedup-1") and logic.state.seen(f"dedup-{KEEP_KEYS + 1}")


def test_frame_counter_gaps_count_missed_uplinks_and_a_join_restarts_counting(tmp_path: Path) -> None:
    logic = _logic(_config(tmp_path))
    for n in (1, 2, 5, 6, 9):
        logic.uplink(_up(n, b"\x94"), now=0.0)
    assert logic.missed == 4  # 3, 4, 7, 8
    logic.join(Join("70b3d50000000001", "join/1", T0, None, None))
    assert logic.state.f_cnt is None
    logic.uplink(_up(1, b"\x94", key="after-join-1"), now=0.0)
    logic.uplink(_up(2, b"\x94", key="after-join-2"), now=0.0)
    assert logic.missed == 4 and logic.state.f_cnt == 2
    logic.join(Join("70b3d50000000001", "join/1", T0, None, None))  # the same join, redelivered
    assert logic.state.f_cnt == 2


def test_a_heartbeat_publishes_the_bay_only_to_correct_it(tmp_path: Path) -> None:
    logic = _logic(_config(tmp_path))
    [status, _health] = logic.uplink(_up(1, b"\x94", at=0), now=0.0) or []  # free, 74 min before
    assert status.data["occupied"] is False and status.data["since"] == "2026-12-07T08:00:00.000Z"
    assert status.data["confidence"] == 1.0 and status.data["bay"] == "P1-017"
    assert _types(logic.uplink(_up(2, HEARTBEAT_OK, port=2, at=30), now=1.0)) == []  # agrees: nothing
    [correction, health] = logic.uplink(_up(3, HEARTBEAT_LOW, port=2, at=60), now=2.0) or []
    assert correction.type == PARKING_OCCUPANCY and correction.data["occupied"] is True
    assert correction.data["since"] == "2026-12-07T09:00:00.000Z"  # the uplink that reported the change
    assert health.type == DEVICE_HEALTH and health.data["battery"] == {"volts": 2.948, "class": "low"}
    [same] = logic.uplink(_up(4, b"\x95", at=90), now=3.0) or []  # a status agreeing: published, since kept
    assert same.data["occupied"] is True and same.data["since"] == "2026-12-07T09:00:00.000Z"


def test_health_on_a_battery_class_change_and_otherwise_at_most_every_health_interval(tmp_path: Path) -> None:
    logic = _logic(_config(tmp_path, health_interval="10m"))
    assert DEVICE_HEALTH in _types(logic.uplink(_up(1, HEARTBEAT_OK, port=2), now=0.0))
    assert DEVICE_HEALTH not in _types(logic.uplink(_up(2, HEARTBEAT_OK, port=2), now=60.0))
    low = logic.uplink(_up(4, HEARTBEAT_LOW, port=2), now=120.0) or []
    [health] = [r for r in low if r.type == DEVICE_HEALTH]
    _valid([health])
    assert health.data["missed_uplinks"] == 1 and health.data["gateways"] == 2
    assert (health.data["rssi"], health.data["snr"], health.data["f_cnt"]) == (-97.0, 3.5, 4)
    assert DEVICE_HEALTH in _types(logic.uplink(_up(5, HEARTBEAT_LOW, port=2), now=720.0))  # 10 min later
    status = logic.status(Status("70b3d50000000001", T0, 8.0, 6, False, None, None), now=721.0)
    [report] = status
    assert report.data["battery"]["percent"] == 8.0 and report.data["battery"]["class"] == "critical"
    assert report.data["margin"] == 6


def test_an_undecodable_payload_becomes_an_event_with_its_bytes(tmp_path: Path) -> None:
    logic = _logic(_config(tmp_path))
    [undecoded] = logic.uplink(_up(7, b"\x01", port=2), now=0.0) or []
    assert undecoded.type == DEVICE_UNDECODED
    _valid([undecoded])
    assert undecoded.data["f_port"] == 2 and undecoded.data["f_cnt"] == 7
    assert base64.b64decode(undecoded.data["payload"]) == b"\x01"
    assert undecoded.data["codec"] == "nwave-nps405" and undecoded.data["reason"] == "too_short"
    assert "byte 1" in undecoded.data["error"]
    assert undecoded.data["correlation_id"] is None  # this test's uplink names none
    assert logic.undecoded == ["too_short"]
    assert _types(logic.uplink(_up(8, b"\x95"), now=1.0))[0] == PARKING_OCCUPANCY  # the next one goes on


def test_a_sensor_publishes_meter_readings(tmp_path: Path) -> None:
    logic = _logic(_config(tmp_path, codec="milesight-em300-th"))
    payload = bytes.fromhex("0175640367100104686e")  # battery 100 %, 27.2 °C, 55 %
    readings = logic.uplink(_up(1, payload, port=85), now=0.0) or []
    assert _types(readings) == [METER_READING, DEVICE_HEALTH]
    _valid(readings)
    values = {m["quantity"]: (m["value"], m["unit"]) for m in readings[0].data["measurements"]}
    assert values == {"temperature": (27.2, "degC"), "humidity": (55.0, "%")}
    assert readings[1].data["battery"] == {"percent": 100, "class": "ok"}


def test_the_journal_skips_a_torn_line_and_starts_afresh_from_a_damaged_snapshot(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.load()
    state = journal.state("70b3d50000000001")
    state.f_cnt = 9
    journal.record("70b3d50000000001", state, state.remember("k-9"))
    journal.close()
    with (tmp_path / LOG).open("a") as log:
        log.write('["70b3d50000000001",12345,10,tr')  # killed mid-write
    again = Journal(tmp_path)
    again.load()
    assert again.state("70b3d50000000001").f_cnt == 9 and again.state("70b3d50000000001").seen("k-9")
    (tmp_path / SNAPSHOT).write_text("{not json")
    fresh = Journal(tmp_path)
    fresh.load()
    assert fresh.states == {}
