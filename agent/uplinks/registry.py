"""Finds installed uplinks through the ``edge_agent.uplinks`` entry point group."""

from __future__ import annotations

import logging
import re
from functools import cache

from agent.devices.registry import load_group
from agent.uplinks.api import ENTRY_POINT_GROUP, UplinkPlugin

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a key under ``uplink:`` and a file name suffix


@cache
def load_uplinks() -> dict[str, UplinkPlugin]:
    """Every installed uplink plugin by name, sorted; a broken one is logged and skipped."""
    plugins = load_group(ENTRY_POINT_GROUP, UplinkPlugin, "uplink")
    for name in [n for n in plugins if not _NAME.match(n)]:
        log.error("uplink plugin %r: a name is lowercase letters, digits and _ (it is a key and a file suffix)", name)
        del plugins[name]
    return dict(sorted(plugins.items()))
