"""What a LoRaWAN device remembers across agent restarts: its dedupe keys, frame counter and bay state.

One small JSON file per device (``{state_dir}/{dev_eui}.json``, 0600 in a 0700 folder), written
after a change (at most once a second) and when the device stops. The last 64 dedupe keys catch a
redelivery of anything the agent already turned into events, the broker's queued messages after
a restart included.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEEP_KEYS = 64


@dataclass
class DeviceState:
    """One device's memory."""

    f_cnt: int | None = None  # last frame counter of this session; None: none yet (or a join since)
    keys: deque[str] = field(default_factory=lambda: deque(maxlen=KEEP_KEYS))
    occupied: bool | None = None  # detectors: the bay's last published state
    since: str | None = None  # ... and when it entered it (RFC 3339)
    battery_class: str | None = None
    _index: set[str] = field(default_factory=set, repr=False)

    def seen(self, key: str) -> bool:
        """Whether an uplink with this dedupe key was handled already."""
        return key in self._index

    def remember(self, key: str) -> None:
        """Keep ``key``; the oldest of the 64 goes."""
        if len(self.keys) == KEEP_KEYS:
            self._index.discard(self.keys[0])
        self.keys.append(key)
        self._index.add(key)

    def to_json(self) -> dict[str, Any]:
        return {"f_cnt": self.f_cnt, "keys": list(self.keys), "occupied": self.occupied, "since": self.since,
                "battery_class": self.battery_class}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any) -> DeviceState:
        """A state from its file's content; ValueError if it is not one."""
        if not isinstance(doc, dict) or not isinstance(doc.get("keys", []), list):
            raise ValueError("not a device state")
        state = cls()
        f_cnt, occupied = doc.get("f_cnt"), doc.get("occupied")
        state.f_cnt = f_cnt if isinstance(f_cnt, int) else None
        state.occupied = occupied if isinstance(occupied, bool) else None
        state.since = doc["since"] if isinstance(doc.get("since"), str) else None
        state.battery_class = doc["battery_class"] if isinstance(doc.get("battery_class"), str) else None
        for key in doc.get("keys", [])[-KEEP_KEYS:]:
            if isinstance(key, str):
                state.remember(key)
        return state


class StateFile:
    """Where one device's state lives."""

    def __init__(self, folder: Path, dev_eui: str) -> None:
        self.path = folder / f"{dev_eui}.json"

    def load(self) -> DeviceState:
        """The saved state; a fresh one if there is none or it cannot be read (said in the log)."""
        try:
            return DeviceState.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return DeviceState()
        except (OSError, ValueError) as exc:
            log.warning("lorawan state %s cannot be read (%s); starting afresh: a redelivered uplink may be "
                        "published again, with the same event id", self.path, exc)  # fmt: skip
            return DeviceState()

    def save(self, state: DeviceState) -> None:
        """Write ``state`` atomically (0600); a failure is logged, never raised."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            temp = self.path.with_suffix(".tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(state.to_json(), out, separators=(",", ":"))
            os.replace(temp, self.path)
        except OSError as exc:
            log.warning("lorawan state %s cannot be written: %s", self.path, exc)
