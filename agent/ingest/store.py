"""Write a batch of decoded messages in one transaction: an idempotent upsert keyed by the event identity.

``INSERT ... ON CONFLICT DO NOTHING`` on (gateway, device, seqepoch, seq) makes a re-delivered
event a no-op, whichever worker gets it and however often: exactly one row per event. A second
event with the same identity but another ``id`` or content is a *conflict*: the first one stays,
the other is counted, logged and kept in ``conflicts`` for a person to judge. Rows are inserted
in key order so two workers writing overlapping batches wait for each other instead of
deadlocking.

If the database refuses a batch for its content (not the connection), the messages are written
one by one, each in its own transaction, and the one it refuses is stored in ``rejected`` with
the database's reason: one bad message never blocks the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from agent.ingest.decode import DEVICE_STATUS, PAYLOAD_PREFIX, READING, Decoded, Event, Key, Rejection

log = logging.getLogger("agent.ingest")

_INSERT_EVENTS = """
INSERT INTO events (gateway, device, seqepoch, seq, id, type, time, worker, data)
SELECT g, d, e, s, i, t, tm, %(worker)s, dj::jsonb
FROM unnest(%(g)s::text[], %(d)s::text[], %(e)s::text[], %(s)s::bigint[], %(i)s::text[], %(t)s::text[],
            %(tm)s::timestamptz[], %(dj)s::text[]) AS u(g, d, e, s, i, t, tm, dj)
ON CONFLICT DO NOTHING
RETURNING gateway, device, seqepoch, seq
"""
# Of the events that were there already: those whose id or content differ from the new one's.
_DIFFERING = """
SELECT e.gateway, e.device, e.seqepoch, e.seq, e.id
FROM events e
JOIN unnest(%(g)s::text[], %(d)s::text[], %(e)s::text[], %(s)s::bigint[], %(i)s::text[], %(t)s::text[],
            %(tm)s::timestamptz[], %(dj)s::text[]) AS u(g, d, e, s, i, t, tm, dj)
  ON (e.gateway, e.device, e.seqepoch, e.seq) = (u.g, u.d, u.e, u.s)
WHERE e.id <> u.i OR e.type <> u.t OR e.time <> u.tm OR e.data <> u.dj::jsonb
"""
_INSERT_READINGS = """
INSERT INTO readings (gateway, device, seqepoch, seq, n, time, quantity, value, unit, quality, reason, phase, point)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::int[], %s::timestamptz[], %s::text[],
                     %s::float8[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
"""
_INSERT_STATUSES = """
INSERT INTO statuses (gateway, device, seqepoch, seq, time, status, reason)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::timestamptz[], %s::text[], %s::text[])
"""
_INSERT_REJECTED = """
INSERT INTO rejected (worker, topic, reason, payload)
SELECT %s, t, r, p FROM unnest(%s::text[], %s::text[], %s::bytea[]) AS u(t, r, p)
"""
_UPSERT_AVAILABILITY = """
INSERT INTO gateway_status (gateway, status, received) VALUES (%s, %s, now())
ON CONFLICT (gateway) DO UPDATE SET status = excluded.status, received = excluded.received
"""
_INSERT_CONFLICT = """
INSERT INTO conflicts (worker, gateway, device, seqepoch, seq, kept_id, other_id, other)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)
"""


@dataclass
class Outcome:
    """What one write did; counters add up over a worker's life."""

    inserted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0

    def add(self, other: Outcome) -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.conflicts += other.conflicts
        self.rejected += other.rejected


def write(conn: psycopg.Connection[Any], messages: list[Decoded], worker: int) -> Outcome:
    """Store ``messages`` in one transaction; on a refusal of their content, one by one (see the module doc).

    Connection failures (``psycopg.OperationalError``) propagate: nothing was committed, nothing may be acked.
    """
    try:
        with conn.transaction():
            return _write(conn, messages, worker)
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        if len(messages) == 1:
            return _refused(conn, messages[0], worker, exc)
        log.warning("the database refused a batch of %d messages (%s): writing them one by one", len(messages), exc)
    outcome = Outcome()
    for message in messages:
        outcome.add(write(conn, [message], worker))
    return outcome


def _refused(conn: psycopg.Connection[Any], message: Decoded, worker: int, exc: psycopg.Error) -> Outcome:
    reason = f"database: {exc.diag.message_primary or exc}"[:500]
    log.warning("rejected a message on %s: %s", message.topic, reason)
    payload = message.events[0].data_json.encode()[:PAYLOAD_PREFIX] if message.events else b""
    with conn.transaction():
        _insert_rejected(conn, [Rejection(message.topic, reason, payload)], worker)
    return Outcome(rejected=1)


