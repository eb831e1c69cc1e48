"""Signed requests from the operations centre: checked, rate-limited, audited, then run once.

Every request is a signed envelope (agent/fleet/envelope.py); nothing in it is trusted before
the signature, its type, the key's scope, the target, the time window and the nonce are
checked. A refusal is a reply with a reason code, counted and logged (at most once per code
per minute); it never changes anything and never stops the events.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.fleet.config import FleetConfig
from agent.fleet.envelope import COMMAND_TYPE, Refused, TrustedKey, verify
from agent.fleet.nonces import NonceStore
from agent.observability.clock import kernel_clock_sync
from agent.uplinks.api import Command, Reply

log = logging.getLogger(__name__)

# The scope a key needs for each command; a command not listed here does not exist remotely.
SCOPE_OF = {
    "ping": "read",
    "status": "read",
    "read": "read",
    "write": "write",
    "restart": "restart",
    "doctor": "diagnostics",
    "diagnostics": "diagnostics",
}
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines for one refusal code
RAN_IDS = 1024  # request ids remembered (each until its envelope expires), so none runs twice


class FleetChannel:
    """Checks each request against the site file's ``fleet:`` section and runs it."""

    def __init__(
        self,
        config: FleetConfig,
        gateway: str,
        state_dir: Path,
        run: Callable[[Command], Awaitable[Reply]],
    ) -> None:
        """``run`` executes a verified command (the inbound router's handlers)."""
        self.gateway = gateway
        self._run = run
        self._nonces = NonceStore(state_dir / "fleet" / "nonces.json")
        self.refused: Counter[str] = Counter()
        self.accepted = 0
        self._logged_at: dict[str, float] = {}
        self._window_start = time.monotonic()
        self._in_window = 0
        self._ran: OrderedDict[str, datetime] = OrderedDict()  # request id -> its envelope's expiry
        self.configure(config)

    @property
    def nonces(self) -> NonceStore:
        """The nonces of accepted documents: shared with remote configuration (one file, one writer)."""
        return self._nonces

    def configure(self, config: FleetConfig) -> None:
        """Take the keys, groups and limits of a (re)loaded site file."""
        self.config = config
        self._keys = {k.id: TrustedKey.from_text(k.id, k.public_key, k.scopes) for k in config.keys}
        self._groups = frozenset(config.groups)

    def _admit(self) -> bool:
        """At most ``requests_per_minute`` per rolling minute (checked before any parsing)."""
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start, self._in_window = now, 0
        self._in_window += 1
        return self._in_window <= self.config.requests_per_minute

    async def request(self, name: str, request_id: str, data: bytes, *, origin: str) -> Reply:
        """Verify and run one request; every outcome is a reply."""
        if not self._admit():
            return self._refuse(Refused("rate_limited", "too many requests: try again in a minute"), origin)
        scope = SCOPE_OF.get(name)
        if scope is None:
            known = ", ".join(sorted(SCOPE_OF))
            return Reply("unsupported", code="unknown_command", error=f"no command {name!r}; known: {known}")
        synced = (True, "") if self.config.clock == "trusted" else kernel_clock_sync()
        try:
            verified = verify(
                data,
                payload_type=COMMAND_TYPE,
                scope=scope,
                keys=self._keys,
                gateway=self.gateway,
                groups=self._groups,
                nonces=self._nonces,
                clock_synced=synced[0] if synced is not None else None,
            )
            body = verified.body
            if body.get("command") != name:
                raise Refused("malformed", f"the signed command is not {name!r}", "payload.command")
            if body.get("id", request_id) != request_id:
                raise Refused("malformed", "the signed request id is not the one in the topic", "payload.id")
            args = body.get("args", {})
            if not isinstance(args, dict):
                raise Refused("malformed", "args must be an object", "payload.args")
            self._run_once(request_id, verified.expires_at)
        except Refused as exc:
            return self._refuse(exc, origin)
        self.accepted += 1
        log.info("fleet: %s %s from %s signed by %s", name, request_id, origin, verified.key_id)
        return await self._run(Command(name, args, origin))

    def _run_once(self, request_id: str, expires_at: datetime) -> None:
        """Remember ``request_id``; Refused(duplicate_id) if a request under it already ran.

        The nonce store refuses the same envelope twice; this refuses a new envelope reusing an
        id (the operator's answer would be ambiguous). Kept in memory: the last ``RAN_IDS`` ids,
        each until its envelope expires.
        """
        now = datetime.now(UTC)
        while self._ran and (len(self._ran) >= RAN_IDS or next(iter(self._ran.values())) <= now):
            self._ran.popitem(last=False)
        if self._ran.get(request_id, now) > now:
            raise Refused("duplicate_id", f"request id {request_id!r} already ran: sign the request under a new id")
        self._ran.pop(request_id, None)
        self._ran[request_id] = expires_at

    def count_refusal(self, code: str, origin: str) -> None:
        """A refusal decided before this channel saw the request (by the uplink): counted and logged."""
        self._refuse(Refused(code, "refused by the uplink"), origin)

    def _refuse(self, exc: Refused, origin: str) -> Reply:
        self.refused[exc.code] += 1
        now = time.monotonic()
        if now - self._logged_at.get(exc.code, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._logged_at[exc.code] = now
            log.warning("fleet: refused a request from %s: %s (%d so far)", origin, exc, self.refused[exc.code])
        data: dict[str, Any] = {"field": exc.field} if exc.field else {}
        return Reply("rejected", data=data, error=exc.message, code=exc.code)
