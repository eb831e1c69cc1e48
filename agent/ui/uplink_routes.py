"""``POST /api/uplink/check``: each configured uplink checked step by step by its plugin's ``checker``
(the MQTT uplink's: agent/tools/doctor/steps.py, reached through the plugin seam).

The check runs in a worker thread (blocking sockets and paho, each step with its own timeout),
one at a time; the page's event loop keeps serving the live values meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.config.model import AgentConfigBase
from agent.ui.answer import Allowed, answer, error
from agent.uplinks.registry import load_uplinks

log = logging.getLogger("agent.ui")

STEP_TIMEOUT = 5.0  # s per step: DNS, TCP, TLS, CONNACK, PUBACK


def uplink_routes(allowed: Allowed, config: Callable[[], AgentConfigBase]) -> list[Route]:
    """The check's route, behind the page's session check; ``config``: the agent's current config."""
    checker = _Checker(allowed, config)
    return [Route("/api/uplink/check", checker.check, methods=["POST"])]


def run_checks(config: AgentConfigBase, timeout: float) -> list[dict[str, Any]]:
    """Every configured uplink whose plugin can check its connection, in turn (blocking)."""
    plugins = load_uplinks()
    results = []
    for name, settings in config.uplink.present().items():
        plugin = plugins.get(name)
        found = plugin.check(settings, config.gateway.id, timeout) if plugin is not None else None
        if found is not None:
            results.append({"name": name, **found})
    return results


class _Checker:
    def __init__(self, allowed: Allowed, config: Callable[[], AgentConfigBase]) -> None:
        self.allowed = allowed
        self.config = config
        self.lock = asyncio.Lock()

    async def check(self, request: Request) -> Response:
        allowed = self.allowed(request)
        if isinstance(allowed, Response):
            return allowed
        if self.lock.locked():
            return error(409, "a check is already running: wait for its result")
        async with self.lock:
            results = await asyncio.to_thread(run_checks, self.config(), STEP_TIMEOUT)
        for result in results:
            failed = next((s for s in result["steps"] if s["status"] == "fail"), None)
            outcome = "ok" if failed is None else f"failed at {failed['name']}: {failed['cause']}"
            log.info("ui: uplink check of %s (%s) by %s: %s", result["name"], result["target"], allowed.user, outcome)
        if not results:
            return answer({"uplinks": [], "note": "no MQTT uplink is configured (uplink.mqtt)"})
        return answer({"uplinks": results})
