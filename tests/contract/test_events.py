"""The event contract: envelope building, topics, and docs/events.md kept in sync."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract import schema_files, schemas
from agent.contract.events import Reading, encode_data, format_time, make_event, source_for, topic_for

ROOT = Path(__file__).resolve().parents[2]


def test_docs_events_md_matches_the_schemas() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    assert schema_files.render_markdown() in doc, (
        "docs/events.md is stale: run python -m agent.contract.schema_files --write"
    )


def test_envelope_validates_and_is_compact_json() -> None:
    reading = Reading(
        "city.parking.occupancy",
        {"bay": "A1", "occupied": True, "confidence": 0.9, "since": "2026-01-01T00:00:00.000Z"},
    )
    now = datetime(2026, 11, 23, 8, 0, 0, 123456, tzinfo=UTC)
    payload = make_event(gateway="gw-1", device="bay-a1", seq=7, reading=reading, now=now)
    event = json.loads(payload)
    schemas.CloudEvent.model_validate(event)
    schemas.ParkingOccupancy.model_validate(event["data"])
    assert event["time"] == "2026-11-23T08:00:00.123Z"
    assert event["seq"] == 7
    assert event["source"] == source_for("gw-1", "bay-a1")
    assert event["data"] == reading.data
    assert b" " not in payload  # compact separators
    other = json.loads(make_event(gateway="gw-1", device="bay-a1", seq=7, reading=reading, now=now))
    assert other["id"] != event["id"]


def test_reading_time_wins_and_is_converted_to_utc() -> None:
    from datetime import timedelta, timezone

    taken = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=timezone(timedelta(hours=2)))
    reading = Reading("city.meter.reading", {"measurements": []}, time=taken)
    event = json.loads(make_event(gateway="g", device="d", seq=1, reading=reading, now=datetime.now(UTC)))
    assert event["time"] == "2026-01-02T01:04:05.006Z"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_infinity_are_refused_not_published_as_null(bad: float) -> None:
    # Beside a legitimate null (a bad-quality value), so the fast path must look twice.
    data = {"measurements": [{"value": None}, {"value": [1.5, {"deep": bad}]}]}
    with pytest.raises(ValueError, match="JSON compliant"):
        make_event(gateway="g", device="d", seq=1, now=datetime.now(UTC), reading=Reading("city.meter.reading", data))


@pytest.mark.parametrize("bad", [{1: "int key"}, {"t": datetime(2026, 1, 1, tzinfo=UTC)}, {"s": {1, 2}}])
def test_what_json_has_no_form_for_is_a_type_error(bad: dict[object, object]) -> None:
    with pytest.raises(TypeError):
        encode_data(bad)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_encoded_data_means_what_the_stdlib_would_have_written(value: object) -> None:
    assert json.loads(encode_data(value)) == json.loads(json.dumps(value, allow_nan=False))


@given(st.datetimes(timezones=st.just(UTC)))
def test_time_format_is_rfc3339_utc_millis(moment: datetime) -> None:
    text = format_time(moment)
    assert len(text) == 24
    assert text.endswith("Z")
    # Exact datetime arithmetic: float timestamps in year 4000 are coarser than a millisecond.
    assert timedelta(0) <= moment - datetime.fromisoformat(text) < timedelta(milliseconds=1)


@given(
    st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
    st.sampled_from(["city.meter.reading", "city.device.status", "x.y.z"]),
)
def test_topic_has_four_levels_below_the_prefix(gateway: str, device: str, event_type: str) -> None:
    topic = topic_for("ioc/v1", gateway, device, event_type)
    assert topic.split("/") == ["ioc", "v1", gateway, device, event_type.rsplit(".", 1)[1]]
    assert "+" not in topic
    assert "#" not in topic
