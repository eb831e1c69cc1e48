"""Finds installed drivers through the ``edge_agent.drivers`` entry point group."""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import entry_points

from agent.devices.api import DriverPlugin

ENTRY_POINT_GROUP = "edge_agent.drivers"
log = logging.getLogger(__name__)


@cache
def load_plugins() -> dict[str, DriverPlugin]:
    """Return every installed driver plugin by name; a broken plugin is logged and skipped."""
    plugins: dict[str, DriverPlugin] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
        except Exception:
            log.exception("driver plugin %r (%s) failed to load; its devices cannot run", ep.name, ep.value)
            continue
        if not isinstance(plugin, DriverPlugin) or plugin.name != ep.name:
            log.error("entry point %r (%s) is not a DriverPlugin named %r", ep.name, ep.value, ep.name)
            continue
        plugins[ep.name] = plugin
    return plugins
