"""Every LoRaWAN device's state under one ``state_dir``: a snapshot, and the changes since appended to a log.

One rename per uplink (a file per device) cost a millisecond each on the event loop and wears an
SD card; an appended line costs microseconds. The log is flushed within a second of a change and
when the devices stop; it is folded into the snapshot at start, at stop and whenever it has grown
past ``COMPACT_BYTES``. A torn last line (the agent killed mid-write) is skipped. The files are
0600 in a 0700 folder.

A fold while the devices run must not stall the event loop (with 10,000 devices, turning the
states into the snapshot's JSON and writing it took ~0.15 s): the loop only renames the log to
``OLD_LOG``, starts a fresh one and copies the states (~20 ms); a thread writes the snapshot, puts
it in place and only then removes ``OLD_LOG``. Killed at any point, the agent reads the snapshot,
then ``OLD_LOG`` (if still there), then the log: nothing recorded is lost. Each log starts with a
header naming its generation and the snapshot names the last generation it holds, so a log already
in the snapshot is not applied twice (twice would reorder a device's ring of 64 dedupe keys).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

from drivers.lorawan.state import DeviceState

log = logging.getLogger(__name__)

SNAPSHOT, LOG = "lorawan-state.json", "lorawan-state.log"
OLD_LOG = LOG + ".old"  # the log being folded into the snapshot
HEADER, FOLDED = "#log", "#folded"  # a log's first line: [HEADER, generation]; the snapshot's {FOLDED: generation}
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
        self._folding: threading.Thread | None = None
        self._generation = 0  # of the log being written; the snapshot holds every earlier one

    # ---- reading ------------------------------------------------------------------------
    def load(self) -> None:
        """The snapshot, then the log's changes in order; then both folded into a fresh snapshot."""
        snapshot = self.folder / SNAPSHOT
        folded = -1
        try:
            doc = json.loads(snapshot.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a mapping of DevEUI to state")
            folded = doc.pop(FOLDED, -1)
            if not isinstance(folded, int):
                raise ValueError(f"{FOLDED} is not a number")
            for dev_eui, state in doc.items():
                self.states[dev_eui] = DeviceState.from_json(state)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("lorawan state %s cannot be read (%s); starting afresh: a redelivered uplink may be "
                        "published again, with the same event id", snapshot, exc)  # fmt: skip
        self._generation = folded + 1
        for name in (OLD_LOG, LOG):  # in the order they were written
            self._replay(self.folder / name, folded)
        self.compact()

    def _replay(self, path: Path, folded: int) -> None:
        """Apply the lines of the log's generations the snapshot does not hold."""
        skipped = 0
        generation: int | None = None  # lines before any header: apply
        try:
            with path.open() as changes:
                for line in changes:
                    header = _header(line)
                    if header is not None:
                        generation = header
                        self._generation = max(self._generation, header + 1)
                    elif generation is None or generation > folded:
                        skipped += not self._apply(line)
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("lorawan state log %s cannot be read: %s", path, exc)
        if skipped:
            log.info("lorawan state log %s: %d damaged line(s) skipped (a stop mid-write)", path, skipped)

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
            self.fold()
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

    def fold(self) -> None:
        """Fold the log into the snapshot in a thread (inline outside an event loop: a tool, a test)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.compact()
            return
        if self._folding is not None and self._folding.is_alive():
            return  # the last fold is still writing: the log grows a little longer meanwhile
        rotated = self._rotate()
        if rotated is not None:
            self._folding = threading.Thread(target=self._write, args=rotated, name="lorawan-fold", daemon=True)
            self._folding.start()

    def compact(self) -> None:
        """Fold the log into the snapshot now (at start and stop)."""
        if self._folding is not None:
            self._folding.join()
            self._folding = None
        rotated = self._rotate()
        if rotated is not None:
            self._write(*rotated)

    def _rotate(self) -> tuple[dict[str, DeviceState], int] | None:
        """Start a fresh log, the current one becoming OLD_LOG; a copy of every state (what OLD_LOG leads to)
        and the generation it ends."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._log is not None:
                self._log.close()
                self._log = None
            current, old = self.folder / LOG, self.folder / OLD_LOG
            if old.exists() and current.exists():  # an earlier fold failed to write: OLD_LOG must keep its lines
                with self._open(old, "a") as out:
                    out.write(current.read_text())
                current.unlink()
            elif current.exists():
                os.replace(current, old)
            self._log = self._open(current, "w")
            self._log.write(json.dumps([HEADER, self._generation + 1]) + "\n")
            self._written = 0
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("lorawan state %s cannot be written: %s", self.folder, exc)
            return None
        self._generation += 1
        return {dev_eui: state.copy() for dev_eui, state in self.states.items()}, self._generation - 1

    def _write(self, states: dict[str, DeviceState], folded: int) -> None:
        """The snapshot of ``states`` (every log up to generation ``folded``), put in place atomically;
        then OLD_LOG, now in it, goes (any thread)."""
        try:
            doc: dict[str, Any] = {FOLDED: folded}
            doc.update((dev_eui, state.to_json()) for dev_eui, state in states.items())
            temp = self.folder / (SNAPSHOT + ".tmp")
            with self._open(temp, "w") as out:
                out.write(json.dumps(doc, separators=(",", ":")))  # one write: dump() writes each piece
                out.flush()
                os.fsync(out.fileno())
            self._install(temp)
            self._drop_old_log()
        except OSError as exc:
            log.warning("lorawan state %s cannot be written: %s", self.folder, exc)

    def _install(self, temp: Path) -> None:
        os.replace(temp, self.folder / SNAPSHOT)

    def _drop_old_log(self) -> None:
        (self.folder / OLD_LOG).unlink(missing_ok=True)

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


def _header(line: str) -> int | None:
    """The generation of a log's header line; None for any other line."""
    if not line.startswith(f'["{HEADER}"'):
        return None
    try:
        _, generation = json.loads(line)
    except (ValueError, TypeError):
        return None
    return generation if isinstance(generation, int) else None


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
