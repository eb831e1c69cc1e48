"""``edge-agent fleet push-config`` as a process against a real Mosquitto.

The gateway's side of remote configuration is built separately, so here the other end is
:class:`ConfigPeer`: a protocol peer for this CLI test, not the agent. It speaks the topics and
documents of the shared spec (docs/fleet.md): takes each gateway's retained desired document,
verifies it with agent.fleet.envelope, and publishes the retained reported document. The test
against real agents comes once both sides are merged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.envelope import CONFIG_TYPE, Refused, TrustedKey, verify
from agent.fleet.keys import generate_key
from agent.fleet.nonces import NonceStore
from tests.conftest import ROOT, Mosquitto, wait_for
from tests.fleet.test_acl import AclBroker

SITE = """\
gateway: {id: gw-000, site: lab}
uplink:
  mqtt: {host: 127.0.0.1, port: 1883, topic_prefix: ioc/v1}
buffer: {path: ./buffer.db, max_bytes: 64MiB}
devices:
  - {id: meter-1, driver: virtual, kind: meter, interval: 1s}
"""


def _time(moment: datetime | None = None) -> str:
    """RFC 3339, UTC, milliseconds, ``Z``: the reported document's times."""
    return (moment or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hash(sections: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(sections, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ConfigPeer:
    """A protocol peer for the CLI test: answers desired documents as the spec says a gateway does.

    ``behaviour`` per gateway: ``apply`` (applying, then applied), ``reject`` (rejected, invalid),
    ``silent`` (never answers). A document of the version and hash already applied changes
    nothing and publishes nothing (the spec's idempotence).
    """

    def __init__(self, port: int, keys: dict[str, TrustedKey], behaviour: dict[str, str], **tls: Path) -> None:
        self.keys = keys
        self.behaviour = behaviour
        self.verified: dict[str, list[dict[str, Any]]] = {gw: [] for gw in behaviour}
        self.refused: list[tuple[str, str]] = []
        self.published = 0
        self._applied: dict[str, tuple[int, str]] = {}
        self._nonces = {gw: NonceStore(None) for gw in behaviour}
        name = next(iter(behaviour))
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{name}-{len(behaviour)}")
        if tls:
            self.client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["cert"]), keyfile=str(tls["key"]))
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        self.client.subscribe("fleet/v1/+/desired", qos=1)
        assert subscribed.wait(10), "the peer's subscription"

    def report(self, gateway: str, *, wait: bool = True, **doc: Any) -> None:
        """Publish ``gateway``'s retained reported document (``wait``: until the broker has it; never
        in paho's callbacks, whose thread must keep running to receive the PUBACK)."""
        body = {"gateway": gateway, "time": _time(), **doc}
        info = self.client.publish(f"fleet/v1/{gateway}/reported", json.dumps(body), qos=1, retain=True)
        self.published += 1
        if wait:
            info.wait_for_publish(5)

    def status(self, gateway: str, text: str) -> None:
        self.client.publish(f"ioc/v1/{gateway}/status", text, qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        gateway = message.topic.split("/")[2]
        if gateway not in self.behaviour or not message.payload:
            return
        try:
            doc = verify(
                bytes(message.payload),
                payload_type=CONFIG_TYPE,
                scope="config",
                keys=self.keys,
                gateway=gateway,
                groups=frozenset({"north"}),
                nonces=self._nonces[gateway],
            ).body
        except Refused as exc:
            self.refused.append((gateway, exc.code))
            if exc.code == "replayed" or self.behaviour[gateway] == "silent":
                return  # a document seen before (retained ones come again on each connection): nothing new
            self.report(
                gateway,
                wait=False,
                version=0,
                status="rejected",
                errors=[{"field": exc.field, "code": exc.code, "message": exc.message}],
                reason=exc.message,
            )
            return
        self.verified[gateway].append(doc)
        version, digest = doc["version"], _hash(doc["sections"])
        running = self._applied.get(gateway, (0, ""))
        if (version, digest) == running:
            return
        origins = {name: {"origin": "remote", "version": version} for name in doc["sections"]}
        what = self.behaviour[gateway]
        if what == "apply":
            ends = _time(datetime.now(UTC) + timedelta(seconds=doc["health_window"]))
            self.report(
                gateway,
                wait=False,
                version=version,
                status="applying",
                hash=digest,
                running={"version": version, "hash": digest},
                sections=origins,
                health_window_ends=ends,
            )
            self._applied[gateway] = (version, digest)
            self.report(
                gateway,
                wait=False,
                version=version,
                status="applied",
                hash=digest,
                running={"version": version, "hash": digest},
                sections=origins,
            )
        elif what == "reject":
            self.report(
                gateway,
                wait=False,
                version=version,
                status="rejected",
                hash=digest,
                running={"version": running[0], "hash": running[1]},
                errors=[{"field": "sections.devices[0].port", "code": "invalid", "message": "port: must be 1..65535"}],
                reason="sections.devices[0].port: must be 1..65535",
            )
        elif what == "roll_back":
            self.report(gateway, wait=False, version=version, status="applying", hash=digest, sections=origins)
            self.report(
                gateway,
                wait=False,
                version=version,
                status="rolled_back",
                hash=digest,
                running={"version": running[0], "hash": running[1]},
                reason="uplink did not connect within the health window",
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ops(tmp_path: Path) -> dict[str, Any]:
    pem, public, key_id = generate_key()
    key = tmp_path / "ops.pem"
    key.write_bytes(pem)
    key.chmod(0o600)
    (tmp_path / "site.yaml").write_text(SITE)
    return {"key": key, "key_id": key_id, "keys": {key_id: TrustedKey.from_text(key_id, public, ["config"])}}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def _push(document: Path, to: str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("push-config", str(document), "--to", to, "--port", str(port), *extra)


def _retained_desired(port: int, count: int) -> dict[str, bytes]:
    """What the broker keeps retained under fleet/v1/+/desired, read by a fresh client."""
    got: dict[str, bytes] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="peek")
    client.on_message = lambda _c, _u, m: got.__setitem__(m.topic.split("/")[2], bytes(m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("fleet/v1/+/desired", qos=1)
    try:
        wait_for(lambda: len(got) >= count, 10, f"{count} retained desired documents")
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def _rows(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in stdout.splitlines() if line.startswith("gw-")}


def test_a_site_file_pushed_to_three_gateways_is_applied_by_each(
    tmp_path: Path, broker: Mosquitto, ops: dict[str, Any]
) -> None:
    peer = ConfigPeer(broker.port, ops["keys"], {"gw-001": "apply", "gw-002": "apply", "gw-003": "apply"})
    try:
        done = _push(
            tmp_path / "site.yaml",
            "gw-001..gw-003",
            broker.port,
            "--key",
            str(ops["key"]),
            "--version",
            "42",
            "--health-window",
            "60",
            "--json",
        )
        assert done.returncode == 0, (done.stdout, done.stderr)
        result = json.loads(done.stdout)
        sections = {"devices": [{"id": "meter-1", "driver": "virtual", "kind": "meter", "interval": "1s"}]}
        assert (result["version"], result["hash"]) == (42, _hash(sections))
        assert set(result["gateways"]) == {"gw-001", "gw-002", "gw-003"}
        for answer in result["gateways"].values():
            assert (answer["status"], answer["version"], answer["reason"]) == ("applied", 42, None)
            assert 0 <= answer["seconds"] < 10
        summary = result["summary"]
        assert {k: summary[k] for k in ("applied", "rejected", "rolled_back", "no_answer")} == {
            "applied": 3,
            "rejected": 0,
            "rolled_back": 0,
            "no_answer": 0,
        }
        spread = summary["seconds_to_applied"]
        assert 0 <= spread["p50"] <= spread["p95"] <= spread["max"] < 10

        # Each gateway's own document stays retained on the broker, signed for it alone.
        retained = _retained_desired(broker.port, 3)
        assert sorted(retained) == ["gw-001", "gw-002", "gw-003"]
        for gateway, data in retained.items():
            body = verify(
                data,
                payload_type=CONFIG_TYPE,
                scope="config",
                keys=ops["keys"],
                gateway=gateway,
                groups=frozenset(),
                nonces=NonceStore(None),
            ).body
            assert (body["target"], body["version"], body["sections"], body["health_window"]) == (
                gateway,
                42,
                sections,
                60,
            )
        assert [len(peer.verified[gw]) for gw in sorted(peer.verified)] == [1, 1, 1]

        # The same version again: the gateways change nothing and say nothing new; their retained
        # report is the answer.
        before = peer.published
        done = _push(
            tmp_path / "site.yaml",
            "gw-001..gw-003",
            broker.port,
            "--key",
            str(ops["key"]),
            "--version",
            "42",
            "--wait",
            "10",
        )
        assert done.returncode == 0, (done.stdout, done.stderr)
        rows = _rows(done.stdout)
        assert sorted(rows) == ["gw-001", "gw-002", "gw-003"]
        assert all(row[1:3] == ["v42", "applied"] for row in rows.values()), done.stdout
        assert "3 gateway(s): 3 applied" in done.stdout
        wait_for(lambda: sum(map(len, peer.verified.values())) == 6, 5, "the peer to see the second push")
        assert peer.published == before
    finally:
        peer.close()


def test_a_rejection_and_a_silent_gateway_fail_the_push(tmp_path: Path, broker: Mosquitto, ops: dict[str, Any]) -> None:
    peer = ConfigPeer(
        broker.port, ops["keys"], {"gw-001": "apply", "gw-002": "reject", "gw-003": "silent", "gw-004": "roll_back"}
    )
    try:
        # gw-003 runs version 41 and is offline: a lower version applied is no answer to version 42.
        peer.report(
            "gw-003",
            version=41,
            status="applied",
            hash="sha256:" + "0" * 64,
            running={"version": 41, "hash": "sha256:" + "0" * 64},
        )
        peer.status("gw-003", "offline")
        signed = tmp_path / "north.json"
        done = _cli(
            "sign",
            str(tmp_path / "site.yaml"),
            "--key",
            str(ops["key"]),
            "--version",
            "42",
            "--target",
            "group:north",
            "--out",
            str(signed),
        )
        assert done.returncode == 0, done.stderr
        started = time.monotonic()
        done = _push(signed, "gw-001,gw-002,gw-003,gw-004", broker.port, "--wait", "3")
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert time.monotonic() - started < 20
        rows = _rows(done.stdout)
        assert rows["gw-001"][1:3] == ["v42", "applied"], done.stdout
        assert rows["gw-002"][1:3] == ["v42", "rejected"], done.stdout
        assert "sections.devices[0].port: must be 1..65535" in " ".join(rows["gw-002"])
        silent = " ".join(rows["gw-003"])
        assert rows["gw-003"][1:4] == ["v42", "no", "answer"], done.stdout
        assert "last report: version 41 applied" in silent and "status topic: offline" in silent, silent
        lines = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("gw-")]
        assert lines[-1] == "gw-003"  # the answers as they came, then those that did not answer
        assert rows["gw-004"][1:4] == ["v42", "rolled", "back"], done.stdout
        assert "uplink did not connect within the health window" in " ".join(rows["gw-004"])
        assert "4 gateway(s): 1 applied, 1 rejected, 1 rolled back, 1 no answer" in done.stdout

        # The same signed file again, as JSON: the retained reports answer gw-001 and gw-002 at once.
        done = _push(signed, "gw-001..gw-004", broker.port, "--wait", "2", "--json")
        assert done.returncode == 1, done.stderr
        result = json.loads(done.stdout)
        assert result["gateways"]["gw-002"]["errors"] == [
            {"field": "sections.devices[0].port", "code": "invalid", "message": "port: must be 1..65535"}
        ]
        assert result["gateways"]["gw-003"] == {
            "version": 42,
            "status": "no_answer",
            "reason": None,
            "errors": [],
            "seconds": None,
            "last_report": "version 41 applied",
            "availability": "offline",
        }
        summary = result["summary"]
        assert [summary[k] for k in ("applied", "rejected", "rolled_back", "no_answer", "not_published")] == [
            1,
            1,
            1,
            1,
            0,
        ]
        assert result["gateways"]["gw-004"]["reason"] == "uplink did not connect within the health window"
        assert len(peer.verified["gw-003"]) == 1  # it got the group's document; it just never answered
        assert sorted(peer.refused) == [(f"gw-00{n}", "replayed") for n in range(1, 5)]
    finally:
        peer.close()


def test_usage_errors_exit_2_before_anything_is_sent(tmp_path: Path, ops: dict[str, Any]) -> None:
    site, key = tmp_path / "site.yaml", str(ops["key"])
    signed = tmp_path / "gw-017.json"
    assert (
        _cli("sign", str(site), "--key", key, "--version", "7", "--target", "gw-017", "--out", str(signed)).returncode
        == 0
    )
    (tmp_path / "bad.yaml").write_text(SITE.replace("interval: 1s", "interval: often"))
    envelope = json.loads(signed.read_bytes())
    command = {**envelope, "payloadType": "application/vnd.edge-agent.command+json"}
    (tmp_path / "command.json").write_text(json.dumps(command))
    cases = [
        ((str(site), "--to", "gw-1"), "--key: a site file is signed for each gateway"),
        ((str(site), "--to", "gw-1..gw-x", "--key", key), "not a gateway id"),
        ((str(site), "--to", "gw-1", "--key", key, "--sections", "buffer"), "'buffer' is the local site file's own"),
        ((str(tmp_path / "bad.yaml"), "--to", "gw-1", "--key", key), f"{tmp_path / 'bad.yaml'}:6: devices[0].interval"),
        ((str(signed), "--to", "gw-017", "--version", "8"), "--version: "),
        ((str(signed), "--to", "gw-017,gw-018"), "signed for gw-017 alone"),
        ((str(tmp_path / "command.json"), "--to", "gw-017"), "is not a config envelope"),
    ]
    for args, said in cases:
        done = _cli("push-config", *args, "--port", "1")  # nothing listens there: usage comes first
        assert (done.returncode, said in done.stderr) == (2, True), (args, done.stderr)
    done = _cli("push-config", str(signed), "--to", "gw-017", "--port", "1")
    assert done.returncode == 1 and "cannot reach the broker" in done.stderr, done.stderr


def test_an_expired_document_is_not_pushed(tmp_path: Path, ops: dict[str, Any]) -> None:
    signed = tmp_path / "short.json"
    args = ("sign", str(tmp_path / "site.yaml"), "--key", str(ops["key"]), "--version", "7", "--target", "gw-017")
    assert _cli(*args, "--ttl", "1", "--out", str(signed)).returncode == 0
    time.sleep(1.1)
    done = _push(signed, "gw-017", 1)
    assert done.returncode == 2 and "expired at" in done.stderr, done.stderr


def test_through_the_shipped_acl_as_the_operator(tmp_path: Path, ops: dict[str, Any]) -> None:
    """Mutual TLS and config/mosquitto/acl: each gateway's peer gets only its own document; MQTT 5
    shows the broker refusing a publish the ACL denies (a gateway named after the operator)."""
    broker = AclBroker(tmp_path, trustme.CA())
    broker.start()
    certs = {"ca": tmp_path / "ca.pem"}
    peers = [
        ConfigPeer(
            broker.port, ops["keys"], {gw: "apply"}, **certs, cert=tmp_path / f"{gw}.crt", key=tmp_path / f"{gw}.key"
        )
        for gw in ("gw-001", "gw-002")
    ]
    try:
        tls = (
            "--ca-file",
            str(tmp_path / "ca.pem"),
            "--cert-file",
            str(tmp_path / "operator.crt"),
            "--key-file",
            str(tmp_path / "operator.key"),
        )
        done = _push(tmp_path / "site.yaml", "gw-001,gw-002", broker.port, "--key", str(ops["key"]), *tls)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert [row[2] for row in _rows(done.stdout).values()] == ["applied", "applied"]
        assert [list(p.verified) for p in peers] == [["gw-001"], ["gw-002"]]
        assert [len(p.verified[gw]) for p, gw in zip(peers, ("gw-001", "gw-002"), strict=True)] == [1, 1]

        done = _push(
            tmp_path / "site.yaml",
            "gw-001,operator",
            broker.port,
            "--key",
            str(ops["key"]),
            *tls,
            "--protocol",
            "5",
            "--wait",
            "5",
            "--json",
        )
        assert done.returncode == 1, (done.stdout, done.stderr)
        result = json.loads(done.stdout)
        assert result["gateways"]["gw-001"]["status"] == "applied"
        refused = result["gateways"]["operator"]
        assert refused["status"] == "not_published" and "Not authorized" in refused["reason"], refused
        assert result["summary"]["not_published"] == 1
    finally:
        for peer in peers:
            peer.close()
        broker.stop()


def test_a_hundred_gateways_answer_in_seconds(tmp_path: Path, broker: Mosquitto, ops: dict[str, Any]) -> None:
    gateways = [f"gw-{n:03d}" for n in range(1, 101)]
    peer = ConfigPeer(broker.port, ops["keys"], dict.fromkeys(gateways, "apply"))
    try:
        started = time.monotonic()
        done = _push(tmp_path / "site.yaml", "gw-001..gw-100", broker.port, "--key", str(ops["key"]), "--json")
        took = time.monotonic() - started
        print(f"push-config to 100 gateways (a protocol peer answering): {took:.2f} s for the whole command")
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr)
        result = json.loads(done.stdout)
        assert sorted(result["gateways"]) == gateways
        assert result["summary"]["applied"] == 100
        print("seconds to applied:", result["summary"]["seconds_to_applied"])
        assert took < 60
        payloads = _retained_desired(broker.port, 100)
        bodies = [json.loads(base64.b64decode(json.loads(payloads[gw])["payload"])) for gw in gateways]
        assert [b["target"] for b in bodies] == gateways
        assert len({b["nonce"] for b in bodies}) == 100
    finally:
        peer.close()
