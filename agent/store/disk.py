"""Room on the buffer's volume: a reserve kept free, eviction for disk, a disk filled by others.

The buffer makes room before the disk is full (in WAL mode even a DELETE needs free space),
holds a reserve file it gives back when another program fills the disk to the last byte, and
then takes a batch class by class, highest first, so an alarm is never refused while lower
classes could be evicted (docs/delivery.md, section 5).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.store.evict import evict
from agent.store.records import AppendResult, BufferFullError, Dropped, Record, is_disk_full, row_size

if TYPE_CHECKING:
    from agent.store.accounting import Accounting

# The outbox's own logger, whichever of its modules speaks: log lines keep their logger name.
log = logging.getLogger("agent.store.outbox")

DISK_FULL_MIN_EVICT: Final = 1024 * 1024
"""Least logical bytes evicted when the disk is full, so we do not hit it again at once."""
DISK_RESERVE: Final = 8 * 1024 * 1024  # free space the buffer leaves on its volume (for WAL, sqlite temp)
WAL_LIMIT: Final = 2 * 1024 * 1024  # most WAL bytes between checkpoints (less on small volumes)
BALLAST_EXTRA: Final = 256 * 1024  # reserve file size beyond the WAL's (see DiskRoom.make_ballast)
EVICT_STEP_MIN: Final = 64 * 1024
"""Least logical bytes one eviction transaction deletes on a nearly full disk (see DiskRoom._evict_for_disk)."""

Insert = Callable[[Sequence[Record]], AppendResult]
"""Commits records in one transaction, evicting to stay within the buffer's bounds."""


