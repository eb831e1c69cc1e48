"""Certificate renewal end to end: a real Mosquitto (TLS, require_certificate, the certificate's CN
as the user name, per-identity ACL, a CRL), a real agent process at 500 events/s, and a responder
the test plays with paho and a CA made with ``cryptography``.

The responder first answers with a certificate from a CA the agent trusts but the broker does
not: the broker refuses it, the agent goes on with its old certificate and reports the failure.
The retry gets a good certificate: the uplink drains, reconnects with it, and the files are
promoted. Nothing is lost, the process is the same, and a broker that now revokes the old
certificate still takes the agent: the connection is the new certificate's.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.fleet.keys import generate_key
from tests.conftest import KEEP_USER, AgentProcess, Mosquitto, Subscriber, free_port, last_seqs, wait_for, write_config
from tests.contract.cloudevents_checks import check_event
from tests.fleet.renewal_kit import DAY, KitCA, cert_pem

DEVICES = "  - {id: meter-1, driver: virtual, kind: meter, interval: 10ms, burst: 6}\n"  # offered 600 events/s
ACL = "pattern readwrite ioc/v1/%u/#\npattern readwrite fleet/v1/%u/#\n"


class TlsBroker(Mosquitto):
    """A plain loopback listener for the test's own clients, and the gateways' TLS listener:
    client certificates required, CN as the user name, the ACL per identity, a CRL."""

    def __init__(self, workdir: Path, ca: KitCA) -> None:
        super().__init__(workdir)
        self.ca = ca
        self.tls_port = free_port()
        (workdir / "ca.pem").write_bytes(ca.pem)
        server = ca.server(workdir)
        (workdir / "acl").write_text(ACL)
        self.crl = workdir / "crl.pem"
        self.revoke()
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            "per_listener_settings true\n"
            f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {workdir / 'ca.pem'}\ncertfile {server}\nkeyfile {server}\n"
            f"require_certificate true\nuse_identity_as_username true\ncrlfile {self.crl}\n"
            f"acl_file {workdir / 'acl'}\nallow_anonymous false\n" + KEEP_USER
        )

    def revoke(self, *serials: int) -> None:
        """Write the CRL with these certificate serial numbers revoked (read when the broker starts)."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.cert.subject)
            .last_update(now - timedelta(minutes=1))
            .next_update(now + DAY)
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - timedelta(minutes=1))
                .build()
            )
        self.crl.write_bytes(builder.sign(self.ca.key, hashes.SHA256()).public_bytes(encoding=_pem()))


def _pem() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


