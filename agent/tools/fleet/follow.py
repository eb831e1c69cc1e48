"""After a push: which gateway report answers it, and each gateway's outcome (docs/fleet.md).

A report answers a push when it is about the pushed version and hash and its status is final
(applied, rejected, rolled_back). The retained report the broker hands over on subscribing
counts too: a gateway that already runs this exact document stays ``applied`` and says nothing
new. A report of a lower version, or ``applying``, means the answer is still to come.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

FINAL = ("applied", "rejected", "rolled_back")
NO_ANSWER = "no_answer"
NOT_PUBLISHED = "not_published"  # the broker refused the publish (MQTT 5 PUBACK)
_SHOWN = 200  # characters of a gateway's reason or status echoed at most


@dataclass
class Outcome:
    """How one gateway answered (or did not)."""

    gateway: str
    version: int
    status: str  # one of FINAL, NO_ANSWER or NOT_PUBLISHED
    reason: str = ""
    errors: list[Any] = field(default_factory=list)
    seconds: float | None = None  # from our publish to its answer
    last_report: str = ""  # no answer: what it last reported
    availability: str | None = None  # no answer: its retained status topic (online, offline)

    def as_json(self) -> dict[str, Any]:
        """The outcome as ``push-config --json`` prints it."""
        doc: dict[str, Any] = {"version": self.version, "status": self.status, "reason": self.reason or None}
        doc["errors"] = self.errors
        doc["seconds"] = self.seconds
        if self.status == NO_ANSWER:
            doc["last_report"] = self.last_report or None
            doc["availability"] = self.availability
        return doc


def first_problem(report: dict[str, Any]) -> str:
    """The report's ``reason``, else its first error as ``code field: message``, on one line."""
    reason = report.get("reason")
    if isinstance(reason, str) and reason:
        return _line(reason)
    errors = report.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        where = f" {first['field']}" if isinstance(first.get("field"), str) else ""
        return _line(f"{first.get('code', 'error')}{where}: {first.get('message', '')}")
    return ""


def _line(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _SHOWN else flat[: _SHOWN - 3] + "..."


def _gateway(topic: str, head: str, tail: str) -> str | None:
    """``gw`` of ``{head}{gw}{tail}``, or None."""
    if not (topic.startswith(head) and topic.endswith(tail)) or len(topic) <= len(head) + len(tail):
        return None
    gateway = topic[len(head) : len(topic) - len(tail)]
    return None if "/" in gateway else gateway


class Tracker:
    """Takes every report and availability message (paho's thread) and queues each gateway's answer once."""

    def __init__(self, gateways: Iterable[str], version: int, config_hash: str, root: str, prefix: str) -> None:
        self.version = version
        self.hash = config_hash
        self.answers: queue.Queue[Outcome] = queue.Queue()
        self._order = list(gateways)
        self._waiting = set(self._order)
        self._root = root
        self._prefix = prefix
        self._sent: dict[str, float] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._availability: dict[str, str] = {}
        self._lock = threading.Lock()

    def waiting(self) -> int:
        """How many gateways have not answered yet."""
        with self._lock:
            return len(self._waiting)

    def sent(self, gateway: str, at: float) -> None:
        """Our desired document for ``gateway`` went out at ``at`` (time.monotonic)."""
        with self._lock:
            self._sent[gateway] = at

    def refused(self, gateway: str, reason: str) -> None:
        """The broker refused our publish to ``gateway``: it will never answer."""
        with self._lock:
            if gateway not in self._waiting:
                return
            self._waiting.discard(gateway)
        self.answers.put(Outcome(gateway, self.version, NOT_PUBLISHED, reason=f"the broker refused it ({reason})"))

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message from ``{root}/+/reported`` or ``{prefix}/+/status``."""
        gateway = _gateway(topic, f"{self._root}/", "/reported")
        if gateway is not None:
            self._report(gateway, payload)
            return
        gateway = _gateway(topic, f"{self._prefix}/", "/status")
        if gateway is not None and gateway in self._waiting:
            with self._lock:
                self._availability[gateway] = _line(payload.decode(errors="replace")) or "(empty)"

    def _report(self, gateway: str, payload: bytes) -> None:
        try:
            report = json.loads(payload)
        except ValueError:
            return  # not ours to judge: the status command says what is wrong with it
        if not isinstance(report, dict):
            return
        now = time.monotonic()
        with self._lock:
            if gateway not in self._waiting:
                return
            self._last[gateway] = report
            if not self._answers(report):
                return
            self._waiting.discard(gateway)
            # A retained report of this very document can arrive before our publish: no wait at all.
            seconds = max(0.0, now - self._sent.get(gateway, now))
        errors = report.get("errors")
        self.answers.put(
            Outcome(
                gateway,
                self.version,
                str(report["status"]),
                reason=first_problem(report),
                errors=errors if isinstance(errors, list) else [],
                seconds=round(seconds, 2),
            )
        )

    def _answers(self, report: dict[str, Any]) -> bool:
        version = report.get("version")
        return (
            isinstance(version, int)
            and not isinstance(version, bool)
            and version == self.version
            and report.get("status") in FINAL
            and report.get("hash") in (None, self.hash)  # the same version re-signed with other sections is not ours
        )

    def unanswered(self) -> list[Outcome]:
        """An outcome for each gateway still waiting, in the order given: what it last said, if anything."""
        with self._lock:
            return [
                Outcome(
                    gateway,
                    self.version,
                    NO_ANSWER,
                    reason=first_problem(self._last.get(gateway, {})),
                    last_report=self._describe(self._last.get(gateway)),
                    availability=self._availability.get(gateway),
                )
                for gateway in self._order
                if gateway in self._waiting
            ]

    def _describe(self, report: dict[str, Any] | None) -> str:
        if report is None:
            return ""
        text = f"version {report.get('version')!s:.20} {report.get('status')!s:.20}"
        if report.get("version") == self.version and report.get("hash") not in (None, self.hash):
            text += f" of another document ({report.get('hash')!s:.30})"
        if report.get("status") == "applying" and isinstance(report.get("health_window_ends"), str):
            text += f", health window ends {report['health_window_ends']:.40}"
        return text


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
