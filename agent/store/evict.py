"""Eviction: deleting the oldest rows of the lowest class, inside the caller's transaction.

For ``max_bytes`` ("capacity"), for room on the disk ("disk_full", see agent/store/disk.py) and
for the media quota ("media_quota"); the victims are counted as drops and, when a consumer may
hold them in flight, remembered so that a late PUBACK still counts as delivered.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Final

from agent.contract.events import Priority
from agent.store.records import ROW_OVERHEAD, Dropped

if TYPE_CHECKING:
    from agent.store.accounting import Accounting

# Ids, priorities and sizes of the oldest-lowest-class prefix of a given length.
_EVICT_PREFIX: Final = (
    "SELECT group_concat(id, ','), group_concat(priority, ','), group_concat(size, ',')"
    " FROM (SELECT id, priority, size FROM outbox ORDER BY priority, id LIMIT ?)"
)
_EVICT_ROUND: Final = 100_000  # rows sized per eviction round, bounding its memory


def evict(conn: sqlite3.Connection, acct: Accounting, need: int, reason: str) -> tuple[int, list[Dropped]]:
    """Delete the oldest lowest-priority rows worth at least ``need`` bytes, inside a transaction.

    The victims are the shortest prefix of (priority, id) order whose sizes add up to
    ``need``. Each round reads a prefix's ids and sizes packed into one result row, finds
    the exact cut, counts the victims per device and type with one aggregate query, and
    removes them with one range DELETE (see the note above schema.INSERT_ROWS).
    Returns the bytes freed and the drops; ``acct.total`` is the caller's to lower.
    """
    freed = 0
    groups: dict[tuple[str, str, int], int] = {}
    while freed < need:
        average = max(ROW_OVERHEAD, acct.total // _rows_estimate(conn))
        limit = min(_EVICT_ROUND, (need - freed) // average + 64)
        packed = conn.execute(_EVICT_PREFIX, (limit,)).fetchone()
        if packed is None or packed[0] is None:
            break
        prefix = sorted(
            zip(
                map(int, packed[1].split(",")),
                map(int, packed[0].split(",")),
                map(int, packed[2].split(",")),
                strict=True,
            )
        )
        cut = prefix[-1]
        running = freed
        for priority, row_id, size in prefix:
            running += size
            if running >= need:
                cut = (priority, row_id, size)
                break
        for priority, upto in list(acct.taken.items()):
            if priority <= cut[0]:
                acct.remember_inflight(conn, priority, upto if priority < cut[0] else min(upto, cut[1]), reason)
        # Two ranges SQLite can walk on the (priority, id) index: every row of the lower
        # classes, and the cut class up to the cut.
        for where, bounds in (("priority < ?", (cut[0],)), ("priority = ? AND id <= ?", (cut[0], cut[1]))):
            for device, type_, prio, count, size in conn.execute(
                f"SELECT device, type, priority, count(*), sum(size) FROM outbox WHERE {where}"  # noqa: S608
                " GROUP BY device, type, priority",
                bounds,
            ):
                groups[device, type_, prio] = groups.get((device, type_, prio), 0) + count
                freed += size
            conn.execute(f"DELETE FROM outbox WHERE {where}", bounds)  # noqa: S608
    return freed, acct.count_dropped(conn, groups, reason)


def evict_media(conn: sqlite3.Connection, acct: Accounting, quota: int) -> tuple[int, list[Dropped]]:
    """Delete the oldest media rows past ``quota`` bytes, inside a transaction."""
    # Media rows are few (a quota's worth of pictures), so listing them all is cheap.
    rows = conn.execute("SELECT id, size FROM outbox WHERE priority = ? ORDER BY id", (int(Priority.MEDIA),)).fetchall()
    need = sum(size for _, size in rows) - quota
    if need <= 0:
        return 0, []
    running, cut = 0, rows[-1][0]
    for row_id, size in rows:
        running += size
        if running >= need:
            cut = row_id
            break
    where = "priority = ? AND id <= ?"
    bounds = (int(Priority.MEDIA), cut)
    taken = acct.taken.get(int(Priority.MEDIA))
    if taken is not None:
        acct.remember_inflight(conn, int(Priority.MEDIA), min(taken, cut), "media_quota")
    groups = conn.execute(
        f"SELECT device, type, count(*), sum(size) FROM outbox WHERE {where} GROUP BY device, type",  # noqa: S608
        bounds,
    ).fetchall()
    conn.execute(f"DELETE FROM outbox WHERE {where}", bounds)  # noqa: S608
    freed = sum(size for _, _, _, size in groups)
    return freed, acct.count_dropped(conn, {(d, t, int(Priority.MEDIA)): n for d, t, n, _ in groups}, "media_quota")


def _rows_estimate(conn: sqlite3.Connection) -> int:
    # An upper bound (ids may have holes): it only sizes a round, never the cut itself.
    row = conn.execute("SELECT max(id) - min(id) + 1 FROM outbox").fetchone()
    return max(1, int(row[0] or 1))