class Responder:
    """Answers renewal requests as the operator's responder would, from whichever CA ``sign_with`` says."""

    def __init__(self, port: int, ca: KitCA) -> None:
        self.sign_with = ca
        self.requests: list[dict[str, Any]] = []
        self.issued: list[x509.Certificate] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-responder")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("fleet/v1/+/identity/request", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        request = json.loads(message.payload)
        gateway = message.topic.split("/")[2]
        leaf = self.sign_with.from_csr(request["csr"].encode(), gateway, datetime.now(UTC) - timedelta(minutes=1))
        with self._lock:
            self.requests.append(request)
            self.issued.append(leaf)
        answer = {"status": "issued", "nonce": request["nonce"], "gateway_id": gateway,
                  "certificate_chain": cert_pem(leaf).decode(), "brokers": [], "config_version": None,
                  "groups": [], "not_after": leaf.not_valid_after_utc.isoformat()}  # fmt: skip
        self.client.publish(f"fleet/v1/{gateway}/identity/answer", json.dumps(answer), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("renewal")
    ca, stranger = KitCA("fleet root"), KitCA("a root the broker does not know")
    broker = TlsBroker(folder, ca)
    broker.start()
    # The agent trusts both roots for answers; the broker only the first.
    (folder / "answers-ca.pem").write_bytes(ca.pem + stranger.pem)
    yield {"folder": folder, "ca": ca, "stranger": stranger, "broker": broker}
    broker.stop()


def _agent_config(folder: Path, broker: TlsBroker, metrics: int) -> Path:
    _, public, key_id = generate_key()
    fleet = (
        "fleet:\n  enabled: true\n  clock: trusted\n"
        f"  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read]}}]\n"
        f"  identity:\n    ca_file: {folder / 'answers-ca.pem'}\n"
        "    renew: {retry_hours: 0.0005, answer_timeout: 5s, swap_timeout: 15s}\n"
        f"observability: {{listen: '127.0.0.1:{metrics}'}}\n"
    )
    config = write_config(folder / "site.yaml", port=broker.tls_port, devices=DEVICES, extra=fleet)
    text = config.read_text().replace(
        "reconnect_max: 1s}", f"reconnect_max: 1s, tls: {{ca_file: {folder / 'ca.pem'}}}}}"
    )
    config.write_text(text)
    return config


def _metric(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_hot_swap_at_500_events_per_second_loses_nothing_and_a_refused_certificate_is_rolled_back(
    world: dict[str, Any],
) -> None:
    folder, ca, broker = world["folder"], world["ca"], world["broker"]
    identity = folder / "fleet" / "identity"
    # Day 85 of 90: renewal is overdue and the certificate expires within the week.
    old_cert, old_key = ca.client(identity, "gw-test", days=90, start=datetime.now(UTC) - 85 * DAY)
    (identity / "identity.json").write_text(json.dumps({"gateway_id": "gw-test", "serial": "SN-0042",
                                                       "not_after": "x", "brokers": []}))  # fmt: skip
    old_serial = x509.load_pem_x509_certificate(old_cert.read_bytes()).serial_number
    (folder / "old.pem").write_bytes(old_cert.read_bytes() + old_key.read_bytes())
    metrics = free_port()
    sub = Subscriber(broker.port, "ioc/v1/#")
    responder = Responder(broker.port, world["stranger"])  # first: a certificate the broker refuses
    agent = AgentProcess(_agent_config(folder, broker, metrics), folder / "agent.log").start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        wait_for(lambda: "new certificate refused" in agent.output(), 30, "the refusal of the stranger's certificate")
        assert agent.proc.poll() is None
        log = agent.output()
        assert "the broker refused the new client certificate" in log
        failures = _metric(metrics, "edge_agent_cert_renewal_failures_total")
        assert failures == {(("reason", "new certificate refused"),): 1.0}, failures
        assert (
            identity.joinpath("cert.pem").read_bytes()
            == (folder / "old.pem").read_bytes()[: len(old_cert.read_bytes())]
        )
        assert not identity.joinpath("cert.next.pem").exists()
        seqs_then = len(sub.seqs("meter-1"))
        wait_for(
            lambda: len(sub.seqs("meter-1")) > seqs_then + 250, 15, "events with the old certificate after the refusal"
        )

        responder.sign_with = ca  # the retry (a few seconds later here, 24 h ± 20 % by default) succeeds
        wait_for(lambda: "client certificate renewed" in agent.output(), 30, "the renewal")
        new_serial = responder.issued[-1].serial_number
        current = x509.load_pem_x509_certificate(identity.joinpath("cert.pem").read_bytes())
        assert current.serial_number == new_serial != old_serial
        assert len({r["nonce"] for r in responder.requests}) == len(responder.requests) >= 2
        assert len({r["csr"] for r in responder.requests}) == len(responder.requests)  # a new key each time
        assert not identity.joinpath("key.next.pem").exists()
        assert identity.joinpath("key.pem").stat().st_mode & 0o777 == 0o600
        recorded = json.loads(identity.joinpath("identity.json").read_text())["not_after"]
        assert recorded == current.not_valid_after_utc.isoformat().replace("+00:00", "Z")

        expiry = _metric(metrics, "edge_agent_client_cert_expiry_seconds")[()]
        assert 89 * 86400 < expiry <= 90 * 86400
        expiring = [e for e in sub.snapshot() if e["type"] == "city.gateway.cert.expiring"]
        assert len(expiring) == 1 and expiring[0]["data"]["days_left"] == 4, expiring
        check_event(json.dumps(expiring[0]).encode())
        wait_for(lambda: _inventory_renewals(sub) == 1, 15, "the inventory naming the renewal")

        # The broker now revokes the old certificate: the agent is let in all the same.
        broker.stop()
        broker.revoke(old_serial)
        broker.start()
        assert not _connects(broker, folder / "old.pem", folder / "old.pem")  # the CRL is in force
        assert _connects(broker, identity / "cert.pem", identity / "key.pem")
        seqs_then = len(sub.seqs("meter-1"))
        wait_for(lambda: len(sub.seqs("meter-1")) > seqs_then + 250, 20, "events after the broker revoked the old cert")
        assert agent.proc.poll() is None and agent.proc.pid == pid
        assert agent.output().count(" running: ") == 1  # one process, never restarted

        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        last = last_seqs(folder / "buffer.db")["meter-1"]
        sub.wait_for_all({"meter-1": last}, 20)
        report = sub.report("meter-1")
        assert report["lost"] == [] and report["max"] == last
        meter = [e for e in sub.snapshot() if e["device"] == "meter-1"]
        span = datetime.fromisoformat(meter[-1]["time"]) - datetime.fromisoformat(meter[0]["time"])
        rate = len({e["seq"] for e in meter}) / span.total_seconds()
        print(f"hot swap at {rate:.0f} events/s")
        assert rate > 300  # a floor for a loaded machine; see the print for the figure
        ids: dict[int, str] = {}
        for event in sub.snapshot():
            if event["device"] == "meter-1":
                assert ids.setdefault(event["seq"], event["id"]) == event["id"]  # a duplicate is the same event
    finally:
        agent.kill()
        responder.close()
        sub.close()


def _connects(broker: TlsBroker, cert: Path, key: Path) -> bool:
    """Whether the broker accepts a connection with this certificate (a CONNACK, not a TLS alert)."""
    outcome: list[bool] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{cert.name}")
    client.tls_set(ca_certs=str(broker.workdir / "ca.pem"), certfile=str(cert), keyfile=str(key))
    client.on_connect = lambda *a: (outcome.append(not a[3].is_failure), done.set())
    client.on_disconnect = lambda *a: (outcome.append(False), done.set())
    try:
        client.connect("127.0.0.1", broker.tls_port)
    except OSError:
        return False
    client.loop_start()
    try:
        done.wait(10)
        return outcome[:1] == [True]
    finally:
        client.disconnect()
        client.loop_stop()


def _inventory_renewals(sub: Subscriber) -> int | None:
    with sub.lock:
        docs = [json.loads(p) for t, p, _ in sub.raw if t == "ioc/v1/gw-test/inventory"]
    if not docs:
        return None
    renewal = (docs[-1]["data"].get("certificate") or {}).get("renewal") or {}
    value = renewal.get("renewals")
    return value if isinstance(value, int) else None
