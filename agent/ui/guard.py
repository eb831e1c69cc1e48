"""Every request's checks before the page answers (pure ASGI, so the event stream is not buffered).

Foreign ``Host`` (DNS rebinding): 421. Plain HTTP where the page is HTTPS only: 403. An unsafe
method without the page's own header, or from another origin: 403. Every answer carries a
strict Content-Security-Policy: scripts only from the page's own files, no eval, no inline.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSRF_HEADER = b"x-edge-agent"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Guard:
    """Wraps the page's app with the checks above."""

    def __init__(self, app: ASGIApp, hosts: set[str], origin: str, tls: bool) -> None:
        """``hosts``: the ``Host`` values this page answers to; ``origin``: its own origin (scheme://host:port)."""
        self.app = app
        self.hosts = {h.lower() for h in hosts}
        self.origin = origin.lower()
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check, then pass on with the security headers added."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _answer(send, *refusal)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if host not in self.hosts:
            return 421, "this page answers only to its own address"
        if self.tls and scope.get("scheme") != "https":
            return 403, "HTTPS only off loopback"
        if scope["method"] in SAFE_METHODS:
            return None
        if headers.get(CSRF_HEADER) != b"1":
            return 403, "missing the page's request header (X-Edge-Agent: 1)"
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").lower() != self.origin:
            return 403, "request from another site"
        site = headers.get(b"sec-fetch-site")
        if site is not None and site not in (b"same-origin", b"none"):
            return 403, "request from another site"
        return None


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
