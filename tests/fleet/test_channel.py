"""The fleet control channel end to end: a real Mosquitto, a real agent process, the operator's
``edge-agent fleet`` command as a process, and hostile requests sent with paho directly.

Events must keep flowing, in order, whatever arrives on the control topics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.fleet.envelope import COMMAND_TYPE, CONFIG_TYPE, make_body, sign
from agent.fleet.keys import generate_key, load_private_key
from agent.observability.clock import kernel_clock_sync
from tests.conftest import ROOT, AgentProcess, Mosquitto, free_port, wait_for, write_config

DEVICES = "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"


def _key(folder: Path, name: str) -> tuple[Path, str, str]:
    pem, public, key_id = generate_key()
    path = folder / f"{name}.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    return path, public, key_id


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory) -> dict[str, Any]:
    key, public, key_id = _key(tmp_path, "ops")
    metrics = free_port()
    # A container's clock is right but not NTP-disciplined as the kernel sees it: trusted here;
    # the kernel's verdict is tested on its own below.
    fleet_yaml = (
        "fleet:\n  enabled: true\n  groups: [north]\n  clock: trusted\n"
        f"  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read, write]}}]\n"
        "  writable: [{device: meter-1, point: voltage}]\n"
        f"observability: {{listen: '127.0.0.1:{metrics}'}}\n"
    )
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=DEVICES, extra=fleet_yaml)
    sub = subscriber_factory(broker.port, "ioc/v1/#")  # the events only: replies are not under the prefix
    agent: AgentProcess = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 3, 20, "events before any command")
    return {"key": key, "key_id": key_id, "port": broker.port, "sub": sub, "agent": agent, "tmp": tmp_path,
            "metrics": metrics}  # fmt: skip


def _cli(f: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "cmd", "gw-test", *args, "--key", str(f["key"]),
         "--key-id", f["key_id"], "--port", str(f["port"]), "--json", "--timeout", "10"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip


class Raw:
    """A paho client that sends requests as they are given and collects the replies."""

    def __init__(self, port: int) -> None:
        self.replies: dict[str, tuple[str, dict[str, Any]]] = {}
        self._got = threading.Condition()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="hostile")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("fleet/v1/gw-test/res/#", qos=1)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        parts = message.topic.split("/")
        with self._got:
            self.replies[parts[-2]] = (parts[-1], json.loads(message.payload))
            self._got.notify_all()

    def ask(self, request_id: str, name: str, payload: bytes, *, retain: bool = False) -> tuple[str, dict[str, Any]]:
        self.client.publish(f"fleet/v1/gw-test/req/{request_id}/{name}", payload, qos=1, retain=retain)
        return wait_for(lambda: self.replies.get(request_id), 10, f"the reply to {request_id}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_operator_commands_are_answered_and_events_keep_flowing(fleet: dict[str, Any]) -> None:
    done = _cli(fleet, "ping")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["gateway"] == "gw-test"

    done = _cli(fleet, "read", "device=meter-1", "point=active_power")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == "ok" and isinstance(reply["data"]["value"], float), reply
    assert reply["data"]["unit"] == "kW" and 0 <= reply["data"]["age_s"] < 5

    done = _cli(fleet, "status")
    assert done.returncode == 0 and json.loads(done.stdout)["data"]["accounting"]["accepted"] > 0

    # A point the site file does not open to remote writes; then one it does, which the virtual
    # driver cannot write: both refused with the reason, nothing changed.
    done = _cli(fleet, "write", "device=meter-1", "point=active_power", "value=1")
    assert done.returncode == 1 and json.loads(done.stdout)["code"] == "not_writable", done.stdout
    done = _cli(fleet, "write", "device=meter-1", "point=voltage", "value=1")
    assert done.returncode == 1 and json.loads(done.stdout)["status"] == "rejected", done.stdout

    seqs = fleet["sub"].seqs("meter-1")
    wait_for(lambda: len(fleet["sub"].seqs("meter-1")) > len(seqs) + 5, 10, "events after the commands")
    got = sorted(fleet["sub"].seqs("meter-1"))
    assert got == list(range(1, len(got) + 1))  # no gap, no duplicate


def test_hostile_requests_are_refused_with_their_reason(fleet: dict[str, Any]) -> None:
    key = load_private_key(fleet["key"])
    key_id = fleet["key_id"]
    other, _, other_id = _key(fleet["tmp"], "stranger")
    stranger = load_private_key(other)

    def signed(name: str, request_id: str, *, target: str = "gw-test", type_: str = COMMAND_TYPE,
               by: Any = key, kid: str = key_id, **extra: Any) -> bytes:  # fmt: skip
        body = make_body(target=target, ttl=60, fields={"command": name, "id": request_id, "args": {}, **extra})
        return sign(type_, body, by, kid)

    raw = Raw(fleet["port"])
    try:
        good = signed("ping", "r1")
        assert raw.ask("r1", "ping", good)[0] == "ok"
        cases = {
            "r2": ("ping", b"not json at all", "malformed"),
            "r3": ("ping", signed("ping", "r3", by=stranger, kid=other_id), "unknown_key"),
            "r4": ("ping", signed("ping", "r4", by=stranger, kid=key_id), "bad_signature"),
            "r5": ("ping", signed("ping", "r5", target="gw-other"), "wrong_target"),
            "r6": ("ping", signed("ping", "r6", type_=CONFIG_TYPE), "wrong_type"),
            "r7": ("status", signed("ping", "r7"), "malformed"),  # signed ping, sent as status
            "r8": ("ping", signed("ping", "somebody-else"), "malformed"),  # the id is signed too
            "r9": ("ping", b"{" * 300_000, "too_large"),
        }
        for request_id, (name, payload, code) in cases.items():
            status, reply = raw.ask(request_id, name, payload)
            assert (status, reply.get("code")) == ("rejected", code), (request_id, reply)
        # The same signed request again, under a new id in the topic: the nonce says replay.
        status, reply = raw.ask("r1b", "ping", good)
        assert reply.get("code") == "replayed", reply
        status, reply = raw.ask("r11", "reboot", signed("reboot", "r11"))
        assert (status, reply.get("code")) == ("unsupported", "unknown_command"), reply
        expired = make_body(target="gw-test", ttl=60, fields={"command": "ping", "id": "r12", "args": {}},
                            now=datetime.now(UTC) - timedelta(minutes=5))  # fmt: skip
        status, reply = raw.ask("r12", "ping", sign(COMMAND_TYPE, expired, key, key_id))
        assert reply.get("code") == "expired", reply
    finally:
        raw.close()
    seqs = sorted(fleet["sub"].seqs("meter-1"))
    assert seqs == list(range(1, len(seqs) + 1))
    assert "Traceback" not in fleet["agent"].output()
    # Every refusal is counted where the operations team looks: /metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet['metrics']}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counted = {
        (s.labels["kind"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edge_agent_fleet_requests_total"
    }
    assert counted[("command", "accepted")] == 1, counted  # the good ping; the unknown command is not run
    for code in ("malformed", "unknown_key", "bad_signature", "wrong_target", "wrong_type", "too_large"):
        assert counted[("command", code)] >= 1, (code, counted)
    assert counted[("command", "replayed")] == 1 and counted[("command", "expired")] == 1, counted


def test_retained_requests_never_run_and_the_kernel_clock_decides(
    tmp_path: Path, broker: Mosquitto, agent_factory
) -> None:
    """A request left retained is refused; with ``clock: kernel`` (the default) the answer follows
    the kernel's NTP state, whatever it is on this machine."""
    key, public, key_id = _key(tmp_path, "ops")
    fleet_yaml = f"fleet:\n  enabled: true\n  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read]}}]\n"
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=DEVICES, extra=fleet_yaml)
    raw = Raw(broker.port)
    # Left retained before the gateway connects: it arrives flagged retained and is never run.
    stale = make_body(target="gw-test", ttl=60, fields={"command": "ping", "id": "c0", "args": {}})
    raw.client.publish("fleet/v1/gw-test/req/c0/ping", sign(COMMAND_TYPE, stale, load_private_key(key), key_id),
                       qos=1, retain=True).wait_for_publish(5)  # fmt: skip
    agent_factory(config)
    try:
        status, reply = wait_for(lambda: raw.replies.get("c0"), 20, "the answer to the retained request")
        assert (status, reply.get("code")) == ("rejected", "retained"), reply
        raw.client.publish("fleet/v1/gw-test/req/c0/ping", b"", qos=1, retain=True)  # clear it
        body = make_body(target="gw-test", ttl=60, fields={"command": "ping", "id": "c1", "args": {}})
        payload = sign(COMMAND_TYPE, body, load_private_key(key), key_id)
        status, reply = raw.ask("c1", "ping", payload)  # subscribed: it answered c0
    finally:
        raw.close()
    synced = kernel_clock_sync()
    if synced is not None and synced[0] is False:
        assert (status, reply.get("code")) == ("rejected", "clock_unsynced"), reply
    else:
        assert status == "ok", reply


def test_the_agent_loads_no_signature_code_while_the_channel_is_off() -> None:
    """cryptography costs about 7 MB of memory: a gateway without the fleet channel never loads it."""
    probe = (
        "import sys, agent.runtime.agent; print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
