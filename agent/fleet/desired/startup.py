"""The effective config at start, before anything runs: the last good remote config over the local file.

An apply still marked pending means the process died during it or during its health window: that
version is recorded as rolled back (never retried) and the last good config runs, so ``kill -9`` at
any point leaves the old config or the new one, never a mix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config.model import AgentConfigBase
from agent.config.remote import RemoteConfigError, load_effective
from agent.errors import ConfigError
from agent.fleet.desired.document import Problem
from agent.fleet.desired.report import Report, Running
from agent.fleet.desired.state import Applied, DesiredState, state_dir

log = logging.getLogger(__name__)

STOPPED = "the agent stopped during the health window"


@dataclass
class Start:
    """What start-up found: the state, what runs, and the first report."""

    state: DesiredState
    running: Running
    sections: dict[str, Any]
    applied: Applied | None
    report: Report
    history: list[dict[str, Any]] = field(default_factory=list)


def at_start(local: AgentConfigBase, path: Path) -> tuple[AgentConfigBase, Start]:
    """The config to run and the state behind it (raises OSError if the state cannot be written)."""
    state = DesiredState(state_dir(local.buffer.path))
    from agent.fleet.bundles.startup import prepare  # an update bundle's part of the same state

    prepare(local.buffer.path, state)
    applied = state.applied()
    pending = state.pending()
    rolled_back: dict[str, Any] | None = None
    if pending is not None:
        if applied is not None and pending.get("digest") == applied.digest:
            state.clear_pending()  # it had passed its window: killed between the two writes
        else:
            rolled_back = {
                "digest": pending.get("digest"),
                "version": pending.get("version", 0),
                "hash": pending.get("hash"),
                "status": "rolled_back",
                "reason": STOPPED,
                "errors": [],
            }
            state.remember(rolled_back)  # first: a crash now still finds the pending file
            state.clear_pending()
            log.warning(
                "remote config version %s was being applied when the agent stopped: rolled back to %s",
                rolled_back["version"],
                f"remote version {applied.version}" if applied is not None else "the local site file",
            )
    config, running, sections = local, Running(), {}
    report: Report | None = None
    if applied is not None:
        try:
            config = load_effective(path, applied.sections)
        except ConfigError as exc:
            errors = exc.fields if isinstance(exc, RemoteConfigError) else []
            report = Report(
                applied.version,
                "rejected",
                running,
                applied.hash,
                reason="the applied remote config no longer validates with the local site file; the local file runs",
                errors=[Problem(p.field, "invalid", p.message) for p in errors],
            )
            log.error("remote config version %d ignored: %s", applied.version, "; ".join(exc.problems))
            applied = None
        else:
            running = Running(applied.version, applied.hash, tuple(sorted(applied.sections)))
            sections = applied.sections
            log.info("remote config version %d runs over %s (%s)", applied.version, path, ", ".join(running.sections))
    if rolled_back is not None:
        report = Report(rolled_back["version"], "rolled_back", running, rolled_back["hash"], reason=STOPPED)
    if report is None:
        report = Report(running.version, "applied", running, running.hash)
    return config, Start(state, running, sections, applied, report, state.history())
