"""The outbox's two hot-path transactions: commit a batch, delete what the broker acknowledged.

Both run at the agent's full event rate (10-25k events/s): each takes a batch in a few multi-row
statements, never one per row (see the note above schema.INSERT_ROWS), and the per-row Python
work is only what builds them.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence

from agent.contract.events import Priority
from agent.store.accounting import Accounting
from agent.store.evict import evict, evict_media
from agent.store.records import AppendResult, Dropped, Record, row_size
from agent.store.schema import (
    CHUNK,
    INSERT_ROWS,
    ROW_MARKS,
    ROW_VALUES,
    UPSERT_SEQS,
    chunk_sizes,
    placeholders,
    unsynced,
)


def insert_batch(
    conn: sqlite3.Connection,
    acct: Accounting,
    records: Sequence[Record],
    *,
    rows_per_insert: int,
    max_bytes: int,
    media_max_bytes: int | None,
) -> AppendResult:
    """Commit ``records`` in one transaction, evicting to stay within the byte bounds."""
    values: list[object] = []
    last: dict[str, int] = {}
    per_device: dict[str, int] = {}
    added = 0
    media = False
    for r in records:
        size = row_size(r.device, r.type, r.topic, r.payload)
        values += (r.priority, r.device, r.type, r.seq, r.topic, r.payload, size, r.created, zlib.crc32(r.payload))
        added += size
        last[r.device] = max(r.seq, last.get(r.device, r.seq))
        per_device[r.device] = per_device.get(r.device, 0) + 1
        media = media or r.priority == Priority.MEDIA
    total = acct.total + added
    freed = 0
    dropped: list[Dropped] = []
    first_id = 0
    with acct.transaction(conn):
        # Multi-row statements, not executemany: see the note above schema.INSERT_ROWS.
        start = 0
        for rows in chunk_sizes(len(records), rows_per_insert):
            chunk = values[start * ROW_VALUES : (start + rows) * ROW_VALUES]
            conn.execute(INSERT_ROWS + ",".join([ROW_MARKS] * rows), chunk)
            if start == 0:
                first_id = conn.execute("SELECT last_insert_rowid()").fetchone()[0] - rows + 1
            start += rows
        if last:
            marks = ",".join(["(?, ?)"] * len(last))
            conn.execute(UPSERT_SEQS.format(marks), [v for item in last.items() for v in item])
        acct.bump(conn, "accepted", len(records))
        acct.pending_rows.update(per_device)
        if media and media_max_bytes is not None:
            freed, dropped = evict_media(conn, acct, media_max_bytes)
        if total - freed > max_bytes:
            more, more_dropped = evict(conn, acct, total - freed - max_bytes, "capacity")
            freed += more
            dropped += more_dropped
    # Only after COMMIT: a rolled-back append must not move the in-memory total.
    acct.total = total - freed
    acct.high_id = first_id + len(records) - 1
    seqs = acct.committed_seqs
    for device, seq in last.items():
        if seq > seqs.get(device, 0):
            seqs[device] = seq
    return AppendResult(len(records), dropped, first_id)


def delete_acked(
    conn: sqlite3.Connection, acct: Accounting, ids: Sequence[int], synchronous: str, *, replay: bool = False
) -> int:
    """Delete delivered rows without an fsync; return how many were counted as delivered.

    An id no longer buffered is credited through :meth:`Accounting.credit_absent`, unless
    ``replay``: the ack log of a previous run names ids its deletes may have removed already.
    """
    unique = list(dict.fromkeys(ids))
    deleted = freed = 0
    pending = acct.pending_rows
    with unsynced(conn, synchronous), acct.transaction(conn):
        start = 0
        for size in chunk_sizes(len(unique), CHUNK):
            chunk = unique[start : start + size]
            start += size
            marks = placeholders(size)
            found = 0
            # Only "?" placeholders are interpolated, never values.
            for device, n, nbytes in conn.execute(
                f"SELECT device, count(*), sum(size) FROM outbox WHERE id IN ({marks}) GROUP BY device",  # noqa: S608
                chunk,
            ):
                pending[device] -= n
                found += n
                freed += nbytes
            if found < len(chunk) and not replay:
                # Rare (evicted or already deleted while in flight): which ids, before they go.
                present = {i for (i,) in conn.execute(f"SELECT id FROM outbox WHERE id IN ({marks})", chunk)}  # noqa: S608
                found += acct.credit_absent(conn, set(chunk) - present)
            if found:
                conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608
            deleted += found
        acct.bump(conn, "delivered", deleted)
    acct.total -= freed
    return deleted
