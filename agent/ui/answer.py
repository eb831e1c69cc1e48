"""What every route of the page shares: the session check's type and its JSON answers, never
cached (they carry live state, verdicts and errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent.ui.sessions import Session

NO_STORE = {"cache-control": "no-store"}

# The page's session check: the session, or the answer that refuses the request.
Allowed = Callable[[Request], Session | Response]


def answer(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON answer the browser must not cache."""
    return JSONResponse(data, status, headers=NO_STORE | (headers or {}))


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` with ``status``."""
    return answer({"error": message}, status, headers)
