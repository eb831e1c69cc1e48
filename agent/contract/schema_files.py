"""The contract's JSON Schema files: generated from the models in schemas.py, shipped, read back.

One file per event type (the schema of its ``data``: what the event's ``dataschema`` names), one
for the envelope and one for a batch, JSON Schema draft 2020-12, in ``schemas/v1/`` of the
repository. The package ships the same files (``agent/contract/shipped_schemas`` is a link to
``schemas/``), so an installed agent prints them (``edge-agent schema --events``) and a consumer
tool can validate against exactly what this version of the agent promises.

``python -m agent.contract.schema_files --write`` rewrites the files and the index in
docs/events.md after a model changes; ``--check`` exits 1 when they differ from the code (a
test does the same).
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from agent.contract import events
from agent.contract.schemas import EVENT_MODELS, CloudEvent
from agent.docblock import replace_block

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ENVELOPE, BATCH = "envelope", "batch"
# Where the files live, relative to the repository root and to the shipped folder.
FOLDER = Path("schemas") / events.CONTRACT_VERSION

# RFC 3339 date-time (what CloudEvents' Timestamp is): a full date, seconds, a zone with hours 00-23.
_RFC3339 = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?"
    r"([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
# RFC 2046 media type: type/subtype of token characters, parameters after a semicolon.
_MEDIA_TYPE = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(\s*;.*)?$"

# CloudEvents 1.0 in the JSON format, whoever produced the event: the envelope file applies it to
# the agent's events, and a consumer can use it alone (``envelope.json#/$defs/cloudevents-1.0``)
# to tell "not a CloudEvent" from "not this contract". Stricter than the specification's own
# cloudevents.json, which leaves specversion, attribute names, time and both-data-forms unchecked.
CLOUDEVENTS_1_0: dict[str, Any] = {
    "description": "CloudEvents 1.0, JSON event format: the specification's rules for any producer.",
    "type": "object",
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "format": "uri-reference", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "datacontenttype": {"type": ["string", "null"], "pattern": _MEDIA_TYPE},
        "dataschema": {"type": ["string", "null"], "format": "uri", "pattern": r"^[A-Za-z][A-Za-z0-9+.-]*:."},
        "subject": {"type": ["string", "null"], "minLength": 1},
        "time": {"type": ["string", "null"], "format": "date-time", "pattern": _RFC3339},
        "data": {},
        "data_base64": {"type": ["string", "null"], "contentEncoding": "base64"},
    },
    "required": ["specversion", "id", "source", "type"],
    # Extension attribute names: lower-case letters and digits (data_base64 is the format's own).
    "propertyNames": {"pattern": "^([a-z0-9]+|data_base64)$"},
    # Extension values: String, Boolean, Integer and the types carried as strings (URI, Timestamp, Binary).
    "additionalProperties": {"type": ["string", "boolean", "integer", "null"]},
    "not": {"required": ["data", "data_base64"]},
}


def _head(schema_id: str) -> dict[str, Any]:
    return {"$schema": DRAFT, "$id": schema_id, "version": events.CONTRACT_VERSION}


def uri(name: str) -> str:
    """The ``$id`` of schema ``name`` (for an event type: its events' ``dataschema``)."""
    return f"{events.SCHEMA_BASE}{name}.json"


def _envelope() -> dict[str, Any]:
    schema = _head(uri(ENVELOPE)) | CloudEvent.model_json_schema()
    # The inventory is a retained state document without seq (docs/events.md); every other event has one.
    schema["required"] = [r for r in schema["required"] if r != "seq"]
    schema["allOf"] = [{"$ref": "#/$defs/cloudevents-1.0"}]
    schema["if"] = {"properties": {"type": {"const": events.GATEWAY_INVENTORY}}, "required": ["type"]}
    schema["else"] = {"required": ["seq"]}
    schema["$defs"] = {"cloudevents-1.0": CLOUDEVENTS_1_0}
    return schema


def _batch() -> dict[str, Any]:
    return _head(uri(BATCH)) | {
        "title": "CloudEventBatch",
        "description": "A batch on {prefix}/{gateway}/batch (CloudEvents JSON batch format, "
        "application/cloudevents-batch+json): the events that would have gone to the per-device topics, in order.",
        "type": "array",
        "items": {"$ref": f"{ENVELOPE}.json"},
    }


def generate() -> dict[str, dict[str, Any]]:
    """Every schema by name: envelope, batch, then each event type's ``data``."""
    out = {ENVELOPE: _envelope(), BATCH: _batch()}
    for event_type in events.EVENT_TYPES:
        out[event_type] = _head(events.dataschema_for(event_type)) | EVENT_MODELS[event_type].model_json_schema()
    return out


def render(schema: dict[str, Any]) -> str:
    """A schema file's exact text."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def differences(folder: Path) -> list[str]:
    """How the files in ``folder`` differ from what the code generates; empty when they agree."""
    wanted = {f"{name}.json": render(schema) for name, schema in generate().items()}
    found = {p.name for p in folder.glob("*.json")} if folder.is_dir() else set()
    out = [f"{folder / n}: missing" for n in sorted(wanted.keys() - found)]
    out += [f"{folder / n}: not generated by the code (remove it)" for n in sorted(found - wanted.keys())]
    out += [f"{folder / n}: differs" for n in sorted(found & wanted.keys()) if (folder / n).read_text() != wanted[n]]
    return out


def write(folder: Path) -> list[str]:
    """Write every file whose text changed; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, schema in generate().items():
        path, text = folder / f"{name}.json", render(schema)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path.name)
    return changed


