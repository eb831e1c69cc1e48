"""Remote configuration end to end: a real Mosquitto (with TLS and the shipped ACL for the main
case), real ``edge-agent run`` processes, documents signed here and published retained on
``fleet/v1/gw-test/desired``, the reported document and the events followed by real clients.

Through every change the unchanged device's sequence must arrive without a gap.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trustme

from agent.fleet.desired.document import sections_hash
from tests.conftest import AgentProcess, Mosquitto, free_port, wait_for
from tests.fleet.desired_docs import METER, Keys, desired, devices, site
from tests.fleet.desired_peers import DESIRED, REPORTED, Peer
from tests.fleet.test_acl import AclBroker

TWO = METER + "  - {id: meter-3, driver: virtual, kind: meter, interval: 100ms}\n"


def _no_gap(peer: Peer, device: str) -> list[int]:
    seqs = peer.seqs(device)
    assert seqs and set(seqs) == set(range(1, max(seqs) + 1)), f"{device}: missing {_missing(seqs)}"
    return seqs


def _missing(seqs: list[int]) -> list[int]:
    return sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))[:20]


def _one_event_per_seq(peer: Peer, device: str) -> None:
    """A seq never names two different events (a duplicate is the same event again)."""
    ids: dict[int, set[str]] = defaultdict(set)
    for event in peer.events():
        if event.get("device") == device:
            ids[event["seq"]].add(event["id"])
    reused = {seq: names for seq, names in ids.items() if len(names) > 1}
    assert not reused, reused


def test_a_document_applies_over_tls_and_the_shipped_acl(tmp_path: Path, agent_factory) -> None:
    """A device added and another's interval changed: applying, then applied with the hash; the
    unchanged device never misses a seq, the changed one continues its sequence, the new one runs."""
    ca = trustme.CA()
    broker = AclBroker(tmp_path, ca)
    issued = ca.issue_cert("gw-test", common_name="gw-test")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "gw-test.crt"))
    issued.private_key_pem.write_to_path(str(tmp_path / "gw-test.key"))
    (tmp_path / "gw-test.key").chmod(0o600)
    broker.start()
    try:
        keys = Keys()
        config = site(tmp_path, broker.port, keys, devices=TWO)
        tls = (
            f"tls: {{ca_file: {tmp_path / 'ca.pem'}, cert_file: {tmp_path / 'gw-test.crt'},"
            f" key_file: {tmp_path / 'gw-test.key'}}}}}"
        )
        config.write_text(config.read_text().replace("reconnect_max: 1s}", f"reconnect_max: 1s, {tls}"))
        ioc = Peer(broker.port, "ioc/v1/#", certs=(tmp_path, "ioc"))
        operator = Peer(broker.port, REPORTED, certs=(tmp_path, "operator"))
        agent = agent_factory(config)
        operator.wait_report(30, version=0, status="applied")
        wait_for(lambda: len(ioc.seqs("meter-1")) >= 10, 20, "events before the change")
        sections = {
            "devices": devices(
                {"id": "meter-1", "interval": "100ms"},
                {"id": "meter-3", "interval": "200ms"},
                {"id": "meter-2", "interval": "100ms"},
            )
        }
        started = time.monotonic()
        operator.publish(DESIRED, desired(keys, 7, sections, health_window=10))
        applying = operator.wait_report(20, version=7, status="applying")
        assert applying["running"] == {"version": 7, "hash": sections_hash(sections)}
        assert "health_window_ends" in applying
        applied = operator.wait_report(40, version=7, status="applied")
        assert applied["hash"] == sections_hash(sections)
        assert applied["sections"]["devices"] == {"origin": "remote", "version": 7}
        assert applied["sections"]["uplink"] == {"origin": "local"}
        assert time.monotonic() - started >= 10  # not before the health window passed
        before = len(ioc.seqs("meter-1"))
        wait_for(lambda: len(ioc.seqs("meter-1")) > before + 10, 20, "events after the apply")
        _no_gap(ioc, "meter-1")
        _no_gap(ioc, "meter-3")  # restarted with its new interval, its sequence goes on
        assert len(ioc.seqs("meter-2")) >= 5
        log = agent.output()
        assert "+meter-2" in log and "+meter-3" in log and "-meter-1" not in log, log[-2000:]
        # The audit trail has both lines: the repeat filter folds neither (same template, 10 s apart).
        assert "signed by op: applying (" in log and "signed by op: applied" in log, log[-2000:]
        assert "Traceback" not in log
        ioc.close()
        operator.close()
    finally:
        broker.stop()


def test_a_dead_broker_is_rolled_back_and_the_version_never_retried(
    tmp_path: Path, broker: Mosquitto, agent_factory
) -> None:
    keys = Keys()
    config = site(tmp_path, broker.port, keys)
    peer = Peer(broker.port, "ioc/v1/#", REPORTED)
    agent_factory(config)
    wait_for(lambda: len(peer.seqs("meter-1")) >= 5, 20, "events before the change")
    dead = free_port()
    uplink = {"mqtt": {"host": "127.0.0.1", "port": dead, "topic_prefix": "ioc/v1", "keepalive": "5s",
                       "reconnect_min": "200ms", "reconnect_max": "1s"}}  # fmt: skip
    sent = time.monotonic()
    peer.publish(DESIRED, desired(keys, 3, {"uplink": uplink}, health_window=10))
    report = peer.wait_report(10 + 30 + 10, version=3, status="rolled_back")
    took = time.monotonic() - sent
    assert 10 <= took <= 10 + 30, took
    assert report["reason"] == "uplink did not connect within the health window", report
    assert report["running"] == {"version": 0}
    assert report["errors"][0]["field"] == "sections.uplink.mqtt" and report["errors"][0]["code"] == "unhealthy"
    count = len(peer.seqs("meter-1"))
    wait_for(lambda: len(peer.seqs("meter-1")) > count + 10, 20, "events through the restored link")
    _no_gap(peer, "meter-1")  # what was buffered while the link pointed nowhere arrived
    # The retained document came again on the restored link: recognised, never taken for a replay.
    assert {r["status"] for r in peer.reports() if r["version"] == 3} <= {"applying", "rolled_back"}
    # The same version signed again: refused, never retried.
    peer.publish(DESIRED, desired(keys, 3, {"uplink": uplink}, health_window=10))
    again = peer.wait_report(10, version=3, status="rejected")
    assert again["errors"][0]["code"] == "rolled_back_before", again


def test_kill_9_during_the_health_window_restarts_on_the_old_config(
    tmp_path: Path, broker: Mosquitto, agent_factory
) -> None:
    keys = Keys()
    config = site(tmp_path, broker.port, keys)
    peer = Peer(broker.port, "ioc/v1/#", REPORTED)
    agent: AgentProcess = agent_factory(config)
    wait_for(lambda: len(peer.seqs("meter-1")) >= 5, 20, "events before the change")
    sections = {"devices": devices({"id": "meter-1", "interval": "100ms"}, {"id": "meter-2", "interval": "100ms"})}
    peer.publish(DESIRED, desired(keys, 5, sections, health_window=60))
    peer.wait_report(20, version=5, status="applying")
    wait_for(lambda: len(peer.seqs("meter-2")) >= 3, 20, "the new device's events")
    assert (tmp_path / "fleet" / "config" / "pending.json").exists()
    agent.signal(signal.SIGKILL)
    agent.wait(5)
    restarted = agent_factory(config)
    report = peer.wait_report(30, version=5, status="rolled_back")
    assert report["reason"] == "the agent stopped during the health window"
    assert report["running"] == {"version": 0}
    assert not (tmp_path / "fleet" / "config" / "pending.json").exists()
    count = len(peer.seqs("meter-1"))
    wait_for(lambda: len(peer.seqs("meter-1")) > count + 10, 20, "events after the restart")
    meter_2 = len(peer.seqs("meter-2"))
    time.sleep(1.5)
    assert len(peer.seqs("meter-2")) == meter_2  # the old config runs: no meter-2
    _no_gap(peer, "meter-1")
    _one_event_per_seq(peer, "meter-1")
    # The retained version 5 is still on the broker: never retried after the restart either.
    assert "applying" not in restarted.output()


def test_offline_bumps_apply_the_latest_only_and_a_restart_keeps_it(
    tmp_path: Path, broker: Mosquitto, agent_factory
) -> None:
    """While the gateway is off, version 1 then 2 are published; it starts, applies 2 alone; a
    restart then runs the remote sections from its state directory, without applying again."""
    keys = Keys()
    config = site(tmp_path, broker.port, keys)
    peer = Peer(broker.port, "ioc/v1/#", REPORTED)
    first = {"devices": devices({"id": "meter-1", "interval": "100ms"}, {"id": "meter-2", "interval": "100ms"})}
    second = {"devices": devices({"id": "meter-1", "interval": "100ms"}, {"id": "meter-4", "interval": "100ms"})}
    peer.publish(DESIRED, desired(keys, 1, first, health_window=10))
    peer.publish(DESIRED, desired(keys, 2, second, health_window=10))
    agent: AgentProcess = agent_factory(config)
    peer.wait_report(40, version=2, status="applied")
    assert not [r for r in peer.reports() if r["version"] == 1]
    assert "version 1 " not in agent.output()
    assert peer.seqs("meter-2") == []
    wait_for(lambda: len(peer.seqs("meter-4")) >= 3, 20, "the remote device's events")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    before = len(peer.reports())
    restarted = agent_factory(config)
    wait_for(lambda: len(peer.reports()) > before, 20, "the report after the restart")
    assert _latest(peer)["status"] == "applied" and _latest(peer)["version"] == 2
    assert _latest(peer)["running"]["version"] == 2
    count = len(peer.seqs("meter-4"))
    wait_for(lambda: len(peer.seqs("meter-4")) > count + 5, 20, "the remote device after the restart")
    time.sleep(1)  # the retained document came again on connect: nothing happens
    assert "applying" not in restarted.output() and "refused" not in restarted.output()
    assert all(r["status"] == "applied" for r in peer.reports()[before:])
    _no_gap(peer, "meter-1")


def _latest(peer: Peer) -> dict[str, Any]:
    return peer.reports()[-1]
