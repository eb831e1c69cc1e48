"""The page's site file editor: read the file, check a proposed text, apply it, add a scanned device.

Every change goes through :class:`agent.ui.siteapply.SiteEditor` (the validator, a backup, an
atomic write, the in-process reload); ``add`` only proposes a text: the technician sees its
diff and presses Apply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.errors import ConfigError
from agent.ui.answer import Allowed, answer, error
from agent.ui.sessions import Session
from agent.ui.siteapply import MAX_TEXT, Check, SiteEditor, digest

log = logging.getLogger("agent.ui")

MAX_SITE_BODY = MAX_TEXT + 64 * 1024  # the file's own bound, with room for JSON escapes and the base


class _BodyTooLarge(Exception):
    pass


async def _body(request: Request) -> dict[str, Any] | None:
    """The JSON object posted, None if it is not one; _BodyTooLarge past MAX_SITE_BODY (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_SITE_BODY:
        raise _BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SITE_BODY:
            raise _BodyTooLarge
    try:
        value = json.loads(bytes(body) or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _checked(result: Check) -> dict[str, Any]:
    return {"problems": result.problems, "warnings": result.warnings, "diff": result.diff,
            "base": result.base, "change": result.change}  # fmt: skip


class _SiteRoutes:
    def __init__(self, editor: SiteEditor, allowed: Allowed) -> None:
        self.editor = editor
        self.allowed = allowed

    async def _posted(self, request: Request) -> tuple[Session, dict[str, Any]] | Response:
        session = self.allowed(request)
        if isinstance(session, Response):
            return session
        try:
            body = await _body(request)
        except _BodyTooLarge:
            return error(413, f"the request is larger than {MAX_SITE_BODY // 1024} KiB (a site file is at most "
                               f"{MAX_TEXT // 1024} KiB)")  # fmt: skip
        if body is None:
            return error(400, "the request body must be a JSON object")
        return session, body

    @staticmethod
    def _text(body: dict[str, Any]) -> str | Response:
        text = body.get("text")
        if not isinstance(text, str):
            return error(400, "text: the site file's text is needed (a string)")
        return text

    async def read(self, request: Request) -> Response:
        session = self.allowed(request)
        if isinstance(session, Response):
            return session
        try:
            text, writable = await self.editor.current()
        except ConfigError as exc:
            return error(404, "; ".join(exc.problems))
        return answer({"path": str(self.editor.path), "text": text, "base": digest(text), "writable": writable})

    async def check(self, request: Request) -> Response:
        posted = await self._posted(request)
        if isinstance(posted, Response):
            return posted
        text = self._text(posted[1])
        if isinstance(text, Response):
            return text
        try:
            return answer(_checked(await self.editor.check(text)))
        except ConfigError as exc:
            return error(404, "; ".join(exc.problems))

    async def apply(self, request: Request) -> Response:
        posted = await self._posted(request)
        if isinstance(posted, Response):
            return posted
        session, body = posted
        text, base = self._text(body), body.get("base")
        if isinstance(text, Response):
            return text
        if not isinstance(base, str) or len(base) != 64:
            return error(400, "base: the digest GET /api/site gave with the text is needed")
        try:
            applied = await self.editor.apply(text, base, session.user)
        except ConfigError as exc:
            return error(404, "; ".join(exc.problems))
        outcome = asdict(applied)
        outcome["backup"] = applied.backup.name if applied.backup is not None else None
        return answer(outcome)  # the outcome says applied, refused or conflict: each is an answer to show

    async def add(self, request: Request) -> Response:
        from agent.devices.registry import load_plugins  # the driver's own check of its hit: no driver import

        posted = await self._posted(request)
        if isinstance(posted, Response):
            return posted
        driver = posted[1].get("driver", "modbus")
        plugin = load_plugins().get(driver) if isinstance(driver, str) else None
        if plugin is None or plugin.add_hit is None:
            return error(400, f"driver: {str(driver)[:40]!r} cannot add a device from a scan hit here")
        try:
            path = self.editor.path
            text, _ = await self.editor.current()
            proposed, device = plugin.add_hit(text, posted[1].get("hit"), path)
        except ConfigError as exc:
            return error(404, "; ".join(exc.problems))
        except ValueError as exc:
            return error(400, str(exc))
        result = await self.editor.check(proposed)
        return answer({"text": proposed, "device": device, **_checked(result)})


def site_routes(editor: SiteEditor, allowed: Allowed) -> list[Route]:
    """The editor's API: ``allowed(request)`` is the page's session check (a Session, or the refusal)."""
    routes = _SiteRoutes(editor, allowed)
    return [
        Route("/api/site", routes.read),
        Route("/api/site/check", routes.check, methods=["POST"]),
        Route("/api/site/apply", routes.apply, methods=["POST"]),
        Route("/api/site/add", routes.add, methods=["POST"]),
    ]
