"""The event preview: the store's own encoder, checked against the event contract's models."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.ui.preview import preview

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_good_reading_is_the_exact_event_and_valid() -> None:
    data = {"measurements": [{"quantity": "voltage", "value": 230.1, "unit": "V", "quality": "good", "phase": "L1"}]}
    found = preview("gw-1", "meter-1", "city.meter.reading", data, NOW)
    assert found["verdict"] == "valid" and found["problems"] == []
    event = found["event"]
    assert event["specversion"] == "1.0" and event["source"] == "/gateways/gw-1/devices/meter-1"
    assert event["type"] == "city.meter.reading" and event["data"] == data
    assert event["time"] == "2026-12-07T12:00:00.000Z" and event["partitionkey"] == "gw-1/meter-1"


def test_data_outside_the_contract_is_invalid_naming_the_field() -> None:
    data = {"measurements": [{"quantity": "voltage", "value": "high", "unit": "V", "quality": "great"}]}
    found = preview("gw-1", "meter-1", "city.meter.reading", data, NOW)
    assert found["verdict"] == "invalid"
    assert any(p.startswith("data.measurements.0.value:") for p in found["problems"])
    assert any(p.startswith("data.measurements.0.quality:") for p in found["problems"])


def test_an_unknown_type_and_a_nan_are_said_so() -> None:
    found = preview("gw-1", "meter-1", "city.made.up", {"x": 1}, NOW)
    assert found["verdict"] == "invalid" and "not in the event contract" in found["problems"][0]
    nan = {"measurements": [{"quantity": "voltage", "value": float("nan"), "unit": "V", "quality": "good"}]}
    found = preview("gw-1", "meter-1", "city.meter.reading", nan, NOW)
    assert found["verdict"] == "refused" and found["event"] is None
