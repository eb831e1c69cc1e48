"""The nonces of accepted documents, remembered until they expire, across restarts: a replay is refused.

The file (JSON, mode 0600, in a folder of mode 0700) is rewritten whole, through a temporary file,
fsync and rename, after every accepted document: a crash leaves the old list or the new one. A
list holds at most ``MAX_NONCES`` entries, a few MB; documents arrive rate-limited, so rewriting
it is cheap next to what an accepted document then does.

Forgetting a nonce before its document expires would let that document be replayed, so the store
fails closed where it has to forget:

- a file that cannot be read or parsed is logged and replaced, and its *floor* becomes the time of
  loading: every document issued before it is refused (as ``replayed``), since any of them may
  have been accepted already. The operator re-signs what still has to reach the gateway;
- beyond ``MAX_NONCES`` live entries, those expiring first are dropped and the floor moves just
  past the latest issue time among them, so none of them can come back.

If the file cannot be written (disk full, read-only), the store keeps working in memory and logs
an error: a restart before the next successful write forgets the nonces accepted in between.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import tempfile
import threading
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_NONCES = 100_000
_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    """Whole microseconds since the epoch: exact, so the floor compares without rounding."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class NonceStore:
    """Nonces of accepted documents until their expiry; ``path`` None keeps them in memory only (tests).

    ``limit``: how many live nonces are kept at most. ``now``: the time of loading (the floor a
    damaged file sets); the current time if not given. Safe to share between threads.
    """

    def __init__(self, path: Path | None, *, limit: int = MAX_NONCES, now: datetime | None = None) -> None:
        self._path = path
        self._limit = limit
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, int]] = {}  # nonce -> (expires, issued), microseconds
        self._floor: int | None = None
        if path is not None:
            self._load(path, _micros(now or datetime.now(UTC)))

    @property
    def floor(self) -> datetime | None:
        """Documents issued before this time are refused as replays (None: no such time)."""
        return None if self._floor is None else _moment(self._floor)

    def below_floor(self, issued_at: datetime) -> bool:
        """Was the document issued before the floor (so it may have been accepted and forgotten)?"""
        return self._floor is not None and _micros(issued_at) < self._floor

    def __len__(self) -> int:
        return len(self._entries)

    def seen_or_remember(
        self, nonce: str, expires_at: datetime, now: datetime, *, issued_at: datetime | None = None
    ) -> bool:
        """True if ``nonce`` was seen and has not expired (a replay); else remember it and return False.

        ``issued_at``: the document's issue time, which the floor moves past should the nonce have
        to be dropped early (without it, its expiry: more conservative, refusing more).
        """
        expires = _micros(expires_at)
        issued = _micros(issued_at) if issued_at is not None else expires
        with self._lock:
            current = _micros(now)
            self._prune(current)
            if nonce in self._entries:
                return True
            if expires <= current:
                return False  # already expired: no copy of it can be accepted again
            self._entries[nonce] = (expires, issued)
            self._evict()
            self._save()
            return False

    def _prune(self, current: int) -> None:
        expired = [nonce for nonce, (expires, _) in self._entries.items() if expires <= current]
        for nonce in expired:
            del self._entries[nonce]

    def _evict(self) -> None:
        excess = len(self._entries) - self._limit
        if excess <= 0:
            return
        dropped = heapq.nsmallest(excess, self._entries.items(), key=lambda item: item[1][0])
        latest = max(issued for _, (_, issued) in dropped)
        for nonce, _ in dropped:
            del self._entries[nonce]
        self._raise_floor(latest + 1)
        log.warning(
            "fleet nonce store over %d entries: dropped the %d expiring first; documents issued before %s"
            " are now refused as replayed",
            self._limit, excess, _moment(latest + 1).isoformat(),
        )  # fmt: skip

    def _raise_floor(self, floor: int) -> None:
        self._floor = floor if self._floor is None else max(self._floor, floor)

    def _load(self, path: Path, current: int) -> None:
        try:
            entries, floor = _parse(path.read_bytes())
        except FileNotFoundError:
            self._save()  # creates the folder and the file now, so a permission problem shows at start
            return
        except (OSError, ValueError, RecursionError) as exc:
            self._raise_floor(current)
            log.error(
                "fleet nonce file %s is damaged (%s): replaced; documents issued before %s are refused as replayed"
                " (re-sign any that must still be applied)",
                path, exc, _moment(current).isoformat(),
            )  # fmt: skip
            self._save()
            return
        self._entries = {nonce: entry for nonce, entry in entries.items() if entry[0] > current}
        if floor is not None:
            self._raise_floor(floor)

    def _save(self) -> None:
        if self._path is None:
            return
        doc = {"version": _VERSION, "floor": self._floor, "nonces": {n: list(e) for n, e in self._entries.items()}}
        try:
            _write_atomically(self._path, json.dumps(doc, separators=(",", ":")).encode())
        except OSError as exc:
            log.error(
                "cannot write the fleet nonce file %s (%s): nonces accepted from now on are lost on restart",
                self._path, exc.strerror or exc,
            )  # fmt: skip


def _parse(data: bytes) -> tuple[dict[str, tuple[int, int]], int | None]:
    """The entries and floor of a nonce file; ValueError naming what is wrong."""
    doc: Any = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} nonce file")
    floor, nonces = doc.get("floor"), doc.get("nonces")
    if floor is not None and not _is_int(floor):
        raise ValueError("floor is not an integer")
    if not isinstance(nonces, dict):
        raise ValueError("nonces is not an object")
    entries: dict[str, tuple[int, int]] = {}
    for nonce, entry in nonces.items():
        if not (isinstance(entry, list) and len(entry) == 2 and all(_is_int(v) for v in entry)):
            raise ValueError(f"the entry of nonce {nonce[:40]!r} is not [expires, issued]")
        entries[nonce] = (entry[0], entry[1])
    return entries, floor


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` (mode 0600, its folder made 0700 if missing): old or new after a crash."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
