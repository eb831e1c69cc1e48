"""The exact CloudEvent a device's latest reading becomes, and whether it passes the event contract.

Built with the store's own :func:`~agent.contract.events.make_event` (a preview: a fresh id and
``seq`` 1; the buffer gives the published event its own) and checked against the contract's models, the same
ones the published JSON Schemas are generated from (agent/contract/schemas.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from agent.contract.events import Reading, make_event
from agent.contract.schemas import EVENT_MODELS, CloudEvent

MAX_PROBLEMS = 5


def preview(gateway: str, device: str, event_type: str, data: dict[str, Any], moment: datetime) -> dict[str, Any]:
    """``{"type", "event", "verdict", "problems"}``: the event as JSON and the contract's verdict."""
    try:
        raw = make_event(gateway=gateway, device=device, seq=1, reading=Reading(event_type, data, moment), now=moment)
    except ValueError as exc:  # NaN or infinity: JSON cannot carry it, so nothing would be published
        return {"type": event_type, "event": None, "verdict": "refused", "problems": [str(exc)]}
    event = json.loads(raw)
    problems: list[str] = []
    for model, value, where in ((CloudEvent, event, ""), (EVENT_MODELS.get(event_type), event.get("data"), "data.")):
        if model is None:
            problems.append(f"type {event_type} is not in the event contract: no schema to check its data against")
            continue
        try:
            model.model_validate(value)
        except ValidationError as exc:
            for error in exc.errors(include_url=False)[:MAX_PROBLEMS]:
                path = ".".join(str(p) for p in error["loc"])
                problems.append(f"{where}{path}: {error['msg']}")
    return {"type": event_type, "event": event, "verdict": "valid" if not problems else "invalid", "problems": problems}
