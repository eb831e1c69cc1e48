"""``doctor`` and ``diagnostics`` end to end: a real Mosquitto, a real agent process, and
``edge-agent fleet`` as a process; a fake gateway (a paho client answering on the control topics)
for what a real one never does: a wrong sha256, a lost reply.

Planted secrets (the broker password, the operator's key) must appear in no bundle, log or reply.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.envelope import COMMAND_TYPE, make_body, sign
from agent.fleet.keys import load_private_key
from tests.conftest import ROOT, AgentProcess, Mosquitto, wait_for
from tests.fleet.test_channel import Raw, _key

MEMBERS = {"manifest.json", "logs.txt", "config.json", "versions.json", "metrics.txt", "status.json", "doctor.json"}


@pytest.fixture
def gateway(tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory) -> dict[str, Any]:
    marker = f"pw-MARKER-{secrets.token_hex(8)}"
    password = tmp_path / "mqtt.password"
    password.write_text(marker + "\n")
    password.chmod(0o600)
    ops, public, key_id = _key(tmp_path, "ops")
    reader, reader_public, reader_id = _key(tmp_path, "reader")
    config = tmp_path / "site.yaml"
    config.write_text(
        "gateway: {id: gw-test, site: lab, health_interval: 60s}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1, keepalive: 5s,"
        f" username: gw-test, password_file: {password}}}\n"
        f"buffer: {{path: {tmp_path / 'state' / 'buffer.db'}, max_bytes: 64MiB}}\n"
        "fleet:\n  enabled: true\n  clock: trusted\n  keys:\n"
        f"    - {{id: {key_id}, public_key: '{public}', scopes: [read, diagnostics]}}\n"
        f"    - {{id: {reader_id}, public_key: '{reader_public}', scopes: [read]}}\n"
        "devices:\n  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
    )
    sub = subscriber_factory(broker.port, "ioc/v1/#")
    replies = subscriber_factory(broker.port, "fleet/v1/gw-test/res/#")  # every reply, as the broker carries it
    agent: AgentProcess = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 3, 20, "events before any command")
    secrets_planted = [marker, str(ops), ops.read_text().split("-----")[2].strip().splitlines()[0]]
    return {"ops": (ops, key_id), "reader": (reader, reader_id), "port": broker.port, "agent": agent,
            "replies": replies, "secrets": secrets_planted, "state": tmp_path / "state", "tmp": tmp_path}  # fmt: skip


def _fleet(g: dict[str, Any], *args: str, key: str = "ops") -> subprocess.CompletedProcess[str]:
    path, key_id = g[key]
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args, "--key", str(path), "--key-id", key_id,
         "--port", str(g["port"]), "--json", "--timeout", "10"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip


def test_doctor_answers_rows_from_the_live_agent(gateway: dict[str, Any]) -> None:
    done = _fleet(gateway, "cmd", "gw-test", "doctor")
    assert done.returncode == 0, (done.stdout, done.stderr)
    data = json.loads(done.stdout)["data"]
    rows = data["rows"]
    assert {r["check"] for r in rows} >= {"config", "clock", "buffer", "disk", "uplink", "devices", "agent"}
    assert all(r["status"] in ("ok", "warn", "fail") and r["detail"] for r in rows), rows
    by = {(r["check"], r["target"]): r for r in rows}
    assert by[("uplink", "mqtt")]["status"] == "ok", rows
    assert by[("devices", "all")] == {"check": "devices", "target": "all", "status": "ok",
                                      "detail": "1 of 1 running devices online"}  # fmt: skip
    assert by[("config", str(gateway["tmp"] / "site.yaml"))]["detail"] == "the file on disk is the running config"
    assert all("fix" in r for r in rows if r["status"] != "ok")
    assert data["verdict"] in ("ok", "warn")  # nothing fails on this gateway (the clock may warn)

    done = _fleet(gateway, "cmd", "gw-test", "doctor", key="reader")
    assert json.loads(done.stdout)["code"] == "scope", done.stdout
    done = _fleet(gateway, "cmd", "gw-test", "diagnostics", "bundle=diag-20260101T000000Z-0badf00d", "part=0")
    assert json.loads(done.stdout)["code"] == "unknown_bundle", done.stdout
    done = _fleet(gateway, "cmd", "gw-test", "diagnostics", "bundle=x", "part=-1")
    assert json.loads(done.stdout)["code"] == "bad_args", done.stdout


def test_no_answer_from_an_offline_gateway_says_so(tmp_path: Path, broker: Mosquitto) -> None:
    """Its retained status (the last will) is the bare word offline; its last inventory tells since when."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="gone")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish("ioc/v1/gw-gone/status", b"offline", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    key, _, key_id = _key(tmp_path, "ops")
    done = subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "cmd", "gw-gone", "ping", "--key", str(key), "--key-id", key_id,
         "--port", str(broker.port), "--timeout", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no answer from gw-gone within 1 s: offline (so says its status topic" in done.stderr, done.stderr

    # With its retained inventory (put out at least every 5 minutes while online): since when.
    client.reconnect()
    client.loop_start()
    inventory = {"type": "city.gateway.inventory", "time": "2026-12-07T10:00:00.000Z", "data": {}}
    client.publish("ioc/v1/gw-gone/inventory", json.dumps(inventory), qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    done = subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "cmd", "gw-gone", "ping", "--key", str(key), "--key-id", key_id,
         "--port", str(broker.port), "--timeout", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "offline since 2026-12-07T10:00:00.000Z or up to 5 minutes later" in done.stderr, done.stderr


def test_the_bundle_arrives_whole_checked_and_without_secrets(gateway: dict[str, Any]) -> None:
    # A request whose id is the broker password: the agent logs request ids, so the password
    # reaches its log lines by value, and must leave them redacted.
    marker = gateway["secrets"][0]
    path, key_id = gateway["ops"]
    body = make_body(target="gw-test", ttl=60, fields={"command": "ping", "id": marker, "args": {}})
    raw = Raw(gateway["port"])
    try:
        assert raw.ask(marker, "ping", sign(COMMAND_TYPE, body, load_private_key(path), key_id))[0] == "ok"
    finally:
        raw.close()
    assert "fleet: ping [REDACTED] from mqtt" in gateway["agent"].output()
    out = gateway["tmp"] / "gw-test.tar.gz"
    done = _fleet(gateway, "diagnostics", "gw-test", "--out", str(out))
    assert done.returncode == 0, (done.stdout, done.stderr)
    summary = json.loads(done.stdout)
    content = out.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert summary["size"] == len(content) and summary["sha256"] == hashlib.sha256(content).hexdigest()

    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert set(files) == MEMBERS
    assert b"agent gw-test running" in files["logs.txt"]
    assert b'edge_agent_events_produced_total{device="meter-1",type="city.meter.reading"}' in files["metrics.txt"]
    # The password, logged by value (the request id below), reached the log only redacted.
    assert b"fleet: ping [REDACTED] from mqtt" in files["logs.txt"]
    config = json.loads(files["config.json"])
    assert config["uplink"]["mqtt"]["password_file"].endswith("mqtt.password")  # where, not what
    assert json.loads(files["versions.json"])["libraries"]["paho-mqtt"]
    assert json.loads(files["status.json"])["devices"]["online"] == 1
    assert {r["check"] for r in json.loads(files["doctor.json"])} >= {"config", "uplink", "devices"}
    assert json.loads(files["manifest.json"])["gateway"] == "gw-test"

    # On the gateway: a 0700 folder, the bundle 0600.
    folder = gateway["state"] / "fleet" / "diagnostics"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    kept = list(folder.iterdir())
    assert [p.name for p in kept] == [f"{summary['bundle']}.tar.gz"]
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600

    # The planted secrets: in no member, no log line, no reply, no output of the command.
    # The test's own subscriber may get the last replies a moment after the CLI did.
    def decoded_parts() -> bytes:
        raw = list(gateway["replies"].raw)
        return b"".join(base64.b64decode(json.loads(p)["data"]["data"]) for _, p, _ in raw if b'"part"' in p)

    wait_for(lambda: len(decoded_parts()) >= len(content), 10, "every part at the test's own subscriber")
    replies = b"".join(payload for _, payload, _ in gateway["replies"].raw)  # (the ping's topic holds its id)
    assert len(gateway["replies"].raw) >= 2  # the build and at least one part
    assert decoded_parts() == content
    for secret in gateway["secrets"]:
        for name, data in files.items():
            assert secret.encode() not in data, (secret, name)
        assert secret not in gateway["agent"].output()
        assert secret.encode() not in replies
        assert secret not in done.stdout + done.stderr

    # Never over an existing file.
    again = _fleet(gateway, "diagnostics", "gw-test", "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    assert out.read_bytes() == content
    refused = _fleet(gateway, "diagnostics", "gw-test", "--out", str(gateway["tmp"] / "no.tar.gz"), key="reader")
    assert refused.returncode == 1 and "scope" in refused.stderr
    assert not (gateway["tmp"] / "no.tar.gz").exists()


class FakeGateway:
    """Answers ``diagnostics`` on gw-fake's control topics: a bundle of ``content``, claiming ``sha256``.

    The first request for part 0 goes unanswered (a lost reply): the command must ask again.
    """

    def __init__(self, port: int, content: bytes, sha256: str, part_size: int = 1000) -> None:
        self.content, self.sha256, self.part_size = content, sha256, part_size
        self.asked: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fake-gateway")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("fleet/v1/gw-fake/req/+/+", qos=1)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        request_id = message.topic.split("/")[-2]
        envelope = json.loads(message.payload)
        args = json.loads(base64.b64decode(envelope["payload"]))["args"]
        with self._lock:
            self.asked.append(args)
            first_part_zero = sum(a.get("part") == 0 for a in self.asked) == 1
        if not args:
            parts = -(-len(self.content) // self.part_size)
            data: dict[str, Any] = {"bundle": "diag-fake", "size": len(self.content), "sha256": self.sha256,
                                    "parts": parts, "part_size": self.part_size}  # fmt: skip
        elif args["part"] == 0 and first_part_zero:
            return
        else:
            start = args["part"] * self.part_size
            chunk = self.content[start : start + self.part_size]
            data = {"bundle": "diag-fake", "part": args["part"], "data": base64.b64encode(chunk).decode()}
        self.client.publish(f"fleet/v1/gw-fake/res/{request_id}/ok", json.dumps({"status": "ok", "data": data}), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("honest", [True, False])
def test_the_command_retries_a_lost_part_and_saves_only_a_matching_bundle(
    tmp_path: Path, broker: Mosquitto, honest: bool
) -> None:
    content = secrets.token_bytes(3500)
    digest = hashlib.sha256(content if honest else content + b"x").hexdigest()
    fake = FakeGateway(broker.port, content, digest)
    key, _, key_id = _key(tmp_path, "ops")
    out = tmp_path / "fake.tar.gz"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "fleet", "diagnostics", "gw-fake", "--out", str(out), "--key", str(key),
             "--key-id", key_id, "--port", str(broker.port), "--timeout", "2"],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    finally:
        fake.close()
    assert [a.get("part") for a in fake.asked] == [None, 0, 0, 1, 2, 3]  # part 0 asked again, then the rest
    if honest:
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == content
    else:
        assert done.returncode == 1 and "does not match" in done.stderr, done.stderr
        assert not out.exists()
