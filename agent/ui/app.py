"""The page's routes: setup with the one-time token, password, login, status, live events, diagnostics.

Sessions are cookies (HttpOnly, SameSite=Strict, Secure under TLS). Every change is logged
with who made it and the outcome.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.ui.answer import NO_STORE, Allowed, answer, error
from agent.ui.bus_routes import BusRoutes
from agent.ui.clock_routes import clock_routes
from agent.ui.guard import Guard
from agent.ui.sessions import Session, Sessions
from agent.ui.state import PASSWORD_MIN, UiState
from agent.ui.uplink_routes import uplink_routes

if TYPE_CHECKING:
    from agent.config.model import AgentConfigBase

log = logging.getLogger("agent.ui")

COOKIE = "ea_session"
USER = "technician"  # one role on the page: whoever holds the device password
EVENT_INTERVAL = 0.5  # seconds between live updates (the issue allows 5 a second)
MAX_BODY = 4096  # bytes of a JSON request body
STATIC = ("index.html", "app.js", "app.css")
# The page parts' scripts, served as one /app.js after app.js itself: one request, whatever the
# number of parts (the issue allows 5 requests before the first value).
SCRIPTS = ("app.js", "site.js", "zones.js", "bus.js", "ops.js")
TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


class Source(Protocol):
    """What the page reads and does: the agent's status, and a diagnostics bundle."""

    async def snapshot(self) -> dict[str, Any]:
        """The page's data."""
        ...

    async def bundle(self) -> Path:
        """A redacted diagnostics bundle (.tar.gz) built now."""
        ...

    def previews(self, device: str) -> list[dict[str, Any]] | None:
        """The CloudEvents a device's latest readings become, with their verdicts; None: no such device."""
        ...

    def site_config(self) -> AgentConfigBase:
        """The agent's current config (as last loaded or reloaded)."""
        ...


# A part of the page with its own routes (the zone editor...), given the session check.
Part = Callable[[Allowed], list[Route]]


def build_app(
    source: Source,
    state: UiState,
    *,
    hosts: set[str],
    origin: str,
    tls: bool,
    parts: Sequence[Part] = (),
    devices: Callable[[], list[Any]] = list,
) -> Guard:
    """The page as an ASGI app, behind its guard; ``devices``: the site's device configs (the bus tools')."""
    page = _Page(source, state, tls)
    routes = [
        Route("/", page.static("index.html")),
        Route("/app.js", page.static("app.js")),
        Route("/app.css", page.static("app.css")),
        Route("/api/session", page.session_info),
        Route("/api/setup", page.setup, methods=["POST"]),
        Route("/api/login", page.login, methods=["POST"]),
        Route("/api/logout", page.logout, methods=["POST"]),
        Route("/api/password", page.password, methods=["POST"]),
        Route("/api/status", page.status),
        Route("/api/events", page.events),
        Route("/api/bundle", page.bundle),
        Route("/api/preview/{device}", page.preview),
        *BusRoutes(page._allowed, page._json, devices).routes(),
        *clock_routes(page._allowed, page._json),
        *uplink_routes(page._allowed, lambda: source.site_config()),
    ]
    for part in parts:
        routes += part(page._allowed)
    return Guard(Starlette(routes=routes), hosts, origin, tls)


