"""Installed bundles on the gateway, and the staged apply: stage, switch, commit, or roll back.

In ``<state>/fleet/bundles/`` (folders 0700, files 0600)::

    staging/          unpacking in progress (emptied by ``recover``)
    v0000000042/      an installed bundle: its files and its signed bundle.json
    current -> v0000000042   the running one: a symbolic link replaced by rename (atomic)
    state.json        highest committed version, installed versions, the pending apply, rolled-back versions

``stage`` verifies and unpacks (every hash checked, every file fsynced) into ``staging/`` and renames
the folder to ``v…``; ``switch`` records the apply as pending, then points ``current`` at it;
``commit`` (after the caller's health check) makes it the committed version and keeps the newest
three; ``rollback`` points ``current`` back and never takes that version again. ``recover``, called
first by every operation and by the agent at start, rolls back an apply that was switched but never
committed: after ``kill -9`` anywhere, the previous bundle runs intact, or the new one is committed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import agent
from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError, Manifest, agent_version_ok, parse_unverified
from agent.fleet.bundles.reader import scan
from agent.fleet.bundles.staging import StagingSink, fsync_dir
from agent.fleet.nonces import _write_atomically

log = logging.getLogger(__name__)
audit = logging.getLogger("agent.fleet.audit")

KEEP = 3  # installed bundles kept: the current one and two to go back to by hand
ROLLED_BACK_MAX = 64
MIN_RESERVE = 1024 * 1024
STOPPED = "the apply stopped before its commit"


def folder_name(version: int) -> str:
    """``v0000000042``: sorts by version."""
    return f"v{version:010d}"


def bundles_dir(state_dir: Path) -> Path:
    """Where the bundles of an agent with this state directory live."""
    return state_dir / "fleet" / "bundles"


@dataclass
class State:
    """``state.json``."""

    highest: int = 0
    installed: list[int] = field(default_factory=list)  # committed versions kept, oldest first
    pending: dict[str, Any] | None = None  # {"version": n, "previous": m or None}
    rolled_back: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Staged:
    """A verified bundle unpacked into its own folder, not yet switched to."""

    manifest: Manifest
    folder: Path
    downgrade: bool = False  # older than the highest, allowed by a signed directive (bundles/downgrade.py)


class BundleStore:
    """The bundles folder of one gateway. Not for concurrent use by two processes."""

    def __init__(self, root: Path, *, agent_version: str = agent.__version__) -> None:
        """``root``: ``<state>/fleet/bundles`` (made 0700 on first write)."""
        self.root = root
        self.agent_version = agent_version
        self._state_path = root / "state.json"

    # ---- reading -----------------------------------------------------------------------
    def state(self) -> State:
        """The state file (an empty state if there is none yet)."""
        try:
            doc = json.loads(self._state_path.read_bytes())
            return State(
                int(doc["highest"]),
                [int(v) for v in doc["installed"]],
                dict(doc["pending"]) if doc.get("pending") else None,
                [int(v) for v in doc["rolled_back"]],
            )
        except FileNotFoundError:
            return State()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError("state", [f"{self._state_path}: damaged ({exc}); nothing applied"]) from None

    def current(self) -> tuple[int, Path] | None:
        """The running bundle's version and folder, None if there is none."""
        try:
            name = os.readlink(self.root / "current")
        except (FileNotFoundError, OSError):
            return None
        return int(name[1:]), self.root / name

    def installed_manifest(self, version: int) -> Manifest:
        """The manifest an installed bundle came with (its signature was checked when staged)."""
        return parse_unverified((self.root / folder_name(version) / MANIFEST_NAME).read_bytes())

    def check_installed(self, version: int) -> list[str]:
        """Every problem of an installed bundle's files against its manifest (none: intact)."""
        import hashlib

        folder = self.root / folder_name(version)
        try:
            manifest = self.installed_manifest(version)
        except (OSError, BundleError) as exc:
            return [f"{folder / MANIFEST_NAME}: {exc}"]
        problems: list[str] = []
        for entry in manifest.files:
            try:
                with (folder / entry.path).open("rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
            except OSError as exc:
                problems.append(f"{entry.path}: {exc.strerror or exc}")
                continue
            if digest != entry.sha256:
                problems.append(f"{entry.path}: sha256 mismatch")
        listed = {MANIFEST_NAME, *(e.path for e in manifest.files)}
        for child in folder.rglob("*"):
            rel = child.relative_to(folder).as_posix()
            if not child.is_dir() and rel not in listed:
                problems.append(f"{rel}: not in the manifest")
        return problems

    # ---- the staged apply ----------------------------------------------------------------
    def admit(self, manifest: Manifest, *, reserve_bytes: int | None = None, allow_version: int | None = None) -> None:
        """May this bundle be applied here: version, agent version, free space?

        ``allow_version``: the older version a verified downgrade directive names (that one is not stale).

        Raises:
            BundleError: ``stale``, ``rolled_back_before``, ``busy``, ``agent_too_old`` or ``no_space``.
        """
        state = self.state()
        if state.pending is not None:
            raise BundleError("busy", [f"an apply of version {state.pending.get('version')} is in progress"])
        if manifest.version in state.rolled_back:
            raise BundleError("rolled_back_before", [f"version {manifest.version} was rolled back: never retried"])
        if manifest.version < state.highest and manifest.version != allow_version:
            raise BundleError("stale", [f"version {manifest.version} older than installed {state.highest}"])
        if manifest.version == state.highest:
            raise BundleError("stale", [f"version {manifest.version} is already installed"])
        if not agent_version_ok(manifest.min_agent_version, self.agent_version):
            raise BundleError(
                "agent_too_old",
                [f"min_agent_version {manifest.min_agent_version} is above this agent's {self.agent_version}"],
            )
        self._check_space(manifest, reserve_bytes)

    def stage(
        self,
        path: Path,
        check_envelope: Callable[[bytes], Manifest],
        *,
        reserve_bytes: int | None = None,
        progress: Callable[[str], None] | None = None,
        allow_version: int | None = None,
    ) -> Staged:
        """Verify ``path`` while unpacking it; the folder is renamed into place only once all of it checked.

        ``check_envelope`` verifies the manifest (signature, scope, target, expiry); ``progress`` is
        told each file unpacked. Nothing but ``staging/`` is written until the last hash matched.

        Raises:
            BundleError: the bundle is refused (every code of ``admit`` and ``reader.scan``).
            OSError: the disk filled or failed (``staging.DiskFull`` names the file); nothing changed.
        """
        self.recover()
        staging = self.root / "staging"
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = staging / f"incoming.{secrets.token_hex(6)}"
        folder.mkdir(mode=0o700)
        sink = _Progress(folder, progress)

        def admitted(envelope: bytes) -> Manifest:
            manifest = check_envelope(envelope)
            self.admit(manifest, reserve_bytes=reserve_bytes, allow_version=allow_version)
            return manifest

        try:
            result = scan(path, check_envelope=admitted, strict=True, sink=sink)
            assert result.manifest is not None
            _write_atomically(folder / MANIFEST_NAME, result.envelope)
            sink.sync_folders()
            final = self.root / folder_name(result.manifest.version)
            os.replace(folder, final)  # over an orphan of an earlier attempt, already emptied by recover
            staging.rmdir()
            fsync_dir(self.root)
        except BaseException:
            sink.close()
            shutil.rmtree(folder, ignore_errors=True)
            with suppress(OSError):
                staging.rmdir()
            raise
        return Staged(result.manifest, final, result.manifest.version < self.state().highest)

    def switch(self, staged: Staged) -> None:
        """Make ``staged`` current: recorded as pending first, then ``current`` replaced by rename."""
        state = self.state()
        running = self.current()
        state.pending = {"version": staged.manifest.version, "previous": running[0] if running else None}
        if staged.downgrade:
            state.pending["downgrade"] = True
        self._save(state)
        self._point(staged.manifest.version)
        audit.info("bundle version %d switched to (pending commit)", staged.manifest.version)

    def commit(self) -> int:
        """The pending bundle passed its health check: it is the committed one. Returns its version.

        Raises:
            BundleError(nothing_pending): no apply to commit.
        """
        state = self.state()
        if state.pending is None:
            raise BundleError("nothing_pending", ["no switched bundle waits for a commit"])
        version = int(state.pending["version"])
        state.installed = [*[v for v in state.installed if v != version], version][-KEEP:]
        # A downgrade's version becomes the highest: the versions above it may come again, newer ones too.
        state.highest = version if state.pending.get("downgrade") else max(state.highest, version)
        state.pending = None
        self._save(state)
        self._prune(state)
        audit.info("bundle version %d committed", version)
        return version

    def rollback(self, reason: str) -> int | None:
        """Back to the bundle that ran before the pending one (none: no bundle). Returns the version rolled back."""
        state = self.state()
        if state.pending is None:
            return None
        version = int(state.pending["version"])
        previous = state.pending.get("previous")
        if isinstance(previous, int) and (self.root / folder_name(previous)).is_dir():
            self._point(previous)
        else:
            with suppress(FileNotFoundError):
                (self.root / "current").unlink()
            fsync_dir(self.root)
        state.rolled_back = [*state.rolled_back, version][-ROLLED_BACK_MAX:]
        state.pending = None
        self._save(state)
        self._prune(state)
        audit.warning("bundle version %d rolled back: %s", version, reason)
        return version

    def recover(self) -> int | None:
        """After a crash: staging emptied, an uncommitted switch rolled back. Returns the version rolled back."""
        if not self.root.is_dir():
            return None
        shutil.rmtree(self.root / "staging", ignore_errors=True)
        with suppress(FileNotFoundError):
            (self.root / "current.new").unlink()
        state = self.state()
        if state.pending is not None:
            return self.rollback(STOPPED)
        self._prune(state)
        return None

    # ---- files -------------------------------------------------------------------------
    def _point(self, version: int) -> None:
        link = self.root / "current.new"
        with suppress(FileNotFoundError):
            link.unlink()
        os.symlink(folder_name(version), link)
        os.replace(link, self.root / "current")
        fsync_dir(self.root)

    def _save(self, state: State) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {
            "highest": state.highest,
            "installed": state.installed,
            "pending": state.pending,
            "rolled_back": state.rolled_back,
        }
        _write_atomically(self._state_path, json.dumps(doc, sort_keys=True).encode())

    def _prune(self, state: State) -> None:
        """Remove installed folders beyond the newest ``KEEP`` and any orphan (never the current one)."""
        keep = {folder_name(v) for v in state.installed}
        running = self.current()
        if running is not None:
            keep.add(folder_name(running[0]))
        if state.pending is not None:
            keep.add(folder_name(int(state.pending["version"])))
        for child in self.root.iterdir():
            if child.name.startswith("v") and child.name not in keep and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)

    def reserve(self) -> int:
        """Bytes an apply leaves free for the buffer: 5 % of the file system, at least ``MIN_RESERVE``."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        vfs = os.statvfs(self.root)
        return max(MIN_RESERVE, vfs.f_blocks * vfs.f_frsize // 20)

    def _check_space(self, manifest: Manifest, reserve_bytes: int | None) -> None:
        """The bundle must fit and leave a reserve: the buffer beside it is never what makes room."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        vfs = os.statvfs(self.root)
        free = vfs.f_bavail * vfs.f_frsize
        reserve = reserve_bytes if reserve_bytes is not None else self.reserve()
        block = vfs.f_frsize or 4096
        need = sum(-(-e.size // block) * block + block for e in manifest.files) + 64 * 1024
        if need + reserve > free:
            raise BundleError(
                "no_space",
                [
                    f"the bundle needs {need} bytes and {reserve} must stay free for the buffer;"
                    f" {free} are free on {self.root}"
                ],
            )


class _Progress(StagingSink):
    def __init__(self, folder: Path, progress: Callable[[str], None] | None) -> None:
        super().__init__(folder)
        self._progress = progress

    def end(self, entry: Any) -> None:
        super().end(entry)
        if self._progress is not None:
            self._progress(entry.path)
