"""Issue 17's acceptance: two workers on a shared subscription, a broker restart, a SIGKILLed worker and
re-published duplicates end with exactly one row per event, no gaps, and the malformed messages in ``rejected``.

Real parts: Mosquitto with persistence (sessions and their queued messages survive the restart),
a private PostgreSQL cluster, two ``edge-agent ingest`` processes, events built by the agent's own
code (agent/contract/events.py) on per-device topics and in batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson

from tests.conftest import Mosquitto
from tests.ingest.helpers import (
    EPOCH,
    PREFIX,
    IngestProcess,
    Publisher,
    count,
    query,
    reading_event,
    wait_rows,
)

DEVICES = ("meter-1", "meter-2", "meter-3")
PER_PHASE = 150  # events per device per phase; four phases


def _phase(n: int) -> list[tuple[str, bytes]]:
    """Phase n's events: per-device topics for gw-a, batches of 10 for gw-b (as with uplink.mqtt.batch)."""
    seqs = range(n * PER_PHASE + 1, (n + 1) * PER_PHASE + 1)
    single = [(f"{PREFIX}/gw-a/{d}/reading", reading_event("gw-a", d, s)) for s in seqs for d in DEVICES]
    events = [reading_event("gw-b", d, s) for s in seqs for d in DEVICES]
    batches = [(f"{PREFIX}/gw-b/batch", b"[" + b",".join(events[i : i + 10]) + b"]") for i in range(0, len(events), 10)]
    return single + batches


BAD_ELEMENT = b'{"specversion":"1.0","gateway":"gw-b","device":"x","id":"i","type":"t","seq":0}'
# (topic, payload, the reason's start, the payload as stored: a batch's bad element alone)
MALFORMED = [
    (f"{PREFIX}/gw-a/meter-1/reading", b"not json", "payload: not JSON", b"not json"),
    (f"{PREFIX}/gw-a/meter-1/reading", b'{"specversion":"1.0"}', "gateway: a non-empty string is needed", None),
    (f"{PREFIX}/gw-a/meter-9/reading", reading_event("gw-a", "meter-1", 9999), "device: 'meter-1' on the topic", None),
    (f"{PREFIX}/gw-a/meter-1/reading", b"[]", "payload: a JSON array (a batch) on a per-device topic", None),
    (f"{PREFIX}/gw-b/batch", b"[" + BAD_ELEMENT + b"]", "batch[0]: seq: an integer from 1 is needed", BAD_ELEMENT),
]


def test_two_workers_broker_restart_and_a_sigkill_end_with_one_row_per_event(
    tmp_path: Path, broker: Mosquitto, dsn: str, publisher: Publisher
) -> None:
    phases = [_phase(n) for n in range(4)]  # built once: a re-sent event keeps its id
    w1 = IngestProcess(dsn, broker.port, 1, tmp_path, "--batch-ms", "100").start()
    w2 = IngestProcess(dsn, broker.port, 2, tmp_path, "--batch-ms", "100").start()
    try:
        publisher.publish([(f"{PREFIX}/gw-a/status", b"online")])
        # Phase 0, and worker 2 SIGKILLed while it holds messages it has not committed or acked.
        publisher.publish(phases[0])
        wait_rows(dsn, "SELECT count(*) FROM events WHERE worker = 2", 1, 30)
        w2.kill()
        # Phase 1 while worker 2 is dead; phase 2 and at once a broker restart (graceful: it saves the sessions).
        publisher.publish(phases[1])
        publisher.publish(phases[2])
        broker.stop()
        broker.start()
        w2.start()
        # Its session (and what the broker kept for it) survived both the kill and the restart.
        assert "session present: True" in [line for line in w2.text().splitlines() if "connected (session" in line][-1]
        # Phase 3, re-sent duplicates of every phase, a conflict and malformed messages.
        publisher.publish(phases[3])
        again = phases[0][::7] + phases[2][::5]
        conflict = reading_event("gw-a", "meter-1", 1)  # same identity, a new id and new content
        publisher.publish([*again, (f"{PREFIX}/gw-a/meter-1/reading", conflict)])
        publisher.publish([(topic, payload) for topic, payload, _, _ in MALFORMED])
        total = 2 * len(DEVICES) * 4 * PER_PHASE
        wait_rows(dsn, "SELECT count(*) FROM events", total, 90)
        wait_rows(dsn, "SELECT count(*) FROM rejected", len(MALFORMED), 30)
        wait_rows(dsn, "SELECT count(*) FROM conflicts", 1, 30)
        time.sleep(1)  # anything late would show now
        stats = [w1.stop(), w2.stop()]
    finally:
        w1.close()
        w2.close()
    print(json.dumps(stats))
    assert count(dsn, "SELECT count(*) FROM events") == total
    # Every seq of every device, no more: 1..600 per device of both gateways.
    per_device = query(dsn, "SELECT gateway, device, count(*), min(seq), max(seq), count(DISTINCT id) "
                            "FROM events GROUP BY 1, 2 ORDER BY 1, 2")  # fmt: skip
    n = 4 * PER_PHASE
    assert per_device == [(g, d, n, 1, n, n) for g in ("gw-a", "gw-b") for d in DEVICES]
    assert query(dsn, "SELECT DISTINCT seqepoch FROM events") == [(EPOCH,)]
    assert count(dsn, "SELECT count(*) FROM gaps") == 0
    assert count(dsn, "SELECT count(*) FROM readings") == 2 * total
    # Both workers wrote: the shared subscription split the load.
    by_worker = dict(query(dsn, "SELECT worker, count(*) FROM events GROUP BY worker"))
    assert set(by_worker) == {1, 2} and min(by_worker.values()) > total // 10, by_worker
    # The re-sent events were seen and dropped (after the restart, not counting worker 2's first life).
    assert sum(s["duplicates"] for s in stats) >= len(again), stats
    # The conflicting one: counted, the first kept.
    kept = query(dsn, "SELECT id FROM events WHERE gateway = 'gw-a' AND device = 'meter-1' AND seq = 1")[0][0]
    conflicts = query(dsn, "SELECT gateway, device, seq, kept_id, other_id FROM conflicts")
    assert conflicts == [("gw-a", "meter-1", 1, kept, orjson.loads(conflict)["id"])]
    assert sum(s["conflicts"] for s in stats) == 1
    # The workers may take them in any order: compare sorted.
    rejected = query(dsn, "SELECT topic, reason, payload FROM rejected")
    # Matched by topic and stored payload (its first 512 bytes); the reasons go on with the value
    # they got ("..., got None").
    got = {(t, bytes(p)): r for t, r, p in rejected}
    assert len(got) == len(rejected) == len(MALFORMED), rejected
    for topic, payload, why, stored in MALFORMED:
        reason = got.get((topic, (stored or payload)[:512]))
        assert reason is not None and reason.startswith(why), (topic, why, reason)
    assert sum(s["rejected"] for s in stats) == len(MALFORMED)
    assert query(dsn, "SELECT gateway, status FROM gateway_status") == [("gw-a", "online")]
