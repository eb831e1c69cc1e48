"""Every LoRaWAN device's state under one ``state_dir``: a snapshot, and the changes since appended to a log.

One rename per uplink (a file per device) cost a millisecond each on the event loop and wears an
SD card; an appended line costs microseconds. The log is flushed within a second of a change and
when the devices stop; it is folded into the snapshot at start, at stop and whenever it has grown
past ``COMPACT_BYTES``. A torn last line (the agent killed mid-write) is skipped. Both files are
0600 in a 0700 folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import IO

from drivers.lorawan.state import DeviceState

log = logging.getLogger(__name__)

SNAPSHOT, LOG = "lorawan-state.json", "lorawan-state.log"
COMPACT_BYTES = 8 * 1024 * 1024
FLUSH_AFTER = 1.0  # seconds


class Journal:
    """The states of the devices using one folder, kept in memory and on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.states: dict[str, DeviceState] = {}
        self.users = 0
        self._log: IO[str] | None = None
        self._written = 0
        self._flush: asyncio.TimerHandle | None = None

    # ---- reading ------------------------------------------------------------------------
    def load(self) -> None:
        """The snapshot, then the log's changes in order; then both folded into a fresh snapshot."""
        snapshot = self.folder / SNAPSHOT
        try:
            doc = json.loads(snapshot.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a mapping of DevEUI to state")
            for dev_eui, state in doc.items():
                self.states[dev_eui] = DeviceState.from_json(state)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("lorawan state %s cannot be read (%s); starting afresh: a redelivered uplink may be "
                        "published again, with the same event id", snapshot, exc)  # fmt: skip
        skipped = 0
        try:
            with (self.folder / LOG).open() as changes:
                for line in changes:
                    skipped += not self._apply(line)
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("lorawan state log %s cannot be read: %s", self.folder / LOG, exc)
        if skipped:
            log.info("lorawan state log %s: %d damaged line(s) skipped (a stop mid-write)", self.folder / LOG, skipped)
        self.compact()

    def _apply(self, line: str) -> bool:
        try:
            dev_eui, key, f_cnt, occupied, since, battery = json.loads(line)
        except (ValueError, TypeError):
            return False
        if not isinstance(dev_eui, str):
            return False
        state = self.state(dev_eui)
        if isinstance(key, int) and 0 <= key < 2**64:
            state.remember_digest(key)
        state.f_cnt = f_cnt if isinstance(f_cnt, int) else None
        state.occupied = occupied if isinstance(occupied, bool) else None
        state.since = since if isinstance(since, str) else None
        state.battery_class = battery if isinstance(battery, str) else None
        return True

    def state(self, dev_eui: str) -> DeviceState:
        """The device's state (a fresh one if it has none yet); the journal keeps it."""
        state = self.states.get(dev_eui)
        if state is None:
            state = self.states[dev_eui] = DeviceState()
        return state

    # ---- writing ------------------------------------------------------------------------
    def record(self, dev_eui: str, state: DeviceState, key: int | None) -> None:
        """Append the device's state after a change (``key``: the dedupe key digest it just kept)."""
        line = json.dumps([dev_eui, key, state.f_cnt, state.occupied, state.since, state.battery_class],
                          separators=(",", ":")) + "\n"  # fmt: skip
        try:
            if self._log is None:
                self._log = self._open(self.folder / LOG, "a")
            self._log.write(line)
        except OSError as exc:
            log.warning("lorawan state log %s cannot be written: %s", self.folder / LOG, exc)
            return
        self._written += len(line)
        if self._written >= COMPACT_BYTES:
            self.compact()
        elif self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # outside an event loop (a tool, a test): the next flush or close writes it
            self._flush = loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Hand what was appended to the OS (it survives the process, if not the power)."""
        self._flush = None
        if self._log is not None:
            try:
                self._log.flush()
            except OSError as exc:
                log.warning("lorawan state log %s cannot be written: %s", self.folder / LOG, exc)

    def compact(self) -> None:
        """Write every state as the snapshot (atomically) and start the log afresh."""
        doc = {dev_eui: state.to_json() for dev_eui, state in self.states.items()}
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            temp = self.folder / (SNAPSHOT + ".tmp")
            with self._open(temp, "w") as out:
                out.write(json.dumps(doc, separators=(",", ":")))  # one write: dump() writes each piece
            os.replace(temp, self.folder / SNAPSHOT)
            if self._log is not None:
                self._log.close()
            self._log = self._open(self.folder / LOG, "w")
            self._written = 0
        except OSError as exc:
            log.warning("lorawan state %s cannot be written: %s", self.folder, exc)

    def close(self) -> None:
        """Fold the log into the snapshot and close it."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.compact()
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _open(path: Path, mode: str) -> IO[str]:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
        return os.fdopen(os.open(path, flags, 0o600), mode)


class Journals:
    """One journal per folder, shared by the devices using it: the first loads it, the last closes it."""

    def __init__(self) -> None:
        self.open: dict[Path, Journal] = {}

    def acquire(self, folder: Path) -> Journal:
        journal = self.open.get(folder)
        if journal is None:
            journal = self.open[folder] = Journal(folder)
            journal.load()
        journal.users += 1
        return journal

    def release(self, journal: Journal) -> None:
        journal.users -= 1
        if journal.users <= 0 and self.open.get(journal.folder) is journal:
            del self.open[journal.folder]
            journal.close()


JOURNALS = Journals()