class UnknownSchema(KeyError):
    """No schema file of that name; ``known`` lists the names there are."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name, self.known = name, known

    def __str__(self) -> str:
        return f"unknown event type {self.name!r}; known: {', '.join(self.known)}"


def names() -> list[str]:
    """The shipped schemas' names: envelope, batch and the event types, in that order."""
    return [ENVELOPE, BATCH, *events.EVENT_TYPES]


def shipped_folder() -> Any:
    """The installed package's schema folder (an importlib.resources Traversable)."""
    return resources.files("agent.contract").joinpath("shipped_schemas", events.CONTRACT_VERSION)


def load(name: str) -> dict[str, Any]:
    """The shipped schema ``name`` (an event type, ``envelope`` or ``batch``).

    Raises:
        UnknownSchema: no schema of that name.
        FileNotFoundError: the package was installed without its schema files.
    """
    if name not in names():
        raise UnknownSchema(name, names())
    loaded: dict[str, Any] = json.loads(shipped_folder().joinpath(f"{name}.json").read_text(encoding="utf-8"))
    return loaded


def load_all() -> dict[str, dict[str, Any]]:
    """Every shipped schema by name."""
    return {name: load(name) for name in names()}


BEGIN, END = "<!-- schemas:begin -->", "<!-- schemas:end -->"


def render_markdown() -> str:
    """The generated index in docs/events.md: each schema file, its ``$id`` and what it describes."""
    rows = ["| schema | file | `$id` (an event's `dataschema`) |", "|---|---|---|"]
    what = {ENVELOPE: "envelope (every event)", BATCH: "batch (a JSON array of events)"}
    for name in names():
        path = (FOLDER / f"{name}.json").as_posix()
        rows.append(f"| {what.get(name, f'`{name}`: `data`')} | [{path}](../{path}) | `{uri(name)}` |")
    return "\n".join([BEGIN, "", *rows, "", END])


def update_doc(path: Path) -> bool:
    """Rewrite the generated block in ``path``; returns whether it changed."""
    return replace_block(path, BEGIN, END, render_markdown())


def main(argv: list[str]) -> int:
    """``--write [ROOT]``: rewrite the files and the docs index; ``--check [ROOT]``: exit 1 if they differ."""
    if not argv or argv[0] not in ("--write", "--check"):
        print("usage: python -m agent.contract.schema_files --write|--check [REPOSITORY ROOT]", file=sys.stderr)
        return 2
    root = Path(argv[1]) if len(argv) > 1 else Path()
    if argv[0] == "--write":
        changed = write(root / FOLDER)
        doc = update_doc(root / "docs" / "events.md")
        print(f"{root / FOLDER}: {', '.join(changed) or 'up to date'}; docs/events.md: {'updated' if doc else 'ok'}")
        return 0
    problems = differences(root / FOLDER)
    for problem in problems:
        print(f"{problem}: run python -m agent.contract.schema_files --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