def _write(conn: psycopg.Connection[Any], messages: list[Decoded], worker: int) -> Outcome:
    outcome = Outcome()
    firsts: dict[Key, Event] = {}
    rejections: list[Rejection] = []
    for message in messages:
        rejections += message.rejections
        if message.availability is not None:
            conn.execute(_UPSERT_AVAILABILITY, (message.availability.gateway, message.availability.status))
        for event in message.events:
            first = firsts.setdefault(event.key, event)
            if first is not event:  # the same identity twice in this batch
                outcome.duplicates += 1
                if _differs(first, event):
                    _conflict(conn, first.id, event, worker, outcome)
    events = [firsts[key] for key in sorted(firsts)]
    if events:
        columns = _columns(events)
        with conn.cursor() as cur:
            cur.execute(_INSERT_EVENTS, {**columns, "worker": worker})
            inserted = {(g, d, e, int(s)) for g, d, e, s in cur.fetchall()}
        outcome.inserted += len(inserted)
        outcome.duplicates += len(events) - len(inserted)
        if len(inserted) < len(events):
            old = [event for event in events if event.key not in inserted]
            with conn.cursor() as cur:
                cur.execute(_DIFFERING, _columns(old))
                for g, d, e, s, kept_id in cur.fetchall():
                    _conflict(conn, kept_id, firsts[(g, d, e, int(s))], worker, outcome)
        new = [event for event in events if event.key in inserted]
        _insert_readings(conn, [e for e in new if e.type == READING])
        _insert_statuses(conn, [e for e in new if e.type == DEVICE_STATUS])
    _insert_rejected(conn, rejections, worker)
    outcome.rejected += len(rejections)
    for rejection in rejections:
        log.warning("rejected a message on %s: %s", rejection.topic, rejection.reason)
    return outcome


def _differs(a: Event, b: Event) -> bool:
    return (a.id, a.type, a.time, a.data) != (b.id, b.type, b.time, b.data)


def _conflict(conn: psycopg.Connection[Any], kept_id: str, other: Event, worker: int, outcome: Outcome) -> None:
    """Same identity, other content: the first stays; this one is kept aside and counted, not stored as an event."""
    outcome.conflicts += 1
    log.warning(
        "conflict: %s/%s seqepoch %r seq %d arrived again as id %s (kept %s)",
        other.gateway, other.device, other.seqepoch, other.seq, other.id, kept_id,
    )  # fmt: skip
    conn.execute(_INSERT_CONFLICT, (worker, *other.key, kept_id, other.id, other.data_json))


def _columns(events: list[Event]) -> dict[str, list[Any]]:
    return {
        "g": [e.gateway for e in events],
        "d": [e.device for e in events],
        "e": [e.seqepoch for e in events],
        "s": [e.seq for e in events],
        "i": [e.id for e in events],
        "t": [e.type for e in events],
        "tm": [e.time for e in events],
        "dj": [e.data_json for e in events],
    }


def _insert_readings(conn: psycopg.Connection[Any], events: list[Event]) -> None:
    rows = [
        (*e.key, n, e.time, m["quantity"], _float(m.get("value")), m["unit"], m["quality"],
         _str(m.get("reason")), _str(m.get("phase")), _str(m.get("point")))
        for e in events
        for n, m in enumerate(e.data["measurements"])
    ]  # fmt: skip
    if rows:
        conn.execute(_INSERT_READINGS, [list(column) for column in zip(*rows, strict=True)])


def _insert_statuses(conn: psycopg.Connection[Any], events: list[Event]) -> None:
    rows = [(*e.key, e.time, e.data["status"], _str(e.data.get("reason"))) for e in events]
    if rows:
        conn.execute(_INSERT_STATUSES, [list(column) for column in zip(*rows, strict=True)])


def _insert_rejected(conn: psycopg.Connection[Any], rejections: list[Rejection], worker: int) -> None:
    if rejections:
        topics = [r.topic.replace("\x00", "?") for r in rejections]
        reasons = [r.reason.replace("\x00", "?") for r in rejections]
        conn.execute(_INSERT_REJECTED, (worker, topics, reasons, [r.payload for r in rejections]))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _str(value: Any) -> str | None:
    """Optional text fields: a non-string (the contract says string or null) is kept as its JSON."""
    if value is None or isinstance(value, str):
        return value.replace("\x00", "?") if value else value
    return str(value)


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows per table and gap ranges: what ``edge-agent ingest --report`` prints."""
    out = {}
    for table in ("events", "readings", "statuses", "gateway_status", "rejected", "conflicts", "gaps"):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
        out[table] = int(row[0]) if row else 0
    return out