def reserve(volume: int) -> int:
    """Free bytes the buffer leaves on a volume of ``volume`` bytes (less on tiny volumes)."""
    return min(DISK_RESERVE, volume // 8)


def disk_space(directory: Path) -> tuple[int, int]:
    """Free bytes and size of the volume holding ``directory``."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return 1 << 62, 1 << 62  # unknown: rely on the SQLITE_FULL handling
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def wal_limit(page_size: int, directory: Path) -> int:
    """Most WAL bytes between checkpoints for a buffer in ``directory``.

    A checkpoint may grow the file by the WAL's whole content at once, so the WAL must
    stay well inside the reserve the buffer keeps free: a quarter of it. Otherwise one
    checkpoint eats the reserve, and on a full disk neither a checkpoint (the file must
    grow) nor a DELETE (its WAL frames need room) can run again.
    """
    return max(64 * page_size, min(WAL_LIMIT, reserve(disk_space(directory)[1]) // 4))


def checkpoint(conn: sqlite3.Connection) -> None:
    """Move the WAL's pages into the file, keeping the WAL file's blocks."""
    # RESTART, not TRUNCATE: the WAL file keeps its blocks (up to journal_size_limit), so on
    # a disk another program filled, the next DELETE has room for its frames.
    with suppress(sqlite3.OperationalError):  # may itself lack room; eviction still tries
        conn.execute("PRAGMA wal_checkpoint(RESTART)")


class DiskRoom:
    """Keeps room on the volume of the buffer at ``path`` for the outbox, which owns it.

    ``acct`` is the outbox's accounting: evictions here count as ``disk_full`` drops in it.
    """

    def __init__(self, path: Path, acct: Accounting) -> None:
        self.path = path
        self._acct = acct
        self._page_size = 4096
        self._ballast_path = Path(f"{path}.reserve")
        self._ballast_size = BALLAST_EXTRA
        self._ballast = False

    def sized(self, page_size: int, wal: int) -> None:
        """Take the page size and WAL limit of a freshly opened file."""
        self._page_size = page_size
        self._ballast_size = wal + BALLAST_EXTRA

    def append(self, conn: sqlite3.Connection, records: Sequence[Record], insert: Insert) -> AppendResult:
        """``insert(records)`` after making room on the disk; class by class if the disk is full."""
        batch_bytes = sum(row_size(r.device, r.type, r.topic, r.payload) for r in records)
        # Make room before the disk is full: in WAL mode even a DELETE needs free space (for
        # its WAL frames), so waiting for SQLITE_FULL can leave nothing able to free room.
        early: list[Dropped] = []
        free, volume = disk_space(self.path.parent)
        if not self._ballast and free > 4 * self._ballast_size:
            self.make_ballast()  # the disk has room again: take the reserve back
        # Pages freed by deletes stay in the file for reuse: they are room too.
        free += conn.execute("PRAGMA freelist_count").fetchone()[0] * self._page_size
        short = reserve(volume) + 2 * batch_bytes - free
        if short > 0 and self._acct.total > 0:
            try:
                # At most about the batch's own size again: enough that the file stops growing
                # into the reserve, never a purge. When another program took the reserve,
                # evicting cannot win its room back, and must not empty the buffer trying.
                early = self._evict_for_disk(conn, min(short, batch_bytes) + batch_bytes)
            except sqlite3.OperationalError as exc:
                if not is_disk_full(exc):
                    raise
                # Not even a small step fits: the append below meets the full disk and says so.
        try:
            result = insert(records)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            result = self._append_on_full_disk(conn, records, insert, exc)
        return AppendResult(result.accepted, early + result.dropped, result.first_id, result.refused)

    def _append_on_full_disk(
        self, conn: sqlite3.Connection, records: Sequence[Record], insert: Insert, exc: sqlite3.OperationalError
    ) -> AppendResult:
        """Something else filled the disk: take the batch class by class, highest first.

        Each class makes its own room by evicting the oldest lowest-class rows (counted as
        ``disk_full``), so an alarm is never refused while telemetry rows could be evicted;
        a class that finds nothing left to evict is refused, and so are the classes below it.
        Pieces are halved until their WAL frames fit in the room eviction made.
        """
        dropped: list[Dropped] = []
        accepted = refused = first_id = 0
        for priority in sorted({r.priority for r in records}, reverse=True):
            group = [r for r in records if r.priority == priority]
            if refused:
                refused += len(group)
                continue
            try:
                piece = self._append_piecewise(conn, group, insert)
            except BufferFullError:
                refused += len(group)
                continue
            first_id = first_id or piece.first_id
            accepted += piece.accepted
            dropped += piece.dropped
        if not accepted:
            raise self._full_error() from exc
        return AppendResult(accepted, dropped, first_id, refused)

    def _append_piecewise(self, conn: sqlite3.Connection, group: Sequence[Record], insert: Insert) -> AppendResult:
        need = sum(row_size(r.device, r.type, r.topic, r.payload) for r in group)
        with self._disk_full_is_fatal():
            dropped = self._evict_for_disk(conn, max(2 * need, DISK_FULL_MIN_EVICT))
        try:
            result = insert(group)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            if len(group) == 1 or not dropped:
                raise self._full_error() from exc
            half = len(group) // 2
            first = self._append_piecewise(conn, group[:half], insert)
            second = self._append_piecewise(conn, group[half:], insert)
            return AppendResult(
                first.accepted + second.accepted, dropped + first.dropped + second.dropped, first.first_id
            )
        return AppendResult(result.accepted, dropped + result.dropped, result.first_id)

    def _evict_for_disk(self, conn: sqlite3.Connection, need: int) -> list[Dropped]:
        """Evict ``need`` bytes of the oldest lowest-class rows as ``disk_full`` drops.

        A DELETE writes every page it touches to the WAL first, about as many bytes as it
        removes, so on a nearly full disk one big DELETE fails for want of the very room it
        would free. Eviction goes in steps of a quarter of the free space, each checkpointed
        (WAL emptied, freed pages back in the file's free list) before the next; a step that
        still finds the disk full is retried smaller.

        Raises:
            sqlite3.OperationalError: the disk is full even for the smallest step.
        """
        dropped: list[Dropped] = []
        freed_in_all = 0
        checkpoint(conn)
        while freed_in_all < need and self._acct.total > 0:
            step = min(need - freed_in_all, max(EVICT_STEP_MIN, disk_space(self.path.parent)[0] // 4))
            freed, more = self._evict_step(conn, step)
            if not freed:
                break
            freed_in_all += freed
            dropped += more
        return dropped

    def _evict_step(self, conn: sqlite3.Connection, step: int) -> tuple[int, list[Dropped]]:
        """One eviction transaction of ``step`` bytes, then a checkpoint; smaller while the disk is full."""
        acct = self._acct
        while True:
            try:
                with acct.transaction(conn):
                    freed, dropped = evict(conn, acct, step, "disk_full")
            except sqlite3.OperationalError as exc:
                if not is_disk_full(exc):
                    raise
                if self.release_ballast():
                    checkpoint(conn)
                    continue
                if step <= EVICT_STEP_MIN:
                    raise
                step = max(EVICT_STEP_MIN, step // 4)
                continue
            acct.total -= freed
            checkpoint(conn)  # freed pages go back to the file's free list for the next inserts
            return freed, dropped

    def make_ballast(self) -> None:
        """Hold ``_ballast_size`` bytes of the volume in a file of our own (``<buffer>.reserve``).

        Another program can fill the disk to the last byte; then even a DELETE cannot run (its
        WAL frames need room) nor a checkpoint (it writes pages back). Giving the reserve file
        back is what lets the buffer evict and go on (see :meth:`release_ballast`).
        """
        try:
            fd = os.open(self._ballast_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._ballast_size)
            finally:
                os.close(fd)
        except OSError as exc:
            with suppress(OSError):
                self._ballast_path.unlink()
            log.debug("buffer reserve file %s not made: %s", self._ballast_path, exc)
            return
        self._ballast = True

    def release_ballast(self) -> bool:
        """Delete the reserve file to make room on a full disk; False if there was none."""
        if not self._ballast:
            return False
        self._ballast = False
        try:
            self._ballast_path.unlink()
        except OSError:
            return False
        log.warning(
            "the disk holding %s is full: released the buffer's %d-byte reserve to evict old events;"
            " it is taken back once the disk has room again",
            self.path,
            self._ballast_size,
        )
        return True

    @contextmanager
    def _disk_full_is_fatal(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                raise self._full_error() from exc
            raise

    def _full_error(self) -> BufferFullError:
        return BufferFullError(
            f"buffer {self.path} is full: the disk has no room even after evicting old events;"
            " free disk space or lower the buffer's max_bytes"
        )
