"""Claim provisioning end to end: Mosquitto with mutual TLS and per-identity ACLs, the responder
as a process, real agent processes with only a claim credential.

One broker and one responder for the module; each test uses its own serials.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.identity.keystore import CsrFields, FileKeyStore
from agent.fleet.identity.verify import check_chain
from agent.fleet.provisioning.ca import client_certificate, pem
from tests.conftest import AgentProcess, free_port, last_seqs, wait_for
from tests.fleet.identity.kit import CLAIM_CN, Lab, TlsBroker, TlsClient, responder_yaml, site_yaml, start_responder

ALLOW = [
    {"serial": "SN-0001", "gateway_id": "gw-001", "groups": ["north"]},
    {"serial": "SN-0002", "gateway_id": "gw-002", "reprovision": True},
    {"serial": "SN-0005", "gateway_id": "gw-005"},
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("lab")
    the_lab = Lab(folder)
    broker = TlsBroker(folder, the_lab)
    broker.start()
    log = folder / "responder.log"
    responder = start_responder(the_lab, broker.port, responder_yaml(the_lab, folder, ALLOW), log)
    watcher = TlsClient(the_lab, broker.port, "watcher", ["#"])
    yield {"lab": the_lab, "port": broker.port, "folder": folder, "log": log, "watcher": watcher}
    watcher.close()
    responder.send_signal(signal.SIGTERM)
    responder.wait(10)
    broker.stop()


def _agent(folder: Path, config: Path) -> AgentProcess:
    return AgentProcess(config, folder / "agent.log").start()


def _events(watcher: TlsClient, gateway: str) -> list[dict[str, Any]]:
    found = []
    for _topic, payload in watcher.received(f"ioc/v1/{gateway}/meter-1/"):
        found.append(json.loads(payload))
    return found


def _buffered(buffer: Path) -> int:
    try:
        return last_seqs(buffer).get("meter-1", 0)
    except sqlite3.Error:
        return 0  # not created yet


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    yield made
    for agent in made:
        agent.kill()


def test_claim_then_events_under_the_issued_id_and_no_key_byte_anywhere(
    lab: dict[str, Any], tmp_path: Path, agents: list[AgentProcess]
) -> None:
    # MQTT 5: the request carries its answer topic and the nonce as Correlation Data, echoed back.
    config = site_yaml(tmp_path / "site.yaml", lab["lab"], lab["port"], "SN-0001", protocol="5")
    agents.append(_agent(tmp_path, config))
    watcher: TlsClient = lab["watcher"]
    wait_for(lambda: _events(watcher, "gw-001"), 20, "the first event of the provisioned gateway")
    first = _events(watcher, "gw-001")[0]
    assert first["source"].startswith("/gateways/gw-001/"), first["source"]
    assert first["seq"] == 1  # nothing before it was published elsewhere, under another id
    folder = tmp_path / "fleet" / "identity"
    identity = json.loads((folder / "identity.json").read_text())
    assert identity["gateway_id"] == "gw-001" and identity["serial"] == "SN-0001"
    assert identity["groups"] == ["north"] and identity["config_version"] == 7
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "identity.json", "key.pem"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    assert folder.stat().st_mode & 0o777 == 0o700
    # Everything went through the claim subtree only: the request and the answer, nothing else.
    claim_topics = {t for t, _ in watcher.received("prov/")}
    assert claim_topics == {f"prov/{CLAIM_CN}/SN-0001/request", f"prov/{CLAIM_CN}/SN-0001/answer"}
    # No byte of the private key: not its DER, its PEM body, the raw scalar in binary, hex or base64 at
    # any alignment (the public half is in the CSR and the certificate, as it should be).
    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    needles = [der, base64.b64encode(der), scalar, scalar.hex().encode()]
    needles += [base64.b64encode(bytes(shift) + scalar)[4:40] for shift in range(3)]
    haystacks = [p for t, p in watcher.received()] + [
        p.read_bytes() for p in [*tmp_path.rglob("*"), *lab["folder"].rglob("*")] if p.is_file() and p.name != "key.pem"
    ]
    assert haystacks and all(n not in h for n in needles for h in haystacks)
    log = lab["log"].read_text()
    assert "claim serial=SN-0001 gateway=gw-001" in log and "outcome=issued" in log
    # A reload reads the same identity: same gateway id, same client certificate, nothing to restart.
    agents[0].signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in agents[0].output(), 10, "the reload")
    assert "config reloaded from" in agents[0].output() and "no changes" in agents[0].output()


def test_a_second_claim_and_an_unknown_serial_are_refused(
    lab: dict[str, Any], tmp_path: Path, agents: list[AgentProcess]
) -> None:
    if "gateway=gw-001" not in lab["log"].read_text():  # run alone: provision SN-0001 first
        first = tmp_path / "first"
        first.mkdir()
        agents.append(_agent(first, site_yaml(first / "site.yaml", lab["lab"], lab["port"], "SN-0001")))
        wait_for(lambda: "gateway=gw-001" in lab["log"].read_text(), 20, "SN-0001 provisioned")
    again, unknown = tmp_path / "again", tmp_path / "unknown"
    for folder, serial in ((again, "SN-0001"), (unknown, "SN-9999")):
        folder.mkdir()
        agents.append(_agent(folder, site_yaml(folder / "site.yaml", lab["lab"], lab["port"], serial)))
    reasons = {again: "serial SN-0001: already provisioned as gw-001", unknown: "serial SN-9999: not on the allow-list"}
    for folder, reason in reasons.items():
        wait_for(lambda f=folder, r=reason: r in (f / "agent.log").read_text(), 20, f"the refusal: {reason}")
    log = lab["log"].read_text()
    assert "claim serial=SN-9999 gateway=- from=claim-lab outcome=refused" in log
    # Not retried within 60 s: the wait is at least 60 s, and no second request came meanwhile.
    for folder, reason in reasons.items():
        text = (folder / "agent.log").read_text().split(reason)[1]
        wait = float(text.split("claim: asking again in ")[1].split(" s")[0])
        assert wait >= 60, text
        assert not (folder / "fleet" / "identity" / "identity.json").exists()
    assert log.count("claim serial=SN-9999 gateway=- from=claim-lab outcome=refused") == 1


def test_the_claim_identity_is_confined_to_its_subtree(lab: dict[str, Any]) -> None:
    watcher: TlsClient = lab["watcher"]
    claim = TlsClient(lab["lab"], lab["port"], CLAIM_CN, ["fleet/#", "ioc/#", "#"])
    try:
        for topic in (f"ioc/v1/{CLAIM_CN}/x/reading", "ioc/v1/gw-001/meter-1/reading", "fleet/v1/gw-001/res/1/ok",
                      f"fleet/v1/{CLAIM_CN}/identity/request", "prov/other-claim/SN-1/request",
                      f"prov/{CLAIM_CN}/SN-0001/answer"):  # fmt: skip
            claim.publish(topic, b'{"denied": true}')
        claim.publish(f"prov/{CLAIM_CN}/SN-X/request", b'{"allowed": true}')
        wait_for(lambda: watcher.received(f"prov/{CLAIM_CN}/SN-X/request"), 10, "the allowed publish")
        assert not [p for _, p in watcher.received() if b"denied" in p]
        # Its subscriptions to fleet/#, ioc/# and # deliver only its own answers: the responder's
        # login publishes under fleet/ first and then in the claim's subtree, and only the latter arrives.
        provisioner = TlsClient(lab["lab"], lab["port"], "provisioner")
        try:
            provisioner.publish("fleet/v1/gw-001/identity/answer", b'{"not": "for the claim"}')
            provisioner.publish(f"prov/{CLAIM_CN}/SN-Y/answer", b'{"for": "the claim"}')
        finally:
            provisioner.close()
        wait_for(lambda: claim.received(f"prov/{CLAIM_CN}/SN-Y/answer"), 5, "its own answer")
        # The watcher, another client, may get the first publish a moment after the claim got the second.
        wait_for(lambda: watcher.received("fleet/v1/gw-001/identity/answer"), 5, "the answer under fleet/")
        assert {t.split("/")[0] for t, _ in claim.received()} == {"prov"}
    finally:
        claim.close()


def test_an_mqtt5_response_topic_elsewhere_is_ignored(lab: dict[str, Any]) -> None:
    the_lab: Lab = lab["lab"]
    answers: list[tuple[str, bytes | None]] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-claim-v5", protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set(ca_certs=str(the_lab.folder / "ca.pem"), certfile=str(the_lab.folder / f"{CLAIM_CN}.crt"),
                   keyfile=str(the_lab.folder / f"{CLAIM_CN}.key"))  # fmt: skip
    client.on_message = lambda _c, _u, m: answers.append((m.topic, getattr(m.properties, "CorrelationData", None)))
    client.connect("127.0.0.1", lab["port"])
    client.loop_start()
    try:
        client.subscribe(f"prov/{CLAIM_CN}/SN-V5/#", qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"prov/{CLAIM_CN}/SN-V5/elsewhere"
        props.CorrelationData = b"corr-1"
        body = json.dumps({"serial": "SN-V5", "nonce": "c" * 32, "csr": "x"}).encode()
        client.publish(f"prov/{CLAIM_CN}/SN-V5/request", body, qos=1, properties=props).wait_for_publish(5)
        wait_for(lambda: answers, 10, "the answer")
        assert answers == [(f"prov/{CLAIM_CN}/SN-V5/answer", b"corr-1")]
        wait_for(lambda: "is outside the requester's subtree: ignored" in lab["log"].read_text(), 5, "the log line")
    finally:
        client.disconnect()
        client.loop_stop()


def test_reprovisioning_after_expiry_keeps_the_id_and_the_buffer(
    lab: dict[str, Any], tmp_path: Path, agents: list[AgentProcess]
) -> None:
    the_lab: Lab = lab["lab"]
    folder = tmp_path / "fleet" / "identity"
    folder.mkdir(parents=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))  # fmt: skip
    (folder / "key.pem").chmod(0o600)
    now = dt.datetime.now(dt.UTC)

    def cert(not_after: dt.datetime) -> bytes:
        leaf = client_certificate(the_lab.issuing, the_lab.issuing_key, key.public_key(), "gw-002",
                                  now - dt.timedelta(days=100), not_after)  # fmt: skip
        return pem(leaf) + pem(the_lab.issuing)

    (folder / "cert.pem").write_bytes(cert(now + dt.timedelta(days=1)))
    (folder / "cert.pem").chmod(0o600)
    identity = {"gateway_id": "gw-002", "serial": "SN-0002", "not_after": "later", "brokers": [],
                "config_version": None, "groups": [], "issued_at": "earlier"}  # fmt: skip
    (folder / "identity.json").write_text(json.dumps(identity))
    (folder / "identity.json").chmod(0o600)
    # In the store room: the broker unreachable, events buffer.
    offline = site_yaml(tmp_path / "site.yaml", the_lab, free_port(), "SN-0002")
    agent = _agent(tmp_path, offline)
    agents.append(agent)
    wait_for(lambda: _buffered(tmp_path / "buffer.db") >= 5, 20, "events buffered offline")
    agent.signal(signal.SIGTERM)
    agent.wait(10)
    buffered = last_seqs(tmp_path / "buffer.db")["meter-1"]
    # Months later: the certificate has expired. The claim path gets a new one, same id, same buffer.
    (folder / "cert.pem").write_bytes(cert(now - dt.timedelta(days=1)))
    site_yaml(tmp_path / "site.yaml", the_lab, lab["port"], "SN-0002")
    agents.append(_agent(tmp_path, offline))
    watcher: TlsClient = lab["watcher"]
    wait_for(lambda: {e["seq"] for e in _events(watcher, "gw-002")} >= set(range(1, buffered + 1)), 30,
             "the buffered events, delivered under the same id")  # fmt: skip
    assert all(e["source"].startswith("/gateways/gw-002/") for e in _events(watcher, "gw-002"))
    assert json.loads((folder / "identity.json").read_text())["gateway_id"] == "gw-002"
    assert "re-provisioning" in (tmp_path / "agent.log").read_text()
    assert "claim serial=SN-0002 gateway=gw-002" in lab["log"].read_text()


def test_a_group_readable_key_refuses_to_start(lab: dict[str, Any], tmp_path: Path) -> None:
    key = lab["lab"].folder / "loose.key"
    key.write_bytes((lab["lab"].folder / f"{CLAIM_CN}.key").read_bytes())
    key.chmod(0o640)
    config = site_yaml(tmp_path / "site.yaml", lab["lab"], lab["port"], "SN-0003")
    config.write_text(config.read_text().replace(f"{CLAIM_CN}.key", "loose.key"))
    done = subprocess.run(["python", "-m", "agent", "run", "-c", str(config)], capture_output=True, text=True,
                          timeout=30, cwd=Path(__file__).resolve().parents[3])  # fmt: skip
    assert done.returncode != 0
    assert f"{key}: permissions 0640 are too open for a private key; chmod 600 {key}" in done.stderr, done.stderr


def test_renewal_over_the_gateways_own_connection(lab: dict[str, Any], tmp_path: Path) -> None:
    """Claimed first (with paho and the key store, as the claim loop does), then renewed as gw-005."""
    the_lab: Lab = lab["lab"]
    store = FileKeyStore(tmp_path / "identity")
    store.generate()
    fields = CsrFields("SN-0005", "test", "0", "0" * 32, "x")

    def ask(login: str, topic: str) -> dict[str, Any]:
        client = TlsClient(the_lab, lab["port"], login, [topic.replace("/request", "/answer")])
        try:
            nonce = secrets.token_hex(16)
            body = {"serial": "SN-0005", "nonce": nonce, "csr": store.csr("pending", fields).decode()}
            client.publish(topic, json.dumps(body).encode())
            found = wait_for(lambda: client.received(topic.replace("/request", "/answer")), 10, f"answer on {topic}")
            answer: dict[str, Any] = json.loads(found[0][1])
            assert answer["nonce"] == nonce
            return answer
        finally:
            client.close()

    claimed = ask(CLAIM_CN, f"prov/{CLAIM_CN}/SN-0005/request")
    assert claimed["status"] == "issued", claimed
    the_lab.write("gw-005.crt", claimed["certificate_chain"].encode())
    the_lab.write("gw-005.key", (tmp_path / "identity" / "key.next.pem").read_bytes(), 0o600)
    store.generate()  # the renewal's new key
    renewed = ask("gw-005", "fleet/v1/gw-005/identity/request")
    assert renewed["status"] == "issued" and renewed["gateway_id"] == "gw-005", renewed
    check_chain(renewed["certificate_chain"], [the_lab.root], store.public_key("pending"), "gw-005")
    assert "renewal serial=SN-0005 gateway=gw-005 from=gw-005 outcome=issued" in lab["log"].read_text()
    # Another gateway's renewal topic is not gw-005's to write: the broker drops it. Its own topic,
    # written next, is answered: once that decision is logged, the other would have been before it.
    client = TlsClient(the_lab, lab["port"], "gw-005")
    try:
        client.publish("fleet/v1/gw-001/identity/request", json.dumps({"serial": "SN-0001"}).encode())
        client.publish("fleet/v1/gw-005/identity/request", b"{}")
    finally:
        client.close()
    wait_for(
        lambda: "renewal serial=- gateway=- from=gw-005 outcome=refused" in lab["log"].read_text(), 10, "the refusal"
    )
    assert "from=gw-001" not in lab["log"].read_text()
