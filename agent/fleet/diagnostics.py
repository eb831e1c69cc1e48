"""``doctor`` and ``diagnostics``: what an operator needs to see of a gateway without a shell on it.

``doctor`` answers the live doctor's rows (agent/fleet/doctor_rows.py). ``diagnostics`` builds a
redacted bundle (agent/fleet/redact.py) of the recent log lines, the running config, versions,
the /metrics text, the health data and the doctor's rows, keeps it as a file
(agent/fleet/bundle.py) and answers its size, sha256 and number of parts;
``diagnostics bundle=<id> part=<n>`` then answers one part, base64. ``edge-agent fleet
diagnostics`` does both and checks the sha256 before saving the file.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.fleet.bundle import BundleStore, BundleTooLarge
from agent.fleet.doctor_rows import doctor_rows
from agent.fleet.logring import log_ring
from agent.fleet.redact import Scrubber
from agent.uplinks.api import Command, Reply

if TYPE_CHECKING:
    from agent.runtime.agent import Agent

log = logging.getLogger(__name__)

BUILD_DEADLINE = 20.0  # seconds to gather and pack a bundle (the doctor's 5 s included)
SHORT_LOG = 200  # log lines kept when the full bundle would be too large
LIBRARIES = (
    "pydantic",
    "PyYAML",
    "paho-mqtt",
    "pymodbus",
    "pyserial",
    "prometheus-client",
    "asyncua",
    "orjson",
    "cryptography",
)


class FleetDiagnostics:
    """The ``doctor`` and ``diagnostics`` handlers of one agent."""

    def __init__(self, agent: Agent) -> None:
        """Starts keeping the recent log lines in memory (agent/fleet/logring.py)."""
        self._agent = agent
        self._ring = log_ring()
        self.store = BundleStore(Path(agent.config.buffer.path).parent / "fleet" / "diagnostics")
        self._building = asyncio.Lock()  # one bundle at a time: each holds a few MB while packed

    async def doctor(self, command: Command) -> Reply:
        """The live doctor's rows; ``data.verdict`` is the worst status among them."""
        rows = await self._rows(Scrubber(self._agent.config))
        return Reply("ok", data={"rows": rows, "verdict": _verdict(rows)})

    async def diagnostics(self, command: Command) -> Reply:
        """No args: build a bundle. ``bundle`` and ``part``: one part of a built bundle."""
        if "bundle" in command.args or "part" in command.args:
            return self._part(command.args)
        if command.args:
            return Reply("rejected", code="bad_args", error="diagnostics takes no args, or bundle= and part=")
        async with self._building:
            try:
                return await asyncio.wait_for(self._build(), BUILD_DEADLINE)
            except TimeoutError:
                return Reply("failed", code="timeout", error=f"the bundle was not ready within {BUILD_DEADLINE:g} s")
            except BundleTooLarge as exc:
                return Reply("failed", code="too_large", error=str(exc))
            except OSError as exc:
                return Reply(
                    "failed", code="unavailable", error=f"cannot write the bundle in {self.store.folder}: {exc}"
                )

    async def _rows(self, scrubber: Scrubber) -> list[dict[str, Any]]:
        rows = await doctor_rows(self._agent)
        return [{k: scrubber.text(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]

    async def _build(self) -> Reply:
        agent = self._agent
        scrubber = Scrubber(agent.config)
        rows = await self._rows(scrubber)
        health = await agent.health.health()
        metrics = await asyncio.to_thread(_metrics_text, agent)
        members = {
            "config.json": scrubber.config(agent.config),
            "versions.json": _json(versions()),
            "metrics.txt": metrics,
            "status.json": _json(health),
            "doctor.json": _json(rows),
        }
        clean = {name: scrubber.text(text).encode() for name, text in members.items()}
        for lines in (None, SHORT_LOG):
            logs = scrubber.text(self._ring.text(lines)).encode()
            manifest = {
                "gateway": agent.config.gateway.id,
                "created": time.time(),
                "agent": __version__,
                "log_lines": logs.count(b"\n"),
                "members": ["manifest.json", "logs.txt", *clean],
            }
            files = {"manifest.json": _json(manifest).encode(), "logs.txt": logs, **clean}
            try:
                bundle = await asyncio.to_thread(self.store.write, files)
            except BundleTooLarge:
                if lines is not None:
                    raise
                continue
            log.info("fleet: diagnostics bundle %s built (%d bytes, %d parts)", bundle.id, bundle.size, bundle.parts)
            return Reply("ok", data=bundle.to_json())
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _part(self, args: dict[str, Any]) -> Reply:
        bundle, part = args.get("bundle"), args.get("part")
        if not isinstance(bundle, str) or not isinstance(part, int) or isinstance(part, bool) or part < 0:
            return Reply(
                "rejected", code="bad_args", error="diagnostics parts need bundle=<id> and part=<n> (0, 1, ...)"
            )
        data = self.store.part(bundle, part)
        if data is None:
            return Reply("rejected", code="unknown_bundle", error=f"no bundle {bundle[:80]!r} here (kept 10 minutes)")
        if not data and part > 0:
            return Reply("rejected", code="bad_args", error=f"bundle {bundle} has fewer than {part + 1} parts")
        return Reply("ok", data={"bundle": bundle, "part": part, "data": base64.b64encode(data).decode("ascii")})


def versions() -> dict[str, Any]:
    """The agent's, Python's and the key libraries' versions, and the platform."""
    libraries: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    return {
        "agent": __version__,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "libraries": libraries,
    }


def _metrics_text(agent: Agent) -> str:
    """What /metrics would serve now (whether or not the endpoint is on); blocking, for a thread."""
    from prometheus_client import generate_latest

    from agent.observability.http import build_registry

    return generate_latest(build_registry(agent.service.metrics_snapshot)).decode()


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n"


def _verdict(rows: list[dict[str, Any]]) -> str:
    statuses = {r.get("status") for r in rows}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"
