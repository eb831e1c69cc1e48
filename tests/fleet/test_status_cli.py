"""``edge-agent fleet status`` against real gateways behind the shipped ACL: gw-001 runs, gw-002
stopped cleanly (its retained availability says offline), gw-003 never existed. The reported
document is published here in the spec's format, with gw-001's certificate, as its agent will.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__
from agent.fleet.keys import generate_key
from tests.conftest import ROOT, AgentProcess, wait_for
from tests.fleet.test_acl import AclBroker


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[AclBroker]:
    broker = AclBroker(tmp_path, trustme.CA())
    broker.start()
    yield broker
    broker.stop()


def _site(broker: AclBroker, gateway: str) -> Path:
    folder = broker.workdir / gateway
    folder.mkdir()
    _, public, key_id = generate_key()
    certs = broker.workdir
    site = folder / "site.yaml"
    site.write_text(
        f"gateway: {{id: {gateway}, site: lab}}\n"
        f"uplink:\n  mqtt: {{host: 127.0.0.1, port: {broker.port}, keepalive: 5s, reconnect_min: 200ms,"
        f" reconnect_max: 1s, tls: {{ca_file: {certs / 'ca.pem'}, cert_file: {certs / f'{gateway}.crt'},"
        f" key_file: {certs / f'{gateway}.key'}}}}}\n"
        f"buffer: {{path: {folder / 'buffer.db'}}}\n"
        "fleet:\n  enabled: true\n  clock: trusted\n"
        f"  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read]}}]\n"
        "devices:\n  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms}\n"
    )
    return site


def _publish_reported(broker: AclBroker, gateway: str, document: dict[str, Any]) -> None:
    """Retained on {root}/{gw}/reported with the gateway's own certificate (the ACL lets only it)."""
    folder = broker.workdir
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{gateway}-reporter")
    client.tls_set(
        ca_certs=str(folder / "ca.pem"), certfile=str(folder / f"{gateway}.crt"), keyfile=str(folder / f"{gateway}.key")
    )
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        info = client.publish(f"fleet/v1/{gateway}/reported", json.dumps(document).encode(), qos=1, retain=True)
        info.wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def _status(
    broker: AclBroker, *args: str, identity: str = "operator"
) -> tuple[subprocess.CompletedProcess[str], float]:
    folder = broker.workdir
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "status", "--port", str(broker.port),
         "--ca-file", str(folder / "ca.pem"), "--cert-file", str(folder / f"{identity}.crt"),
         "--key-file", str(folder / f"{identity}.key"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip
    return done, time.monotonic() - started


def _reported(version: int, status: str, running: int, **extra: Any) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {"gateway": "gw-001", "time": now, "version": version, "status": status, "hash": "sha256:" + "a" * 64,
            "running": {"version": running, "hash": "sha256:" + "b" * 64},
            "sections": {"devices": {"origin": "remote", "version": running}}, **extra}  # fmt: skip


def test_fleet_status_rows_and_exit_codes(acl_broker: AclBroker, agent_factory: Any) -> None:
    gw1: AgentProcess = agent_factory(_site(acl_broker, "gw-001"))
    gw2: AgentProcess = agent_factory(_site(acl_broker, "gw-002"))
    for agent in (gw1, gw2):
        wait_for(lambda a=agent: "uplink connected" in a.output(), 20, "the agents to connect")

    def rows(*args: str) -> tuple[int, dict[str, dict[str, Any]], float]:
        done, took = _status(acl_broker, "--json", *args)
        assert done.stderr == "" or done.returncode != 0, done.stderr
        return done.returncode, {r["gateway"]: r for r in json.loads(done.stdout or "[]")}, took

    # Both inventories are retained once each agent has connected.
    wait_for(lambda: rows("--to", "gw-001,gw-002")[1]["gw-002"]["agent_version"], 15, "both inventories")
    gw2.signal(signal.SIGTERM)
    assert gw2.wait(10) == 0
    _publish_reported(acl_broker, "gw-001", _reported(42, "applied", 42))

    code, got, took = rows("--to", "gw-001..gw-003")
    assert code == 1
    assert list(got) == ["gw-001", "gw-002", "gw-003"]
    one, two, three = got["gw-001"], got["gw-002"], got["gw-003"]
    assert (one["availability"], one["agent_version"], one["config_version"], one["config_status"]) == (
        "online",
        __version__,
        42,
        "applied",
    )
    assert one["clock_synced"] is True and one["clock_source"] == "trusted"
    assert isinstance(one["buffer_rows"], int) and isinstance(one["cert_days_left"], int)
    assert one["cert_days_left"] > 300 and one["ok"] is True and one["problems"] == []  # trustme: a year or more
    assert two["availability"] == "offline" and two["agent_version"] == __version__
    assert two["config_status"] == "local" and two["config_version"] == 0  # no remote config ever
    assert two["problems"] == ["availability offline"]
    assert three["availability"] == "unknown" and three["agent_version"] is None and not three["ok"]
    assert took < 10

    code, got, took = rows("--to", "gw-001", "--wait", "6")
    assert code == 0 and list(got) == ["gw-001"]
    assert took < 5  # stopped once gw-001's documents were in, without waiting out --wait

    code, got, _ = rows()  # every gateway that left something retained
    assert code == 1 and list(got) == ["gw-001", "gw-002"]

    # A rejected newer version: gw-001 still runs v42, but its config is not what was asked.
    errors = [{"field": "sections.devices[0].port", "code": "invalid", "message": "port: must be <= 65535"}]
    _publish_reported(acl_broker, "gw-001", _reported(43, "rejected", 42, errors=errors))
    code, got, _ = rows("--to", "gw-001")
    assert code == 1
    row = got["gw-001"]
    assert (row["config_reported_version"], row["config_status"], row["config_version"]) == (43, "rejected", 42)
    assert row["config_reason"] == "port: must be <= 65535" and row["problems"] == ["config version 43 rejected"]

    done, _ = _status(acl_broker, "--to", "gw-001")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["GATEWAY", "STATE", "AGENT", "CONFIG", "CLOCK", "BUFFER", "CERT"]
    assert lines[1].startswith("gw-001") and "v43 rejected (runs v42)" in lines[1] and "synced (trusted)" in lines[1]
    assert "gw-001: config version 43 rejected" in lines and "gw-001: config: port: must be <= 65535" in lines

    # Usage: a backwards range is the operator's mistake, named.
    done, _ = _status(acl_broker, "--to", "gw-5..gw-1")
    assert done.returncode == 2 and "--to" in done.stderr and "backwards" in done.stderr
    # A gateway identity may not read the others' documents: it sees nothing, which is a failure.
    done, _ = _status(acl_broker, identity="gw-002")
    assert done.returncode == 1 and "no gateway has anything retained" in done.stderr


def test_malformed_retained_documents_make_a_row_say_so(acl_broker: AclBroker) -> None:
    """Anyone allowed to publish there could write anything: the row says what is wrong, nothing crashes."""
    folder = acl_broker.workdir
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="gw-001-junk")
    client.tls_set(
        ca_certs=str(folder / "ca.pem"), certfile=str(folder / "gw-001.crt"), keyfile=str(folder / "gw-001.key")
    )
    client.connect("127.0.0.1", acl_broker.port)
    client.loop_start()
    try:
        for topic, payload in (
            ("ioc/v1/gw-001/status", b"online"),
            ("ioc/v1/gw-001/inventory", b'{"data": {"clock": {"synced": [1]}, "buffer": "x", "certificate": 7}}'),
            ("fleet/v1/gw-001/reported", b"\xff not json"),
        ):
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    done, _ = _status(acl_broker, "--to", "gw-001")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "gw-001: reported document unreadable" in done.stdout.splitlines()
    done, _ = _status(acl_broker, "--to", "gw-001", "--json")
    [row] = json.loads(done.stdout)
    assert row["availability"] == "online" and row["clock_synced"] == [1] and row["buffer_rows"] is None
