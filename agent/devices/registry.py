"""Finds installed drivers through the ``edge_agent.drivers`` entry point group."""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import entry_points
from typing import TypeVar

from agent.devices.api import DriverPlugin

ENTRY_POINT_GROUP = "edge_agent.drivers"
log = logging.getLogger(__name__)


P = TypeVar("P")


def load_group(group: str, kind: type[P], what: str) -> dict[str, P]:
    """Every plugin of an entry point group by name; a broken one is logged and skipped.

    A plugin must be an instance of ``kind`` whose ``name`` is its entry point's name.
    """
    plugins: dict[str, P] = {}
    for ep in entry_points(group=group):
        try:
            plugin = ep.load()
        except Exception:
            log.exception("%s plugin %r (%s) failed to load; it cannot run", what, ep.name, ep.value)
            continue
        if not isinstance(plugin, kind) or getattr(plugin, "name", None) != ep.name:
            log.error("entry point %r (%s) is not a %s named %r", ep.name, ep.value, kind.__name__, ep.name)
            continue
        plugins[ep.name] = plugin
    return plugins


@cache
def load_plugins() -> dict[str, DriverPlugin]:
    """Every installed driver plugin by name (a broken one is logged and its devices cannot run)."""
    return load_group(ENTRY_POINT_GROUP, DriverPlugin, "driver")
