"""A provisioning lab for the tests: a root CA, an issuing intermediate, Mosquitto with mutual TLS
and the shipped ACL, the responder as a process, and TLS clients under any identity.

Certificates are made with ``cryptography`` here; the broker reads config/mosquitto/acl unchanged
plus the lines a site adds for its claim identity and the test's watcher.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.provisioning.ca import BACKDATE, client_certificate, key_pem, make_ca, pem
from tests.conftest import KEEP_USER, ROOT, Mosquitto, wait_for

CLAIM_CN = "claim-lab"
SHIPPED_ACL = ROOT / "config" / "mosquitto" / "acl"
# What a site adds to the shipped file: its claim identity kept out of the gateways' patterns,
# and (tests only) a watcher that may read everything.
SITE_ACL = f"""
user {CLAIM_CN}
topic deny ioc/v1/{CLAIM_CN}/#
topic deny fleet/v1/{CLAIM_CN}/#

user watcher
topic read #
"""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Lab:
    """The CA files of one test module, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root, self.root_key = make_ca("lab root")
        self.issuing, self.issuing_key = _intermediate(self.root, self.root_key)
        self.write("ca.pem", pem(self.root))
        self.write("issuing.pem", pem(self.issuing) + pem(self.root))
        self.write("issuing.key", key_pem(self.issuing_key), 0o600)
        self._server()
        for name in (CLAIM_CN, "provisioner", "watcher"):
            self.client(name)

    def write(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def client(self, name: str, *, issuer: str = "root") -> tuple[Path, Path]:
        """``name.crt`` and ``name.key`` with CN = name (signed by the root or the issuing CA)."""
        key = ec.generate_private_key(ec.SECP256R1())
        ca, ca_key = (self.root, self.root_key) if issuer == "root" else (self.issuing, self.issuing_key)
        cert = client_certificate(ca, ca_key, key.public_key(), name, _now() - BACKDATE, _now() + dt.timedelta(days=30))
        chain = pem(cert) + (pem(self.issuing) if issuer != "root" else b"")
        return self.write(f"{name}.crt", chain), self.write(f"{name}.key", key_pem(key), 0o600)

    def _server(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - BACKDATE)
            .not_valid_after(_now() + dt.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        self.write("server.pem", pem(cert))
        self.write("server.key", key_pem(key), 0o600)


def _intermediate(root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab issuing CA")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - BACKDATE)
        .not_valid_after(_now() + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return cert, key


class TlsBroker(Mosquitto):
    """Mosquitto with mutual TLS, the CN as user name and the shipped ACL plus the site's lines."""

    def __init__(self, workdir: Path, lab: Lab) -> None:
        super().__init__(workdir)
        acl = workdir / "acl"
        acl.write_text(SHIPPED_ACL.read_text() + SITE_ACL)
        self.conf.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {lab.folder / 'ca.pem'}\n"
            f"certfile {lab.folder / 'server.pem'}\n"
            f"keyfile {lab.folder / 'server.key'}\n"
            "tls_version tlsv1.2\n"  # as the shipped mosquitto.conf
            "require_certificate true\n"
            "use_identity_as_username true\n"
            f"acl_file {acl}\n"
            "allow_anonymous false\n"
            f"log_dest file {workdir / 'mosquitto.log'}\nlog_type all\n" + KEEP_USER
        )


class TlsClient:
    """A paho client logging in with ``name.crt``; what it received."""

    def __init__(self, lab: Lab, port: int, name: str, subscribe: list[str] | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{name}-{os.getpid()}")
        self.client.tls_set(
            ca_certs=str(lab.folder / "ca.pem"),
            certfile=str(lab.folder / f"{name}.crt"),
            keyfile=str(lab.folder / f"{name}.key"),
        )
        self.topics = subscribe or []

        def on_connect(client: paho.Client, *_: Any) -> None:
            if self.topics:
                client.subscribe([(t, 1) for t in self.topics])
            else:
                self.subscribed.set()

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            with self.lock:
                self.messages.append((msg.topic, msg.payload))

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, f"{name} to connect and subscribe")

    def received(self, topic_start: str = "") -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.startswith(topic_start)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def responder_yaml(lab: Lab, folder: Path, allow: list[dict[str, Any]], **extra: Any) -> Path:
    doc = {
        "ca": {"cert_file": str(lab.folder / "issuing.pem"), "key_file": str(lab.folder / "issuing.key")},
        "state_file": str(folder / "responder-state.json"),
        "crl_file": str(folder / "crl.pem"),
        "brokers": [{"host": "127.0.0.1", "port": 8883}],
        "config_version": 7,
        "allow": allow,
        **extra,
    }
    path = folder / "responder.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def start_responder(lab: Lab, port: int, config: Path, log: Path, protocol: str = "5") -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "agent", "fleet", "provision-responder", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--ca-file", str(lab.folder / "ca.pem"),
            "--cert-file", str(lab.folder / "provisioner.crt"), "--key-file", str(lab.folder / "provisioner.key"),
            "--protocol", protocol,
        ],
        stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    wait_for(lambda: "listening on" in log.read_text() or proc.poll() is not None, 20, "the responder to subscribe")
    assert proc.poll() is None, log.read_text()
    return proc


def site_yaml(
    path: Path, lab: Lab, port: int, serial: str, *, gateway: str = "", claim: bool = True, protocol: str = "3.1.1"
) -> Path:
    """A gateway's site file under fleet.identity (the claim credential unless ``claim`` is False)."""
    claim_block = (
        f"    claim: {{cert_file: {lab.folder / (CLAIM_CN + '.crt')}, key_file: {lab.folder / (CLAIM_CN + '.key')},"
        f" serial: {serial}, answer_timeout: 5s, retry_interval: 2s}}\n"
        if claim
        else ""
    )
    path.write_text(
        f"gateway: {{{'id: ' + gateway + ', ' if gateway else ''}site: lab, health_interval: 60s}}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1, keepalive: 5s, protocol: '{protocol}',"
        f" reconnect_min: 200ms, reconnect_max: 1s, tls: {{ca_file: {lab.folder / 'ca.pem'}}}}}\n"
        f"buffer: {{path: {path.parent / 'buffer.db'}}}\n"
        "fleet:\n"
        "  identity:\n"
        f"    ca_file: {lab.folder / 'ca.pem'}\n" + claim_block + "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
    )
    return path
