"""The tables ``edge-agent ingest --init-db`` creates (idempotent: safe to run again).

``events`` holds every event once, keyed by its identity (gateway, device, seqepoch, seq);
``readings`` and ``statuses`` are typed views of the events a dashboard queries, written in the
same transaction as the event. ``gaps`` is a view computed from ``events`` on demand, so two
workers never race over it (docs/ingest.md, "Gaps").
"""

from __future__ import annotations

from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    gateway   text        NOT NULL,
    device    text        NOT NULL,
    seqepoch  text        NOT NULL,
    seq       bigint      NOT NULL,
    id        text        NOT NULL,
    type      text        NOT NULL,
    time      timestamptz NOT NULL,
    received  timestamptz NOT NULL DEFAULT now(),
    worker    integer     NOT NULL,
    data      jsonb       NOT NULL,
    PRIMARY KEY (gateway, device, seqepoch, seq)
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_received ON events (received);

CREATE TABLE IF NOT EXISTS readings (
    gateway   text        NOT NULL,
    device    text        NOT NULL,
    seqepoch  text        NOT NULL,
    seq       bigint      NOT NULL,
    n         integer     NOT NULL,
    time      timestamptz NOT NULL,
    quantity  text        NOT NULL,
    value     double precision,
    unit      text        NOT NULL,
    quality   text        NOT NULL,
    reason    text,
    phase     text,
    point     text,
    PRIMARY KEY (gateway, device, seqepoch, seq, n),
    FOREIGN KEY (gateway, device, seqepoch, seq) REFERENCES events ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS readings_series ON readings (gateway, device, quantity, time);

CREATE TABLE IF NOT EXISTS statuses (
    gateway   text        NOT NULL,
    device    text        NOT NULL,
    seqepoch  text        NOT NULL,
    seq       bigint      NOT NULL,
    time      timestamptz NOT NULL,
    status    text        NOT NULL,
    reason    text,
    PRIMARY KEY (gateway, device, seqepoch, seq),
    FOREIGN KEY (gateway, device, seqepoch, seq) REFERENCES events ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS gateway_status (
    gateway   text        PRIMARY KEY,
    status    text        NOT NULL,
    received  timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS rejected (
    n         bigserial   PRIMARY KEY,
    received  timestamptz NOT NULL DEFAULT now(),
    worker    integer     NOT NULL,
    topic     text        NOT NULL,
    reason    text        NOT NULL,
    payload   bytea       NOT NULL
);

CREATE TABLE IF NOT EXISTS conflicts (
    n         bigserial   PRIMARY KEY,
    received  timestamptz NOT NULL DEFAULT now(),
    worker    integer     NOT NULL,
    gateway   text        NOT NULL,
    device    text        NOT NULL,
    seqepoch  text        NOT NULL,
    seq       bigint      NOT NULL,
    kept_id   text        NOT NULL,
    other_id  text        NOT NULL,
    other     jsonb       NOT NULL
);

-- Missing seq ranges per device and epoch, between events that did arrive. A new epoch starts
-- afresh (no gap across epochs, none before an epoch's first event: docs/events.md).
CREATE OR REPLACE VIEW gaps AS
SELECT gateway, device, seqepoch, seq + 1 AS first_missing, next_seq - 1 AS last_missing,
       next_seq - seq - 1 AS missing
FROM (SELECT gateway, device, seqepoch, seq,
             lead(seq) OVER (PARTITION BY gateway, device, seqepoch ORDER BY seq) AS next_seq
      FROM events) AS s
WHERE next_seq > seq + 1;
"""


def init_db(conn: Any) -> None:
    """Create what is missing, in one transaction; an advisory lock keeps two --init-db runs apart."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('edge-agent ingest schema'))")
        conn.execute(SCHEMA)
