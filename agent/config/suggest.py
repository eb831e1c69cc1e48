"""``did you mean `eastron-sdm630`?``: the nearest known name to a mistyped one, on its own line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from functools import cache
from typing import Any, get_args

from pydantic import BaseModel


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """A new line naming the closest choice to ``word``, or "" when none is close."""
    if not isinstance(word, str) or not 3 <= len(word) <= 64:
        return ""
    # Only names of about its length can be within the cutoff: a file of a thousand unknown keys
    # stays within the validator's time bound.
    slack = max(2, len(word) // 3)
    near = sorted({c for c in choices if abs(len(c) - len(word)) <= slack})
    close = difflib.get_close_matches(word, near, n=1, cutoff=0.7)
    return f"\n    did you mean `{close[0]}`?" if close else ""


@cache
def known_keys() -> frozenset[str]:
    """Every key name the site file's models know, at any depth (the drivers' and uplinks' included).

    Read from the models' fields, not their JSON Schema: a file with a thousand unknown keys is
    validated within fixed time and memory bounds (tests/config/test_config_hostile.py).
    """
    from agent.config.model import config_model

    names: set[str] = set()
    seen: set[type[BaseModel]] = set()

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                return
            seen.add(annotation)
            for name, info in annotation.model_fields.items():
                names.add(info.alias or name)
                walk(info.annotation)
        for arg in get_args(annotation):
            walk(arg)

    walk(config_model())
    return frozenset(names)
