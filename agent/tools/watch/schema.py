"""Whether one event conforms to the shipped schemas: the watcher's only tie to them.

Kept to one function so the pydantic models can be swapped for the schema files the contract
ships without touching the checks.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from agent.contract.events import GATEWAY_INVENTORY
from agent.contract.schemas import EVENT_MODELS, CloudEvent

_SHOWN = 3  # schema errors named per event at most


def problems(event: dict[str, Any]) -> str | None:
    """Why ``event`` breaks the envelope's or its type's ``data`` schema, naming the fields; None if it conforms.

    A type the models do not know is checked for its envelope only: the contract grows by new types.
    """
    envelope = event
    if event.get("type") == GATEWAY_INVENTORY and "seq" not in event:
        # The inventory is a state document: the envelope without seq (docs/events.md).
        envelope = {**event, "seq": 1}
    found = _check(CloudEvent, envelope, "")
    if found is None and (model := EVENT_MODELS.get(event["type"])) is not None:
        found = _check(model, event["data"], "data.")
    return found


def _check(model: type[BaseModel], value: Any, prefix: str) -> str | None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors()
        text = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in e['loc']) or '(whole)'}: {e['msg']}" for e in errors[:_SHOWN]
        )
        return text + (f" (+{len(errors) - _SHOWN} more)" if len(errors) > _SHOWN else "")
    return None
