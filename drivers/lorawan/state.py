"""What a LoRaWAN device remembers across agent restarts: its dedupe keys, frame counter and bay state.

The last 64 dedupe keys (as 64-bit digests) catch a redelivery of anything the agent already turned
into events, the broker's queued messages after a restart included. drivers/lorawan/journal.py
keeps them on disk.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any

KEEP_KEYS = 64


def digest(key: str) -> int:
    """A dedupe key as 64 bits: 10,000 devices x 64 keys fit in 5 MB (strings in a set took 90)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass(slots=True)
class DeviceState:
    """One device's memory (slots: 10,000 of them)."""

    f_cnt: int | None = None  # last frame counter of this session; None: none yet (or a join since)
    occupied: bool | None = None  # detectors: the bay's last published state
    since: str | None = None  # ... and when it entered it (RFC 3339)
    battery_class: str | None = None
    # The last KEEP_KEYS keys' digests, a ring (``_next`` is the oldest once full): a linear scan
    # of 64 machine words is as fast as a set lookup and an eighth of its memory.
    _keys: array[int] = field(default_factory=lambda: array("Q"), repr=False)
    _next: int = 0

    def seen(self, key: str) -> bool:
        """Whether an uplink with this dedupe key was handled already."""
        return digest(key) in self._keys

    def remember(self, key: str) -> int:
        """Keep ``key``; the oldest of the 64 goes. Returns its digest (what the journal records)."""
        value = digest(key)
        self.remember_digest(value)
        return value

    def remember_digest(self, value: int) -> None:
        """Keep a key's digest (read back from the journal); one kept already changes nothing, so replaying
        a log over a snapshot that holds some of its changes (a fold cut short) is harmless."""
        if value in self._keys:
            return
        if len(self._keys) < KEEP_KEYS:
            self._keys.append(value)
        else:
            self._keys[self._next] = value
            self._next = (self._next + 1) % KEEP_KEYS

    @property
    def keys(self) -> list[int]:
        """The kept digests, oldest first."""
        return list(self._keys[self._next :]) + list(self._keys[: self._next])

    def copy(self) -> DeviceState:
        """An independent copy (the journal writes copies from another thread)."""
        keys = array("Q", self._keys)
        return DeviceState(self.f_cnt, self.occupied, self.since, self.battery_class, keys, self._next)

    def to_json(self) -> dict[str, Any]:
        return {"f_cnt": self.f_cnt, "keys": self.keys, "occupied": self.occupied, "since": self.since,
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
        for value in doc.get("keys", [])[-KEEP_KEYS:]:
            if isinstance(value, int) and 0 <= value < 2**64:
                state.remember_digest(value)
        return state
