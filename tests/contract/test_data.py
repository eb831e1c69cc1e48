"""The data builders: each type's ``data`` as the schema defines it, in the field order consumers see."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from agent.contract import data
from agent.contract.events import (
    CAMERA_SNAPSHOT,
    CROSSWALK_PRESENCE,
    DEVICE_STATUS,
    METER_READING,
    PARKING_OCCUPANCY,
    encode_data,
)
from agent.contract.schemas import EVENT_MODELS

SINCE = datetime(2026, 11, 23, 8, 12, 27, 158999, tzinfo=UTC)
# The same instant seen from UTC+2: the builders write it in UTC.
SINCE_CEST = datetime(2026, 11, 23, 10, 12, 27, 158999, tzinfo=timezone(timedelta(hours=2)))

CASES: list[tuple[str, dict[str, Any], bytes]] = [
    (
        METER_READING,
        data.meter_reading(
            [
                data.measurement("active_power", 42.1, "kW"),
                data.measurement("voltage", 230, "V", "stale", point="u_l1", reason="timeout", phase="L1"),
                data.measurement("volume", None, "m3", "bad", reason="BadNodeIdUnknown"),
                data.measurement("current", 1.5, "A", point="i_l2", phase="L2"),
            ]
        ),
        b'{"measurements":['
        b'{"quantity":"active_power","value":42.1,"unit":"kW","quality":"good"},'
        b'{"quantity":"voltage","value":230,"unit":"V","quality":"stale","point":"u_l1","reason":"timeout","phase":"L1"},'
        b'{"quantity":"volume","value":null,"unit":"m3","quality":"bad","reason":"BadNodeIdUnknown"},'
        b'{"quantity":"current","value":1.5,"unit":"A","quality":"good","point":"i_l2","phase":"L2"}]}',
    ),
    (
        PARKING_OCCUPANCY,
        data.parking_occupancy("P-07", True, 0.5, SINCE_CEST, point="bay_7"),
        b'{"bay":"P-07","occupied":true,"confidence":0.5,"since":"2026-11-23T08:12:27.158Z","point":"bay_7"}',
    ),
    (
        PARKING_OCCUPANCY,
        data.parking_occupancy("A1", False, 1.0, SINCE),
        b'{"bay":"A1","occupied":false,"confidence":1.0,"since":"2026-11-23T08:12:27.158Z"}',
    ),
    (
        CROSSWALK_PRESENCE,
        data.crosswalk_presence("north", 2, 5, point="waiting_n"),
        b'{"area":"north","count":2,"max_count":5,"point":"waiting_n"}',
    ),
    (
        CROSSWALK_PRESENCE,
        data.crosswalk_presence("south", 0, 0),
        b'{"area":"south","count":0,"max_count":0}',
    ),
    (
        DEVICE_STATUS,
        data.device_status("offline", "TimeoutError: no answer", "modbus", 3, SINCE),
        b'{"status":"offline","reason":"TimeoutError: no answer","driver":"modbus","consecutive_failures":3,'
        b'"since":"2026-11-23T08:12:27.158Z"}',
    ),
    (
        DEVICE_STATUS,
        data.device_status("online", None, "virtual", 0, SINCE_CEST),
        b'{"status":"online","reason":null,"driver":"virtual","consecutive_failures":0,'
        b'"since":"2026-11-23T08:12:27.158Z"}',
    ),
    (
        CAMERA_SNAPSHOT,
        data.camera_snapshot("interval", None, 640, 360, "/9j/4A==", {"persons": 1, "vehicles": 2, "faces": 0}),
        b'{"reason":"interval","trigger":null,"media_type":"image/jpeg","width":640,"height":360,"image":"/9j/4A==",'
        b'"blurred":{"persons":1,"vehicles":2,"faces":0}}',
    ),
    (
        CAMERA_SNAPSHOT,
        data.camera_snapshot("change", "bay P-7 occupied", 320, 180, "AAAA", {"persons": 0, "vehicles": 1, "faces": 0}),
        b'{"reason":"change","trigger":"bay P-7 occupied","media_type":"image/jpeg","width":320,"height":180,'
        b'"image":"AAAA","blurred":{"persons":0,"vehicles":1,"faces":0}}',
    ),
]


@pytest.mark.parametrize(("event_type", "built", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_builder_output_validates_and_is_exactly_the_expected_json(
    event_type: str, built: dict[str, Any], expected: bytes
) -> None:
    EVENT_MODELS[event_type].model_validate(built)
    # Bytes, not dict equality: the field order is part of what consumers and tests compare.
    assert encode_data(built) == expected


def test_meter_reading_keeps_the_callers_list() -> None:
    # No copy on the hot path: the driver's list is the event's.
    measurements = [data.measurement("counter", 7, "")]
    assert data.meter_reading(measurements)["measurements"] is measurements


def test_the_schema_catches_a_quality_the_builder_does_not_check() -> None:
    # The builder does not validate (hot path); the schema is the oracle that catches a bad quality.
    wrong = data.meter_reading([data.measurement("voltage", 1.0, "V", "unknown")])
    with pytest.raises(ValueError, match="quality"):
        EVENT_MODELS[METER_READING].model_validate(wrong)
