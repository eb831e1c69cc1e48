"""Change the site file from the page: check a proposed text, show its diff, apply it in process.

Every action on the page that changes the site (the editor, adding a scanned device, the zone
editor) goes through here, so a change is validated by the same validator as ``edge-agent
validate``, names its problems as ``file:line: field: message``, keeps the previous file as a
backup, and is applied by the same in-process reload as SIGHUP: unchanged devices poll on.
A change the running agent refuses (``gateway.id`` needs a restart...) puts the old file back,
so the file on disk and what runs never disagree.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config.model import AgentConfigBase
    from agent.runtime.agent import Agent

log = logging.getLogger("agent.ui")

MAX_TEXT = 1024 * 1024  # the validator's own bound on a site file (agent/config/yaml_load.py)
KEEP_BACKUPS = 10  # <file>.<stamp>.bak files kept next to the site file, the newest


def digest(text: str) -> str:
    """The SHA-256 of a site file's text: the page sends it back so a change is made to what it showed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Check:
    """What a proposed text would do: its problems (none: it validates), warnings and diff."""

    problems: list[str]
    warnings: list[str]
    diff: str  # unified diff, current file -> proposed text
    base: str  # digest of the current file
    change: str  # short hash of the diff: names the change in the log


@dataclass
class Applied:
    """The outcome of an apply: ``applied``, ``refused`` (problems), ``conflict`` (the file changed meanwhile)."""

    outcome: str
    problems: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    backup: Path | None = None
    change: str = ""


