"""Replacing a damaged buffer file: quarantine it, salvage it, restore, count exactly what was lost.

The outbox opens the fresh file itself; this module moves the damaged one aside, writes what
could be read back from it (agent/store/salvage.py), and the committed events the store still
holds in memory, into the fresh file, and counts the rest as ``dropped_corrupt`` per device with
their seq ranges, so the accounting identity still holds (docs/delivery.md, section 7).
"""

from __future__ import annotations

import logging
import sqlite3
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.store.accounting import Accounting, Before
from agent.store.evict import evict
from agent.store.records import COUNTERS, DROP_REASONS, Dropped, Stored, row_size
from agent.store.salvage import Salvaged, salvage, seq_ranges
from agent.store.schema import UPSERT_SEQS

# The outbox's own logger, whichever of its modules speaks: log lines keep their logger name.
log = logging.getLogger("agent.store.outbox")


@dataclass(slots=True)
class Restored:
    """What a replacement read back and settled: the salvage, the sequence epoch, the losses."""

    found: Salvaged
    epoch: str
    drops: list[Dropped] = field(default_factory=list)


class Repair:
    """Replaces the damaged buffer file at ``path`` for the outbox, whose accounting is ``acct``."""

    def __init__(self, path: Path, acct: Accounting) -> None:
        self.path = path
        self._acct = acct

    def quarantine(self, exc: sqlite3.DatabaseError) -> Path:
        """Move the damaged file (with any -wal/-shm) aside, say so, and return where it went."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        # Move -wal/-shm first: a stale WAL left beside a fresh file would be replayed into it.
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
        log.error(
            "buffer file %s is corrupt (%s); moved it (with any -wal/-shm) to %s and started"
            " a fresh buffer. The moved files are kept only for forensics and are safe to delete.",
            self.path,
            exc,
            target,
        )
        return target

    def restore(
        self,
        conn: sqlite3.Connection,
        target: Path,
        kept: list[Stored],
        before: Before | None,
        *,
        epoch: str,
        max_bytes: int,
    ) -> Restored:
        """Salvage ``target`` into the fresh file on ``conn``, with the ``kept`` events.

        ``before``: what the mirror said of the damaged file, when found while running (the
        counters and seqs it held at its last commit); None at start. ``epoch`` is the fresh
        file's. A failed write of the salvage is noted among its problems, not raised.
        """
        found = salvage(target)
        rows = {row[0]: row for row in found.rows}
        for r in kept:
            rows.setdefault(r.id, (r.id, r.priority, r.device, r.type, r.seq, r.topic, r.payload, r.created,
                                   zlib.crc32(r.payload)))  # fmt: skip
        restored = Restored(found, epoch)
        try:
            self._restore(conn, restored, list(rows.values()), before, max_bytes)
        except sqlite3.Error as exc2:
            found.problems.append(f"writing the salvage: {exc2}")
        return restored

    def report(self, restored: Restored, target: Path) -> None:
        """Log what was salvaged, once the mirror holds the fresh file's counters."""
        found = restored.found
        log.log(
            logging.WARNING if found.problems else logging.INFO,
            "salvaged %d events and %d device sequences from %s%s",
            self._acct.held(),
            len(found.seqs),
            target,
            f" (partial: {'; '.join(found.problems)})" if found.problems else "",
        )

    def _restore(
        self,
        conn: sqlite3.Connection,
        restored: Restored,
        rows: list[tuple[Any, ...]],
        before: Before | None,
        max_bytes: int,
    ) -> None:
        """Write the salvage into the fresh file in one transaction: rows, seqs, epoch, counters."""
        acct, found = self._acct, restored.found
        seqs = dict(found.seqs)
        for device, seq in (before.seqs if before else {}).items():
            seqs[device] = max(seq, seqs.get(device, seq))
        for row in rows:
            seqs[row[2]] = max(row[4], seqs.get(row[2], row[4]))
        # The numbering is known whole only from memory (found while running) or from an
        # intact sequences table; otherwise it goes on from what is known, in a new epoch.
        if before is not None and before.epoch:
            restored.epoch = before.epoch
        elif found.epoch and found.complete_sequences:
            restored.epoch = found.epoch
        else:
            log.warning(
                "buffer %s: sequence numbers could not all be read back; numbering goes on in new sequence epoch %s",
                self.path,
                restored.epoch,
            )
        sized = [(*row[:7], row_size(row[2], row[3], row[5], row[6]), row[7], row[8]) for row in rows]
        with acct.transaction(conn):
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (id, priority, device, type, seq, topic, payload,"
                " size, created, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                sized,
            )
            conn.executemany(UPSERT_SEQS.format("(?, ?)"), seqs.items())
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (restored.epoch,))
            # Ids are never given twice: one lost with the damaged file may still be in flight,
            # and its PUBACK must not delete the new event that would otherwise get its id.
            high_id = max(found.high_id, before.high_id if before is not None else 0, *(r[0] for r in rows))
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (high_id,))
            saved = len(sized)
            counts = before.counts if before is not None else found.counters
            if counts is None:
                # The old counters are unreadable: count from what survived; how many were lost
                # cannot be known (the log says so).
                acct.bump(conn, "accepted", saved)
                log.error(
                    "buffer %s: the damaged file's counters could not be read; an unknown number of events may be lost",
                    self.path,
                )
            else:
                self._count_lost(conn, restored, counts, rows, before)
            excess = sum(s[7] for s in sized) - max_bytes
            if excess > 0:
                acct.total = sum(s[7] for s in sized)
                evict(conn, acct, excess, "capacity")

    def _count_lost(
        self,
        conn: sqlite3.Connection,
        restored: Restored,
        counts: dict[str, int],
        rows: list[tuple[Any, ...]],
        before: Before | None,
    ) -> None:
        """Carry the damaged file's counters over, counting what was not salvaged as corrupt."""
        acct = self._acct
        counts = {name: int(counts.get(name, 0)) for name in COUNTERS}
        if before is not None:
            # Acknowledged while the damaged file hid them, and not salvaged: delivered.
            saved_ids = {row[0] for row in rows}
            counts["delivered"] += sum(1 for i in acct.unexplained if i not in saved_ids)
            acct.unexplained.clear()
        held = counts["accepted"] - counts["delivered"] - sum(counts[f"dropped_{r}"] for r in DROP_REASONS)
        lost = held - len(rows)
        if lost < 0:  # more came back than the counters knew of: accept them
            counts["accepted"] -= lost
            lost = 0
        counts["dropped_corrupt"] += lost
        for name, value in counts.items():
            acct.bump(conn, name, value)
        if lost:
            restored.drops = _lost_by_device(lost, before, rows)
            acct.corrupt_credit = (before.high_id + 1, lost) if before is not None else (0, 0)
            log.error(
                "buffer %s: %d events could not be salvaged and are lost (counted as dropped, reason corrupt): %s",
                self.path,
                lost,
                "; ".join(_describe(d) for d in restored.drops),
            )


def _lost_by_device(lost: int, before: Before | None, rows: list[tuple[Any, ...]]) -> list[Dropped]:
    """Who lost how many events, with the seq ranges, where the mirrors say (else one line)."""
    if before is None:
        return [Dropped("", "", 0, lost, "corrupt")]
    saved: dict[str, set[int]] = {}
    for row in rows:
        saved.setdefault(row[2], set()).add(row[4])
    drops = []
    for device, held in sorted(before.rows_by_device.items()):
        missing = held - len(saved.get(device, ()))
        if missing <= 0:
            continue
        # A device's buffered events are nearly always its last `held` seqs (delivery and
        # eviction both go oldest first): the ones not salvaged among them are the lost ones.
        last = before.seqs.get(device, 0)
        candidates = [s for s in range(max(1, last - held + 1), last + 1) if s not in saved.get(device, set())]
        drops.append(
            Dropped(device, "", 0, missing, "corrupt", seq_ranges(candidates[-missing:]) if candidates else "")
        )
    return drops or [Dropped("", "", 0, lost, "corrupt")]


def _describe(drop: Dropped) -> str:
    seqs = f" (seq {drop.seqs})" if drop.seqs else ""
    return f"{drop.device or 'devices unknown'}: {drop.count}{seqs}"
