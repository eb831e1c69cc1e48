"""The remote config as the state directory holds it, for ``edge-agent validate`` and ``doctor``:
each section's origin and version, and whether the effective config still validates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.config.model import AgentConfigBase
from agent.config.remote import REMOTE_SECTIONS, load_effective
from agent.errors import ConfigError
from agent.fleet.desired.state import DesiredState, state_dir


@dataclass
class RemoteView:
    """What runs (or would run) over the local file."""

    folder: Path
    version: int = 0  # 0: no remote config, the local file alone
    hash: str | None = None
    sections: tuple[str, ...] = ()
    pending: int | None = None  # the version an unfinished apply was for
    problems: list[str] = field(default_factory=list)  # the effective config's, if it no longer validates
    unreadable: str | None = None
    devices: int | None = None  # in the effective config

    def origins(self) -> list[str]:
        """``devices: remote v7`` / ``priorities: local``, one per section a document may set."""
        return [f"{name}: remote v{self.version}" if name in self.sections else f"{name}: local"
                for name in REMOTE_SECTIONS]  # fmt: skip


def inspect(config: AgentConfigBase, path: Path) -> RemoteView | None:
    """The remote config over ``config`` (the local file at ``path``); None if the fleet channel is off."""
    if not config.fleet.enabled:
        return None
    state = DesiredState(state_dir(config.buffer.path))
    view = RemoteView(state.folder)
    try:
        if not state.folder.exists():
            return view
        pending = state.pending()
        applied = state.applied()
    except OSError as exc:
        view.unreadable = f"cannot read {state.folder}: {exc.strerror or exc}"
        return view
    if pending is not None:
        view.pending = int(pending.get("version") or 0)
    if applied is None:
        return view
    view.version, view.hash, view.sections = applied.version, applied.hash, tuple(sorted(applied.sections))
    try:
        view.devices = len(load_effective(path, applied.sections).devices)
    except ConfigError as exc:
        view.problems = exc.problems
    return view
