"""The event contract: envelope building, topics, and docs/events.md kept in sync."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent import schemas
from agent.events import Reading, format_time, make_event, source_for, topic_for

ROOT = Path(__file__).resolve().parent.parent


def test_docs_events_md_matches_the_schemas() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    assert schemas.render_markdown() in doc, "docs/events.md is stale: run python -m agent.schemas --update-doc"


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


def test_nan_is_refused_not_published_as_invalid_json() -> None:
    try:
        make_event(
            gateway="g",
            device="d",
            seq=1,
            now=datetime.now(UTC),
            reading=Reading("city.meter.reading", {"x": float("nan")}),
        )
    except ValueError:
        return
    raise AssertionError("NaN was encoded")


@given(st.datetimes(timezones=st.just(UTC)))
def test_time_format_is_rfc3339_utc_millis(moment: datetime) -> None:
    text = format_time(moment)
    assert len(text) == 24
    assert text.endswith("Z")
    assert abs(datetime.fromisoformat(text).timestamp() - moment.timestamp()) < 0.001


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
