"""``did you mean `eastron-sdm630`?``: the nearest known name to a mistyped one, on its own line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from functools import cache
from typing import Any


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """A new line naming the closest choice to ``word``, or "" when none is close."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.7)
    return f"\n    did you mean `{close[0]}`?" if close else ""


@cache
def known_keys() -> frozenset[str]:
    """Every key name the site file's schema knows, at any depth (the drivers' and uplinks' included)."""
    from agent.config.model import json_schema

    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names.update(k for k in node.get("properties", {}) if isinstance(k, str))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json_schema())
    return frozenset(names)