def read_site(path: Path) -> str:
    """The site file's current text ('' if it does not exist yet)."""
    return _decode(_read_bytes(path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _decode(raw: bytes) -> str:
    # newline="" semantics: the text the page shows and hashes is the file's, "\r\n" and all
    return raw.decode("utf-8", errors="replace")


def writable(path: Path) -> bool:
    """Whether the agent can replace the site file (it writes a new file beside it, then renames)."""
    folder_ok = os.access(path.parent, os.W_OK | os.X_OK)
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


def _diff(path: Path, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"{path} (now)", f"{path} (proposed)"
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


Loader = Callable[[Path], "AgentConfigBase"]


def _validate(load: Loader, path: Path, text: str) -> tuple[list[str], AgentConfigBase | None]:
    """Problems of ``text`` as if it were ``path`` (validated in a temporary file beside it, never in place)."""
    if len(text.encode("utf-8")) > MAX_TEXT:
        return [f"{path}: the file would be larger than {MAX_TEXT // 1024} KiB"], None
    try:
        # Beside the file: relative paths in it (password files, profiles/) resolve as they will.
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=path.parent)
    except OSError as exc:
        return [
            f"{path.parent}: cannot validate here: {exc.strerror or exc} (the folder must be writable by the agent)"
        ], None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        try:
            return [], load(Path(temp))
        except ConfigError as exc:
            return [p.replace(temp, str(path)) for p in exc.problems], None
    finally:
        os.unlink(temp)


def check(agent: Agent, text: str) -> Check:
    """Validate a proposed site text and diff it against the file (blocking: call in a thread)."""
    from agent.config.model import config_warnings

    path = _site_path(agent)
    old = read_site(path)
    problems, config = _validate(agent.load_file, path, text)
    diff = _diff(path, old, text)
    warnings = config_warnings(config) if config is not None else []
    if config is not None:
        warnings += _restart_needed(agent.config, config)
    return Check(problems, warnings, diff, digest(old), digest(diff)[:16])


def _restart_needed(running: AgentConfigBase, new: AgentConfigBase) -> list[str]:
    """What an in-process reload does not apply: said before Apply, not only after it."""
    found = []
    if new.gateway.id != running.gateway.id or new.buffer != running.buffer:
        found.append("gateway.id, buffer: changing them needs a restart; Apply will refuse this change")
    if new.ui != running.ui:
        found.append("ui: the page's own settings take effect at the next restart of the agent")
    return found


def _site_path(agent: Agent) -> Path:
    if agent.config_path is None:
        raise ConfigError(["the agent was not started from a site file (-c FILE): there is nothing to edit"])
    return agent.config_path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically (a power cut leaves the old file or the new one, never half)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _backup(path: Path, old: bytes, mode: int) -> Path:
    """Keep the previous file as ``<name>.<UTC stamp>.bak`` with its mode (it may name secrets)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    n = 2
    while backup.exists():
        backup, n = path.with_name(f"{path.name}.{stamp}-{n}.bak"), n + 1
    _write(backup, old, mode)
    for stale in backups(path)[:-KEEP_BACKUPS]:
        stale.unlink(missing_ok=True)
    return backup


def backups(path: Path) -> list[Path]:
    """The page's backups of ``path``, oldest first."""
    found = [p for p in path.parent.glob(f"{path.name}.*.bak") if _STAMP.fullmatch(p.name[len(path.name) + 1 :])]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


_STAMP = re.compile(r"\d{8}T\d{6}Z(-\d+)?\.bak")


class SiteEditor:
    """Applies page changes to one agent's site file, one at a time."""

    def __init__(self, agent: Agent) -> None:
        """Changes ``agent.config_path`` and reloads ``agent``."""
        self._agent = agent
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        """The site file (ConfigError: the agent was not started from one)."""
        return _site_path(self._agent)

    async def current(self) -> tuple[str, bool]:
        """The file's text now, and whether the agent can write it."""
        path = self.path
        raw = await asyncio.to_thread(_read_bytes, path)
        return _decode(raw), await asyncio.to_thread(writable, path)

    async def check(self, text: str) -> Check:
        """What ``text`` would change, and whether it validates."""
        return await asyncio.to_thread(check, self._agent, text)

    async def apply(self, text: str, base: str, user: str) -> Applied:
        """Validate, back up, write and reload; ``base`` is the digest of the file the change was made to."""
        async with self._lock:
            path = _site_path(self._agent)
            raw = await asyncio.to_thread(_read_bytes, path)
            old = _decode(raw)
            change = digest(_diff(path, old, text))[:16]
            if digest(old) != base:
                log.warning("ui: site change %s by %s: conflict (the file changed since it was shown)", change, user)
                return Applied("conflict", [f"{path} changed since the page read it: reload it and redo the change"],
                               change=change)  # fmt: skip
            problems, new = await asyncio.to_thread(_validate, self._agent.load_file, path, text)
            if new is None:
                log.warning("ui: site change %s by %s: refused (%d problems)", change, user, len(problems))
                return Applied("refused", problems, change=change)
            if text == old:
                log.info("ui: site change %s by %s: applied (the file is unchanged)", change, user)
                return Applied("applied", change=change)
            return await self._write_and_reload(path, raw, text, new, user, change)

    async def _write_and_reload(
        self, path: Path, raw: bytes, text: str, new: AgentConfigBase, user: str, change: str
    ) -> Applied:
        agent = self._agent
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
        backup: Path | None = None
        try:
            backup = await asyncio.to_thread(_backup, path, raw, mode) if raw else None
            await asyncio.to_thread(_write, path, text.encode("utf-8"), mode)
        except OSError as exc:
            if backup is not None:
                backup.unlink(missing_ok=True)
            log.error("ui: site change %s by %s: not written: %s", change, user, exc)
            why = f"{path}: cannot write: {exc.strerror or exc} (the folder must be writable by the agent)"
            return Applied("refused", [why], change=change)
        agent.service.reloading()
        try:
            changes = await agent.reload(new)
        except ConfigError as exc:
            # The old bytes go back and the backup (the same bytes) goes: nothing changed.
            await asyncio.to_thread(_write, path, raw, mode)
            if backup is not None:
                backup.unlink(missing_ok=True)
            log.warning("ui: site change %s by %s: refused by the running agent, file restored", change, user)
            return Applied("refused", list(exc.problems), change=change)
        finally:
            agent.service.ready()
        log.info("ui: site change %s by %s: applied (%s); previous file kept as %s", change, user,
                 ", ".join(changes) or "no changes", backup)  # fmt: skip
        return Applied("applied", changes=changes, backup=backup, change=change)