async def json_body(request: Request, limit: int) -> dict[str, Any] | None:
    """A request's JSON object, read no further than ``limit`` bytes; None if larger or not an object."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _Page:
    def __init__(self, source: Source, state: UiState, tls: bool) -> None:
        self.source = source
        self.state = state
        self.tls = tls
        self.sessions = Sessions()
        self.files = resources.files("agent.ui") / "static"

    def static(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        names = SCRIPTS if name == "app.js" else (name,)
        data = b"\n".join((self.files / each).read_bytes() for each in names)
        packed = gzip.compress(data, 9, mtime=0)  # once: a phone on a weak site link loads a third
        media = TYPES[name.rsplit(".", 1)[-1]]
        headers = {"cache-control": "no-cache", "vary": "accept-encoding"}

        async def serve(request: Request) -> Response:
            # Only these fixed files are compressed, never an API answer (no secret next to guessable text).
            if "gzip" in request.headers.get("accept-encoding", ""):
                return Response(packed, media_type=media, headers=headers | {"content-encoding": "gzip"})
            return Response(data, media_type=media, headers=headers)

        return serve

    # ---- sessions ----------------------------------------------------------------------
    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE), self.state.password_stamp())

    def _with_cookie(self, response: Response, sid: str) -> Response:
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", secure=self.tls, path="/")
        return response

    async def _json(self, request: Request) -> dict[str, Any] | None:
        return await json_body(request, MAX_BODY)

    async def session_info(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None:
            state = "set_password" if session.must_set_password else "ok"
        else:
            state = "login" if self.state.has_password() else "setup"
        return answer({"state": state})

    async def setup(self, request: Request) -> Response:
        body = await self._json(request)
        token = body.get("token") if body is not None else None
        if not isinstance(token, str) or not token:
            return error(401, "the setup token is missing: run edge-agent ui token on the gateway")
        if self.sessions.limited():
            return error(429, "too many failed attempts: wait a minute")
        if self.state.take_token(token[:200]).outcome != "ok":
            self.sessions.failed()
            log.warning("ui: a setup token was refused (wrong, used or expired)")
            return error(403, "this setup token is wrong, used or expired: run edge-agent ui token for a new one")
        sid = self.sessions.open(USER, None, must_set_password=True)
        log.info("ui: setup token used by %s: ok; a password must be set next", USER)
        return self._with_cookie(JSONResponse({"state": "set_password"}), sid)

    async def password(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return error(401, "log in first")
        body = await self._json(request)
        new = body.get("password") if body is not None else None
        if not isinstance(new, str) or len(new) < PASSWORD_MIN or len(new) > 200:
            return error(400, f"password: at least {PASSWORD_MIN} characters (at most 200)")
        stamp = await asyncio.to_thread(self.state.set_password, new)
        self.sessions.close(request.cookies.get(COOKIE))
        sid = self.sessions.open(session.user, stamp)
        change = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        log.info("ui: device password set by %s (change %s): ok", session.user, change)
        return self._with_cookie(JSONResponse({"state": "ok"}), sid)

    async def login(self, request: Request) -> Response:
        if self.sessions.limited():
            return error(429, "too many failed logins: wait a minute")
        body = await self._json(request)
        given = body.get("password") if body is not None else None
        stamp = await asyncio.to_thread(self.state.check_password, given[:200]) if isinstance(given, str) else None
        if stamp is None:
            self.sessions.failed()
            log.warning("ui: failed login")
            return error(401, "wrong password (edge-agent ui reset on the gateway sets a new one)")
        log.info("ui: %s logged in", USER)
        return self._with_cookie(JSONResponse({"state": "ok"}), self.sessions.open(USER, stamp))

    async def logout(self, request: Request) -> Response:
        self.sessions.close(request.cookies.get(COOKIE))
        response = JSONResponse({"state": "login"})
        response.delete_cookie(COOKIE, httponly=True, samesite="strict", secure=self.tls, path="/")
        return response

    def _allowed(self, request: Request) -> Session | Response:
        session = self._session(request)
        if session is None:
            return error(401, "log in first")
        if session.must_set_password:
            return error(403, "set the device password first")
        return session

    # ---- what the page shows -------------------------------------------------------------
    async def status(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        return answer(await self.source.snapshot())

    async def events(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        sid = request.cookies.get(COOKIE)

        async def stream() -> AsyncIterator[bytes]:
            while True:
                # A session that ended (logout, idle, password reset) ends its stream too.
                if self.sessions.get(sid, self.state.password_stamp()) is None:
                    yield b"event: end\ndata: {}\n\n"
                    return
                yield b"data: " + json.dumps(await self.source.snapshot()).encode() + b"\n\n"
                await asyncio.sleep(EVENT_INTERVAL)

        headers = NO_STORE | {"x-accel-buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def preview(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        device = request.path_params["device"]
        found = self.source.previews(device)
        if found is None:
            return error(404, f"no device {device[:64]!r} in the site file")
        return answer({"device": device, "events": found})

    async def bundle(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        try:
            path = await self.source.bundle()
        except Exception as exc:
            log.error("ui: diagnostics bundle for %s: failed: %s", allowed.user, exc)
            return error(503, f"the bundle could not be built: {exc}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        log.info("ui: diagnostics bundle %s (sha256 %s) downloaded by %s: ok", path.name, digest[:16], allowed.user)
        return FileResponse(path, media_type="application/gzip", filename=path.name,
                            headers=NO_STORE)  # fmt: skip
