"""What remote configuration keeps in the state directory (``<buffer folder>/fleet/config``, 0700).

- ``applied.json``: the last good remote config (the document's sections, version, hash and the
  envelope it came in). Written only once a document passed its health window.
- ``pending.json``: written before an apply starts, removed once its health window passed or it was
  rolled back. Found at start, it means the process died in between: the last good config runs.
- ``history.json``: the latest rejected and rolled-back documents (their reports), so a retained
  one arriving again is recognised without being checked again, and a rolled-back version is
  never retried.

Every write goes through a temporary file, fsync and rename (then fsync of the folder), mode 0600:
a crash at any point leaves the old file or the new one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.fleet.nonces import _write_atomically

log = logging.getLogger(__name__)

HISTORY_MAX = 32  # documents remembered; a retained one is always among the newest


@dataclass(frozen=True)
class Applied:
    """The remote config running as last good."""

    version: int
    hash: str
    sections: dict[str, Any]
    digest: str
    envelope: bytes


def state_dir(buffer_path: Path) -> Path:
    """Where the remote config state of an agent with this buffer lives."""
    return buffer_path.parent / "fleet" / "config"


class DesiredState:
    """The three files, read and written whole."""

    def __init__(self, folder: Path) -> None:
        """Nothing is touched until the first read or write."""
        self.folder = folder
        self.applied_path = folder / "applied.json"
        self.pending_path = folder / "pending.json"
        self.history_path = folder / "history.json"

    # ---- applied ---------------------------------------------------------------------
    def applied(self) -> Applied | None:
        """The last good remote config, None if there is none (or its file is damaged: logged)."""
        doc = self._read(self.applied_path)
        if doc is None:
            return None
        try:
            return Applied(
                int(doc["version"]),
                str(doc["hash"]),
                dict(doc["sections"]),
                str(doc["digest"]),
                base64.b64decode(doc["envelope"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.error("remote config state %s is damaged (%s): the local site file alone runs", self.applied_path, exc)
            return None

    def save_applied(self, applied: Applied) -> None:
        """Make ``applied`` the last good config (atomically)."""
        self._write(
            self.applied_path,
            {
                "version": applied.version,
                "hash": applied.hash,
                "sections": applied.sections,
                "digest": applied.digest,
                "envelope": base64.b64encode(applied.envelope).decode("ascii"),
            },
        )

    # ---- pending ---------------------------------------------------------------------
    def pending(self) -> dict[str, Any] | None:
        """The apply that was in progress, if any; a damaged file still counts as one (version 0)."""
        if not self.pending_path.exists():
            return None
        doc = self._read(self.pending_path)
        return doc if doc is not None else {"version": 0}

    def save_pending(self, doc: dict[str, Any]) -> None:
        """Written, durably, before the reload starts."""
        self._write(self.pending_path, doc)

    def clear_pending(self) -> None:
        """The apply is over (kept or rolled back)."""
        with suppress(FileNotFoundError):
            self.pending_path.unlink()
        self._sync_folder()

    # ---- history ---------------------------------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        """Rejected and rolled-back documents, newest last: ``digest``, ``version``, ``status``, ``report``."""
        doc = self._read(self.history_path)
        entries = doc.get("entries") if isinstance(doc, dict) else None
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def remember(self, entry: dict[str, Any]) -> None:
        """Add a document's outcome, keeping the newest ``HISTORY_MAX``."""
        entries = [*self.history(), entry][-HISTORY_MAX:]
        self._write(self.history_path, {"entries": entries})

    # ---- files -----------------------------------------------------------------------
    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("cannot read remote config state %s (%s)", path, exc)
            return None
        return doc if isinstance(doc, dict) else None

    def _write(self, path: Path, doc: dict[str, Any]) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())

    def _sync_folder(self) -> None:
        with suppress(OSError):
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
