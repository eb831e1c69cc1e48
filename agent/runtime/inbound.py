"""The inbound channel: what uplinks hand the core from the operations centre.

Writes go to a device's driver; commands go to a handler by name. Commands run off the event
path, a few at a time; each gets a :class:`~agent.uplinks.api.Reply`, never an exception.
Handlers for remote configuration and fleet commands register here (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.devices.api import Driver
from agent.errors import DriverWriteError
from agent.uplinks.api import Command, Reply, Reports

if TYPE_CHECKING:  # loaded only when fleet.enabled (it brings cryptography)
    from agent.fleet.channel import FleetChannel

log = logging.getLogger(__name__)

COMMANDS_AT_ONCE = 4  # commands running at the same time; the rest wait their turn
Handler = Callable[[Command], Awaitable[Reply]]
DocumentHandler = Callable[[bytes, str], Awaitable[None]]


class InboundRouter:
    """Implements :class:`~agent.uplinks.api.Inbound` for every uplink."""

    def __init__(self, driver_of: Callable[[str], Driver | None]) -> None:
        """``driver_of``: the running driver of a device id, or None."""
        self._driver_of = driver_of
        self._handlers: dict[str, Handler] = {}
        self._slots = asyncio.Semaphore(COMMANDS_AT_ONCE)
        self.channel: FleetChannel | None = None  # the fleet channel, when it is on
        self.reports = Reports()  # what the fleet channel publishes (reported state, inventory)
        self._documents: dict[str, DocumentHandler] = {}

    async def request(self, name: str, request_id: str, data: bytes, *, origin: str) -> Reply:
        """A signed request: checked by the fleet channel, then run like any command."""
        if self.channel is None:
            return Reply("unsupported", code="disabled", error="this gateway takes no remote requests (fleet.enabled)")
        return await self.channel.request(name, request_id, data, origin=origin)

    def refused(self, code: str, *, origin: str) -> None:
        """An uplink's own refusal: counted by the fleet channel (one log line per code a minute)."""
        if self.channel is not None:
            self.channel.count_refusal(code, origin)

    def handle(self, name: str, handler: Handler) -> None:
        """Route commands called ``name`` to ``handler``."""
        self._handlers[name] = handler

    def take_documents(self, kind: str, handler: DocumentHandler) -> None:
        """Route desired-state documents of ``kind`` to ``handler(data, origin)``."""
        self._documents[kind] = handler

    async def document(self, kind: str, data: bytes, *, origin: str) -> None:
        """A desired-state document: to its handler; one nobody takes is logged and left."""
        handler = self._documents.get(kind)
        if handler is None:
            log.warning("a %s document from %s was ignored: nothing here takes %s documents", kind, origin, kind)
            return
        try:
            await handler(data, origin)
        except Exception:  # the handler reports its refusals itself; this is a bug, kept off the uplink
            log.exception("the %s document from %s failed", kind, origin)

    async def write(self, device: str, point: str, value: Any, *, origin: str) -> None:
        """A write an uplink allowed: handed to the device's driver, and logged either way."""
        driver = self._driver_of(device)
        if driver is None:
            raise DriverWriteError(f"device {device} is not running", "unavailable")
        try:
            await driver.write(point, value)
        except Exception as exc:
            log.warning("%s write %s.%s = %r refused: %s", origin, device, point, value, exc)
            raise
        log.info("%s write %s.%s = %r done", origin, device, point, value)

    async def command(self, command: Command) -> Reply:
        """Run one command through its handler; an unknown name or a failure is a reply too."""
        handler = self._handlers.get(command.name)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return Reply("unsupported", error=f"no command {command.name!r} here; this agent runs: {known}")
        async with self._slots:
            try:
                return await handler(command)
            except Exception as exc:
                log.warning("command %s from %s failed", command.name, command.origin, exc_info=True)
                return Reply("failed", error=f"{type(exc).__name__}: {exc}")
