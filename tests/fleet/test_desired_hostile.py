"""Bad desired documents through a real broker to a real agent: each refused and reported with its
code and field, reports paced to one a second (the newest wins), and the events never stop."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import Mosquitto, wait_for
from tests.fleet.desired_docs import Keys, desired, devices, site
from tests.fleet.desired_peers import DESIRED, REPORTED, Peer

OK = {"devices": devices({"id": "meter-1", "interval": "100ms"})}


def test_bad_documents_are_reported_and_the_events_keep_flowing(
    tmp_path: Path, broker: Mosquitto, agent_factory
) -> None:
    keys = Keys()
    config = site(tmp_path, broker.port, keys)
    peer = Peer(broker.port, "ioc/v1/#", REPORTED)
    agent = agent_factory(config)
    peer.wait_report(30, version=0, status="applied")
    wait_for(lambda: len(peer.seqs("meter-1")) >= 5, 20, "events before the documents")
    old = datetime.now(UTC) - timedelta(hours=2)
    bad_interval = {"devices": devices({"id": "m", "interval": "0"})}
    cases = [
        (b"garbage", 0, "malformed", None),
        (desired(keys, 11, OK, by="stranger"), 11, "unknown_key", "signatures[0].keyid"),
        (desired(keys, 12, OK, target="gw-other"), 12, "wrong_target", "payload.target"),
        (desired(keys, 13, OK, ttl=60, now=old), 13, "expired", "payload.expires_at"),
        (desired(keys, 14, {"buffer": {}}), 14, "malformed", "payload.sections.buffer"),
        (desired(keys, 15, bad_interval), 15, "invalid", "sections.devices[0].interval"),
        (b"{" * 300_000, 0, "too_large", None),
    ]  # fmt: skip
    for data, version, code, field in cases:
        before = len(peer.reports())
        peer.publish(DESIRED, data)
        wait_for(lambda b=before: len(peer.reports()) > b, 10, f"the report on {code}")  # type: ignore[misc]
        report = peer.reports()[-1]
        assert report["status"] == "rejected" and report["version"] == version, report
        assert (report["errors"][0]["code"], report["errors"][0]["field"]) == (code, field), report
        assert report["running"] == {"version": 0}
    # A burst: at most one report a second, and the last one is about the newest document.
    before = len(peer.reports())
    started = time.monotonic()
    for version in range(20, 30):
        peer.publish(DESIRED, desired(keys, version, OK, by="reader"), retain=False)
    wait_for(lambda: peer.reports()[-1]["version"] == 29, 10, "the report on the newest document")
    time.sleep(1.5)
    burst = peer.reports()[before:]
    assert len(burst) <= (time.monotonic() - started) + 1, [r["version"] for r in burst]
    assert burst[-1]["errors"][0]["code"] == "scope"
    count = len(peer.seqs("meter-1"))
    wait_for(lambda: len(peer.seqs("meter-1")) > count + 10, 20, "events after the documents")
    seqs = peer.seqs("meter-1")
    assert set(seqs) == set(range(1, max(seqs) + 1))
    log = agent.output()
    assert "Traceback" not in log
    assert log.count("refused: unknown_key") == 1  # audit-logged, one line per document
