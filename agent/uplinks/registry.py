"""Finds installed uplinks through the ``edge_agent.uplinks`` entry point group."""

from __future__ import annotations

import logging
import re
from functools import cache
from importlib.metadata import entry_points

from agent.uplinks.api import ENTRY_POINT_GROUP, UplinkPlugin

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a key under ``uplink:`` and a file name suffix


@cache
def load_uplinks() -> dict[str, UplinkPlugin]:
    """Every installed uplink plugin by name; a broken plugin is logged and skipped."""
    plugins: dict[str, UplinkPlugin] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
        except Exception:
            log.exception("uplink plugin %r (%s) failed to load; it cannot run", ep.name, ep.value)
            continue
        if not isinstance(plugin, UplinkPlugin) or plugin.name != ep.name or not _NAME.match(ep.name):
            log.error("entry point %r (%s) is not an UplinkPlugin named %r", ep.name, ep.value, ep.name)
            continue
        plugins[ep.name] = plugin
    return dict(sorted(plugins.items()))
