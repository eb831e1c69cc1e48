"""``restart`` one device, scopes and request ids, end to end: a real Mosquitto, a real agent
process, the operator's ``edge-agent fleet cmd`` as a process and raw signed requests.

A restarted device's seq continues (the store numbers each device's events, not its driver);
the other devices keep polling through it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.envelope import COMMAND_TYPE, make_body, sign
from agent.fleet.keys import load_private_key
from tests.conftest import ROOT, AgentProcess, Mosquitto, wait_for, write_config
from tests.fleet.test_channel import Raw, _key

DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
    "  - {id: meter-2, driver: virtual, kind: meter, interval: 50ms}\n"
    "  - {id: meter-3, driver: virtual, kind: meter, interval: 50ms, enabled: false}\n"
)


@pytest.fixture
def gateway(tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory) -> dict[str, Any]:
    ops, ops_public, ops_id = _key(tmp_path, "ops")
    reader, reader_public, reader_id = _key(tmp_path, "reader")
    fleet_yaml = (
        "fleet:\n  enabled: true\n  clock: trusted\n  keys:\n"
        f"    - {{id: {ops_id}, public_key: '{ops_public}', scopes: [read, restart]}}\n"
        f"    - {{id: {reader_id}, public_key: '{reader_public}', scopes: [read]}}\n"
    )
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=DEVICES, extra=fleet_yaml)
    sub = subscriber_factory(broker.port, "ioc/v1/#")
    agent: AgentProcess = agent_factory(config)
    wait_for(lambda: min(len(sub.seqs("meter-1")), len(sub.seqs("meter-2"))) >= 5, 20, "events of both meters")
    return {"ops": (ops, ops_id), "reader": (reader, reader_id), "port": broker.port, "sub": sub, "agent": agent}


def _cli(g: dict[str, Any], *args: str, key: str = "ops") -> subprocess.CompletedProcess[str]:
    path, key_id = g[key]
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "cmd", "gw-test", *args, "--key", str(path), "--key-id", key_id,
         "--port", str(g["port"]), "--json", "--timeout", "15"],
        capture_output=True, text=True, cwd=ROOT, timeout=40, check=False,
    )  # fmt: skip


def _reading_times(sub: Any, device: str) -> list[datetime]:
    return sorted(
        datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
        for e in sub.snapshot()
        if e["device"] == device and e["type"] != "city.device.status"
    )


def test_a_restarted_device_continues_its_seq_and_the_others_keep_polling(gateway: dict[str, Any]) -> None:
    sub = gateway["sub"]
    before = {d: max(sub.seqs(d)) for d in ("meter-1", "meter-2")}
    done = _cli(gateway, "restart", "device=meter-1")
    assert done.returncode == 0, (done.stdout, done.stderr)
    reply = json.loads(done.stdout)
    assert reply["data"] == {"device": "meter-1", "status": "online"}, reply
    assert "device meter-1 restarted on request" in gateway["agent"].output()

    # Events after the restart, for both: then every seq from 1 on arrived exactly once.
    wait_for(lambda: all(len(sub.seqs(d)) > before[d] + 20 for d in before), 20, "events after the restart")
    for device in before:
        got = sub.seqs(device)
        assert sorted(got) == list(range(1, max(got) + 1)), (device, sorted(got))
        assert len(got) == len(set(got)), f"{device}: a seq came twice"
    # meter-2 kept polling every 50 ms through meter-1's restart: no pause in its readings.
    times = _reading_times(sub, "meter-2")
    pauses = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert max(pauses) < 0.5, max(pauses)
    # meter-1 came back and reads again, numbering on after its last seq before the restart.
    assert max(sub.seqs("meter-1")) > before["meter-1"] + 20


def test_restart_refuses_unknown_disabled_and_unsigned_for_scope(gateway: dict[str, Any]) -> None:
    cases = [
        (("restart", "device=nope"), "ops", "unknown_device"),
        (("restart", "device=meter-3"), "ops", "device_disabled"),
        (("restart",), "ops", "bad_args"),
        (("restart", "device=meter-1"), "reader", "scope"),  # a key without the restart scope
        (("doctor",), "reader", "scope"),  # nor the diagnostics scope
        (("diagnostics",), "ops", "scope"),
    ]
    for args, key, code in cases:
        done = _cli(gateway, *args, key=key)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        reply = json.loads(done.stdout)
        assert (reply["status"], reply["code"]) == ("rejected", code), (args, reply)
    assert "restarted on request" not in gateway["agent"].output()  # nothing was restarted


def test_a_request_id_runs_at_most_once(gateway: dict[str, Any]) -> None:
    path, key_id = gateway["ops"]
    key = load_private_key(path)

    def signed(name: str, request_id: str, **args: Any) -> bytes:
        body = make_body(target="gw-test", ttl=60, fields={"command": name, "id": request_id, "args": args})
        return sign(COMMAND_TYPE, body, key, key_id)  # a fresh nonce each time

    raw = Raw(gateway["port"])
    try:
        status, reply = raw.ask("once-1", "restart", signed("restart", "once-1", device="meter-2"))
        assert status == "ok", reply
        raw.replies.pop("once-1")
        # A new envelope (new nonce, valid signature) reusing the id: refused, not run again.
        status, reply = raw.ask("once-1", "restart", signed("restart", "once-1", device="meter-2"))
        assert (status, reply.get("code")) == ("rejected", "duplicate_id"), reply
        raw.replies.pop("once-1")
        status, reply = raw.ask("once-1", "ping", signed("ping", "once-1"))  # whatever the command
        assert (status, reply.get("code")) == ("rejected", "duplicate_id"), reply
        assert raw.ask("once-2", "ping", signed("ping", "once-2"))[0] == "ok"  # a new id runs
    finally:
        raw.close()
    assert gateway["agent"].output().count("device meter-2 restarted on request") == 1
