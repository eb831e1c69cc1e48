"""The reported document: what this gateway says about the newest desired document and what it runs.

Put on the core's Reports (the fleet channel publishes it retained, on every connection and on
each change), at most once a second: a burst of hostile documents costs the broker one message a
second, and the newest report wins.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.config.remote import REMOTE_SECTIONS
from agent.contract.events import format_time
from agent.fleet.desired.document import Problem
from agent.uplinks.api import Reports

REPORT_INTERVAL = 1.0  # seconds between two reports at most


@dataclass(frozen=True)
class Running:
    """What runs: the remote version (0: the local file alone), its hash and sections."""

    version: int = 0
    hash: str | None = None
    sections: tuple[str, ...] = ()


@dataclass
class Report:
    """One reported document, before it becomes JSON."""

    version: int
    status: str
    running: Running
    hash: str | None = None
    reason: str | None = None
    errors: list[Problem] = field(default_factory=list)
    health_window_ends: datetime | None = None

    def to_json(self, gateway: str) -> dict[str, Any]:
        """The document as published (docs/fleet.md)."""
        doc: dict[str, Any] = {
            "gateway": gateway,
            "time": format_time(datetime.now(UTC)),
            "version": self.version,
            "status": self.status,
        }
        if self.hash is not None:
            doc["hash"] = self.hash
        running: dict[str, Any] = {"version": self.running.version}
        if self.running.hash is not None:
            running["hash"] = self.running.hash
        doc["running"] = running
        if self.errors:
            doc["errors"] = [e.to_json() for e in self.errors]
        if self.reason is not None:
            doc["reason"] = self.reason
        doc["sections"] = origins(self.running)
        if self.health_window_ends is not None:
            doc["health_window_ends"] = format_time(self.health_window_ends)
        return doc


def origins(running: Running) -> dict[str, dict[str, Any]]:
    """Each section's origin: ``{"origin": "remote", "version": 41}`` or ``{"origin": "local"}``."""
    return {
        name: {"origin": "remote", "version": running.version} if name in running.sections else {"origin": "local"}
        for name in REMOTE_SECTIONS
    }


class Reporter:
    """Puts reports on the core's Reports, paced; ``last`` is the newest one."""

    def __init__(self, gateway: str, reports: Reports) -> None:
        """Nothing is put until :meth:`put`."""
        self.gateway = gateway
        self._reports = reports
        self.last: Report | None = None
        self._sent_at = -REPORT_INTERVAL
        self._later: asyncio.TimerHandle | None = None

    def put(self, report: Report, *, now: bool = False) -> None:
        """Report; within a second of the previous one, later (the newest waiting one wins).

        ``now``: a transition (applying, applied, rolled back) the operator waits for: not held back.
        """
        self.last = report
        wait = self._sent_at + REPORT_INTERVAL - time.monotonic()
        if now or wait <= 0:
            self._send()
            return
        if self._later is None:
            self._later = asyncio.get_running_loop().call_later(wait, self._send)

    def _send(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self.last is None:
            return
        self._sent_at = time.monotonic()
        self._reports.put("reported", encode(self.last.to_json(self.gateway)))

    def body(self) -> Mapping[str, Any] | None:
        """The newest report as JSON (tests, the doctor)."""
        return None if self.last is None else self.last.to_json(self.gateway)


def encode(doc: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()
