"""The checks every event the agent emits must pass, against the shipped schema files and official CloudEvents tools.

Shared by the tests of built events, of a running agent's events and of the official vectors, so
the vectors go through exactly the envelope checks the agent's events do.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.conversion import to_json
from cloudevents.v1.http import from_json
from jsonschema import Draft7Validator, Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from agent.contract import schema_files
from agent.contract.events import GATEWAY_INVENTORY

VECTORS = Path(__file__).resolve().parent / "vectors"


@cache
def registry() -> Registry[Any]:
    """Every shipped schema file by its ``$id``, so batch.json's reference to envelope.json resolves."""
    resources = [(s["$id"], Resource.from_contents(s, DRAFT202012)) for s in schema_files.load_all().values()]
    return Registry().with_resources(resources)


@cache
def validator(name: str) -> Draft202012Validator:
    """A 2020-12 validator of the shipped schema ``name`` (formats checked where jsonschema can)."""
    return Draft202012Validator(
        schema_files.load(name), registry=registry(), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


@cache
def core_validator() -> Draft202012Validator:
    """CloudEvents 1.0 for any producer: envelope.json's ``$defs/cloudevents-1.0``."""
    return Draft202012Validator(
        {"$ref": schema_files.uri("envelope") + "#/$defs/cloudevents-1.0"},
        registry=registry(),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


@cache
def core_batch_validator() -> Draft202012Validator:
    """A CloudEvents JSON batch for any producer: an array of ``$defs/cloudevents-1.0``."""
    core = {"$ref": schema_files.uri("envelope") + "#/$defs/cloudevents-1.0"}
    return Draft202012Validator({"type": "array", "items": core}, registry=registry())


@cache
def spec_validator() -> Draft7Validator:
    """The specification's own cloudevents.json (draft-07), vendored from cloudevents/spec."""
    schema = json.loads((VECTORS / "cloudevents.json").read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, format_checker=Draft7Validator.FORMAT_CHECKER)


def errors(v: Draft202012Validator | Draft7Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in v.iter_errors(instance)]


def sdk_round_trip(raw: bytes | str) -> None:
    """The official Python SDK parses the event and writes it back to the same event, in both its APIs."""
    original = json.loads(raw)
    fmt = JSONFormat()
    event = fmt.read(None, raw)
    attributes = event.get_attributes()
    assert {k: v for k, v in attributes.items() if k != "time"} == {
        k: v for k, v in original.items() if k not in ("time", "data")
    }
    assert event.get_data() == original["data"]
    again = fmt.read(None, fmt.write(event))
    assert again.get_attributes() == attributes and again.get_data() == event.get_data()
    legacy = from_json(raw)  # the 1.x API (cloudevents.http), kept in 2.x as cloudevents.v1
    assert json.loads(to_json(legacy)) == original  # it keeps time as text: an exact round trip


def check_event(raw: bytes) -> dict[str, Any]:
    """Every check of one event the agent published; returns it decoded."""
    event: dict[str, Any] = json.loads(raw)
    assert errors(validator("envelope"), event) == [], event["type"]
    assert errors(validator(event["type"]), event["data"]) == [], event["type"]
    if event["type"] != GATEWAY_INVENTORY:  # agent/fleet builds the inventory: see test_the_inventory_names_its_schema
        assert event["dataschema"] == schema_files.load(event["type"])["$id"]
    assert errors(spec_validator(), event) == [], event["type"]
    sdk_round_trip(raw)
    return event


def check_batch(raw: bytes) -> list[dict[str, Any]]:
    """A batch payload: batch.json as a whole, then every element as a single event."""
    batch: list[dict[str, Any]] = json.loads(raw)
    assert isinstance(batch, list) and batch
    assert errors(validator("batch"), batch) == []
    # The SDK has no batch reader: the batch format is a JSON array of structured-mode events.
    return [check_event(json.dumps(element).encode()) for element in batch]
