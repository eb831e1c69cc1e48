"""The remote configuration's state: what runs over the site file, and from which version."""

from __future__ import annotations

from pathlib import Path

from agent.config.model import AgentConfigBase
from agent.fleet.desired.inspect import inspect
from agent.tools.doctor.report import Row


def check_remote_config(config: AgentConfigBase, path: Path) -> list[Row]:
    """One row: the sections a remote document set (origin and version), or why it cannot be said."""
    view = inspect(config, path)
    if view is None:
        return []
    where = str(view.folder)
    if view.unreadable is not None:
        return [Row("remote-config", where, "warn", view.unreadable, "run the doctor as the service user or root")]
    if view.problems:
        finding = f"version {view.version} no longer validates over the site file: {view.problems[0]}"
        return [Row("remote-config", where, "FAIL", finding, "fix the site file, or push a new version that fits it")]
    if view.pending is not None:
        finding = f"version {view.pending} was being applied when the agent stopped (rolled back at the next start)"
        return [Row("remote-config", where, "warn", finding, "see the reported document: edge-agent fleet status")]
    if view.version == 0:
        return [Row("remote-config", where, "ok", "no remote config applied: the site file alone runs")]
    origins = ", ".join(view.origins())
    return [Row("remote-config", where, "ok", f"version {view.version} ({view.hash}): {origins}")]
