"""``/api/clock``: whether the page may set the clock, and setting it to the browser's time.

Offered only while the clock is not synchronised and more than 2 s off from the browser's; the
agent asks systemd-timedated (agent/ui/clock.py). Every attempt is logged with the user, the old
and new time and the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.ui.answer import Allowed, answer, error
from agent.ui.clock import THRESHOLD_S, ClockError, ClockState, read_state, set_time

log = logging.getLogger("agent.ui")

DBUS_TIMEOUT = 3.0  # s per D-Bus call (timedated starts on demand: usually well under 1 s)
# The request's own bound: jeepney's connection greeting (Hello) has no timeout of its own, so a bus
# that accepts but never answers would hold the worker thread; the page answers anyway.
REQUEST_TIMEOUT = 3 * DBUS_TIMEOUT
EARLIEST_MS = 946_684_800_000  # 2000-01-01: a browser time before it is a broken browser clock
LATEST_MS = 4_102_444_800_000  # 2100-01-01

ReadJson = Callable[[Request], Awaitable[dict[str, Any] | None]]


def clock_routes(allowed: Allowed, read_json: ReadJson) -> list[Route]:
    """GET and POST ``/api/clock``, behind the page's session check (``allowed``)."""
    clock = _Clock(allowed, read_json)
    return [Route("/api/clock", clock.get, methods=["GET"]), Route("/api/clock", clock.post, methods=["POST"])]


async def _state() -> ClockState:
    try:
        return await asyncio.wait_for(asyncio.to_thread(read_state, DBUS_TIMEOUT), REQUEST_TIMEOUT)
    except TimeoutError:
        return ClockState(False, None, None, f"no answer on the system bus within {REQUEST_TIMEOUT:g} s")


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Clock:
    def __init__(self, allowed: Allowed, read_json: ReadJson) -> None:
        self.allowed = allowed
        self.read_json = read_json
        self.lock = asyncio.Lock()  # one change at a time

    async def get(self, request: Request) -> Response:
        allowed = self.allowed(request)
        if isinstance(allowed, Response):
            return allowed
        state = await _state()
        refusal = state.refusal()
        return answer(
            {
                "server_time_ms": time.time() * 1000,
                "synchronised": state.synchronised,
                "ntp": state.ntp,
                "timedated": state.timedated,
                "can_set": refusal is None,
                "reason": refusal[1] if refusal else None,
                "threshold_s": THRESHOLD_S,
            }
        )

    async def post(self, request: Request) -> Response:
        received = time.monotonic()  # the browser's time was read just before this request left it
        allowed = self.allowed(request)
        if isinstance(allowed, Response):
            return allowed
        body = await self.read_json(request)
        given = body.get("browser_time_ms") if body is not None else None
        if isinstance(given, bool) or not isinstance(given, int | float) or not math.isfinite(given):
            return error(400, "browser_time_ms: a number of milliseconds since 1970 (UTC) is required")
        if not EARLIEST_MS <= given <= LATEST_MS:
            return error(400, "browser_time_ms: not between 2000 and 2100: check this device's clock")
        async with self.lock:
            return await self._set(allowed.user, float(given), received)

    async def _set(self, user: str, browser_ms: float, received: float) -> Response:
        state = await _state()
        # Where the browser's clock is now: its reading plus what passed since the request arrived.
        target_ms = browser_ms + (time.monotonic() - received) * 1000
        old_ms = time.time() * 1000
        offset_s = (target_ms - old_ms) / 1000
        change = f"{_iso(old_ms)} -> {_iso(target_ms)} ({offset_s:+.1f} s)"
        refusal = state.refusal()
        if refusal is None and abs(offset_s) <= THRESHOLD_S:
            refusal = (
                409,
                f"the clock is within {THRESHOLD_S:g} s of this browser's ({offset_s:+.1f} s): nothing to set",
            )
        if refusal is not None:
            log.warning("ui: clock set by %s: %s: refused: %s", user, change, refusal[1])
            return error(refusal[0], refusal[1])
        try:
            await asyncio.wait_for(asyncio.to_thread(set_time, round(target_ms * 1000), DBUS_TIMEOUT), REQUEST_TIMEOUT)
        except TimeoutError:
            exc = ClockError(
                504, f"systemd-timedated did not answer within {REQUEST_TIMEOUT:g} s: the clock may or may not be set"
            )
            log.error("ui: clock set by %s: %s: failed: %s", user, change, exc.message)
            return error(exc.status, exc.message)
        except ClockError as exc:
            log.error("ui: clock set by %s: %s: failed: %s", user, change, exc.message)
            return error(exc.status, exc.message)
        log.info("ui: clock set by %s: %s: ok", user, change)
        return answer({"old": _iso(old_ms), "new": _iso(target_ms), "offset_s": round(offset_s, 3)})
