"""What the responder issued, per serial: one 0600 JSON file, written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.fleet.nonces import _write_atomically

_VERSION = 1


@dataclass(frozen=True)
class Issued:
    """One certificate."""

    serial_number: str  # hex
    gateway_id: str
    not_after: str
    issued_at: str
    how: str  # claim | renewal


class Ledger:
    """``{"version": 1, "serials": {serial: [issued, ...]}}``."""

    def __init__(self, path: Path) -> None:
        """Reads the file if it exists.

        Raises:
            ValueError: the file exists but is not a ledger (naming it).
        """
        self.path = path
        self.serials: dict[str, list[Issued]] = {}
        try:
            doc: Any = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"state_file {path}: unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != _VERSION or not isinstance(doc.get("serials"), dict):
            raise ValueError(f"state_file {path}: not a version {_VERSION} responder state file")
        try:
            self.serials = {s: [Issued(**i) for i in items] for s, items in doc["serials"].items()}
        except TypeError as exc:
            raise ValueError(f"state_file {path}: malformed entry ({exc})") from None

    def issued(self, serial: str) -> list[Issued]:
        """Certificates issued to a serial, oldest first."""
        return self.serials.get(serial, [])

    def add(self, serial: str, issued: Issued) -> None:
        """Record an issuance and write the file (before the answer goes out)."""
        self.serials.setdefault(serial, []).append(issued)
        doc = {"version": _VERSION, "serials": {s: [i.__dict__ for i in v] for s, v in self.serials.items()}}
        _write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
