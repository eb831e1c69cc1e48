"""The shipped Mosquitto ACL (config/mosquitto/) against a real broker: mutual TLS, the client
certificate's CN as the user name, the acl file read unchanged from config/mosquitto/acl.

Each denial is followed by a publish the ACL allows, seen by the same subscriber: once that one
arrived, the denied one would have arrived before it. Every publish waits for its PUBACK, which
Mosquitto sends for a denied publish too (MQTT 3.1.1 has no way to say no).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.keys import generate_key
from tests.conftest import KEEP_USER, ROOT, AgentProcess, Mosquitto, wait_for

SHIPPED = ROOT / "config" / "mosquitto"
NAMES = ("gw-001", "gw-002", "operator", "ioc")


class AclBroker(Mosquitto):
    """Mosquitto run with the shipped mosquitto.conf and acl, on a free port and test certificates."""

    def __init__(self, workdir: Path, ca: trustme.CA) -> None:
        super().__init__(workdir)
        server = ca.issue_cert("localhost", "127.0.0.1")
        server.private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
        ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        for name in NAMES:
            issued = ca.issue_cert(name, common_name=name)
            issued.cert_chain_pems[0].write_to_path(str(workdir / f"{name}.crt"))
            issued.private_key_pem.write_to_path(str(workdir / f"{name}.key"))
            (workdir / f"{name}.key").chmod(0o600)
        local = {
            "listener": f"{self.port} 127.0.0.1",
            "cafile": workdir / "ca.pem",
            "certfile": workdir / "server.pem",
            "keyfile": workdir / "server.pem",
            "acl_file": SHIPPED / "acl",  # unchanged: a wrong shipped ACL fails these tests
        }
        # In place: a listener's settings are the lines after its "listener" line.
        lines = [_local(line, local) for line in (SHIPPED / "mosquitto.conf").read_text().splitlines()]
        assert all(f"{key} {value}" in lines for key, value in local.items()), lines
        self.conf.write_text("\n".join(lines) + "\nlog_dest none\n" + KEEP_USER)


def _local(line: str, local: dict[str, Any]) -> str:
    """A line of the shipped mosquitto.conf with this machine's value if it names a port or a path."""
    key = line.split(" ", 1)[0]
    return f"{key} {local[key]}" if key in local else line


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[AclBroker]:
    broker = AclBroker(tmp_path, trustme.CA())
    assert "require_certificate true" in broker.conf.read_text()
    assert "use_identity_as_username true" in broker.conf.read_text()
    broker.start()
    yield broker
    broker.stop()


class Client:
    """A paho client with one of the test's certificates; what it received and its SUBACK codes."""

    def __init__(self, broker: AclBroker, name: str, suffix: str = "") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: list[list[int]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        folder = broker.workdir
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{name}{suffix}")
        self.client.tls_set(
            ca_certs=str(folder / "ca.pem"), certfile=str(folder / f"{name}.crt"), keyfile=str(folder / f"{name}.key")
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", broker.port, keepalive=10)
        self.client.loop_start()
        assert self._connected.wait(10), f"{name} did not connect"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        assert not reason.is_failure, f"{self.client._client_id!r} refused: {reason}"
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        with self._lock:
            self.granted.append([int(code.value) for code in codes])

    def subscribe(self, *filters: str) -> list[int]:
        """Subscribe; the SUBACK's return codes (0-2: granted QoS, 128: failure)."""
        before = len(self.granted)
        self.client.subscribe([(f, 1) for f in filters])
        wait_for(lambda: len(self.granted) > before, 5, f"SUBACK for {filters}")
        return self.granted[before]

    def publish(self, topic: str, payload: bytes = b"{}", *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK, which a denied publish gets too."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.rc == paho.MQTT_ERR_SUCCESS and info.is_published(), topic

    def topics(self) -> list[str]:
        with self._lock:
            return [topic for topic, _ in self.messages]

    def wait_for(self, topic: str) -> None:
        wait_for(lambda: topic in self.topics(), 5, f"{topic} at {self.client._client_id!r}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(acl_broker: AclBroker) -> Iterator[dict[str, Client]]:
    made = {name: Client(acl_broker, name) for name in NAMES}
    yield made
    for client in made.values():
        client.close()


def test_a_client_without_a_certificate_is_refused(acl_broker: AclBroker) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-nobody")
    client.tls_set(ca_certs=str(acl_broker.workdir / "ca.pem"))
    answers: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    # The broker ends the TLS handshake when it finds no client certificate. paho sees that in
    # connect() itself or, when its side of the handshake finished first, on its next read.
    code = client.connect("127.0.0.1", acl_broker.port, keepalive=10)
    assert code in (paho.MQTT_ERR_CONN_LOST, paho.MQTT_ERR_SUCCESS), code
    results = [client.loop(0.1) for _ in range(10)]
    assert answers == []  # no CONNACK, accepted or refused: it never spoke MQTT
    if code == paho.MQTT_ERR_SUCCESS:
        assert any(r != paho.MQTT_ERR_SUCCESS for r in results), results  # and the connection was dropped


def test_each_identity_stays_in_its_own_topics(acl_broker: AclBroker, clients: dict[str, Client]) -> None:
    gw1, gw2, operator, ioc = (clients[name] for name in NAMES)
    assert ioc.subscribe("ioc/v1/#") == [1]
    assert operator.subscribe("fleet/v1/+/res/#", "ioc/v1/+/status", "fleet/v1/+/desired") == [1, 1, 1]
    assert gw2.subscribe("fleet/v1/gw-002/req/+/+", "fleet/v1/gw-002/desired") == [1, 1]

    # Commands: gw-001 cannot send any, to another gateway or to itself. Mosquitto 2.0.11's
    # acl_file does not check subscriptions: it grants gw-001's subscription to gw-002's
    # requests, then delivers it nothing.
    snoop = Client(acl_broker, "gw-001", "-snoop")
    try:
        assert snoop.subscribe("fleet/v1/gw-002/req/#", "fleet/v1/+/req/#", "#") == [1, 1, 1]
        gw1.publish("fleet/v1/gw-002/req/g1/ping")
        gw1.publish("fleet/v1/gw-001/req/g2/ping")
        ioc.publish("fleet/v1/gw-002/req/i1/ping")
        operator.publish("fleet/v1/gw-002/req/o1/ping")
        gw2.wait_for("fleet/v1/gw-002/req/o1/ping")
        assert gw2.topics() == ["fleet/v1/gw-002/req/o1/ping"]

        # Replies: gw-001 cannot answer for gw-002; gw-002 can.
        gw1.publish("fleet/v1/gw-002/res/o1/ok")
        gw2.publish("fleet/v1/gw-002/res/o1/ok", b'{"status": "ok"}')
        operator.wait_for("fleet/v1/gw-002/res/o1/ok")
        assert [m for m in operator.messages if m[0].startswith("fleet/v1/")] == [
            ("fleet/v1/gw-002/res/o1/ok", b'{"status": "ok"}')
        ]

        # Desired documents: only the operator writes them, never a gateway, for itself or another.
        gw1.publish("fleet/v1/gw-001/desired", retain=True)
        gw1.publish("fleet/v1/gw-002/desired", retain=True)
        operator.publish("fleet/v1/gw-002/desired", b'{"version": 1}', retain=True)
        gw2.wait_for("fleet/v1/gw-002/desired")
        assert [t for t in operator.topics() if t.endswith("/desired")] == ["fleet/v1/gw-002/desired"]

        # Events: gw-001 only under its own prefix; the operator and the ingest never under ioc/v1,
        # not even as a gateway named after them.
        gw1.publish("ioc/v1/gw-002/meter-1/reading")
        gw1.publish("ioc/v1/gw-002/status", b"offline", retain=True)
        operator.publish("ioc/v1/gw-001/meter-1/reading")
        operator.publish("ioc/v1/operator/meter-1/reading")
        operator.publish("fleet/v1/operator/res/x/ok")
        ioc.publish("ioc/v1/gw-001/meter-1/reading")
        ioc.publish("ioc/v1/ioc/meter-1/reading")
        gw1.publish("ioc/v1/gw-001/meter-1/reading", b'{"seq": 1}')
        gw1.publish("ioc/v1/gw-001/status", b"online", retain=True)
        ioc.wait_for("ioc/v1/gw-001/status")
        assert ioc.messages == [("ioc/v1/gw-001/meter-1/reading", b'{"seq": 1}'), ("ioc/v1/gw-001/status", b"online")]
        operator.wait_for("ioc/v1/gw-001/status")
        assert [m for m in operator.messages if m[0].startswith("ioc/")] == [("ioc/v1/gw-001/status", b"online")]
        assert "fleet/v1/operator/res/x/ok" not in operator.topics()

        # gw-001's wide subscriptions saw only what it may read: nothing was sent to it.
        assert snoop.topics() == []
        assert gw1.topics() == []
    finally:
        snoop.close()


def _site(broker: AclBroker, fleet_yaml: str) -> Path:
    folder = broker.workdir
    site = folder / "site.yaml"
    site.write_text(
        "gateway: {id: gw-001, site: lab, health_interval: 60s}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1, keepalive: 5s,"
        " reconnect_min: 200ms, reconnect_max: 1s,\n"
        f"         tls: {{ca_file: {folder / 'ca.pem'}, cert_file: {folder / 'gw-001.crt'},"
        f" key_file: {folder / 'gw-001.key'}}}}}\n"
        f"buffer: {{path: {folder / 'buffer.db'}, max_bytes: 64MiB}}\n"
        f"{fleet_yaml}"
        "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
    )
    return site


def test_the_agent_and_the_operator_cli_work_through_the_acl(
    acl_broker: AclBroker, clients: dict[str, Client], agent_factory
) -> None:
    folder = acl_broker.workdir
    pem, public, key_id = generate_key()
    key = folder / "ops.pem"
    key.write_bytes(pem)
    key.chmod(0o600)
    # A container's clock is right but not NTP-disciplined as the kernel sees it (test_channel.py).
    fleet_yaml = (
        "fleet:\n  enabled: true\n  clock: trusted\n"
        f"  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read]}}]\n"
    )
    ioc = clients["ioc"]
    ioc.subscribe("ioc/v1/#")
    agent: AgentProcess = agent_factory(_site(acl_broker, fleet_yaml))
    wait_for(lambda: "uplink connected" in agent.output(), 15, "the agent to connect")
    wait_for(lambda: sum(t.startswith("ioc/v1/gw-001/meter-1/") for t in ioc.topics()) >= 3, 15, "gw-001's events")

    def cli(identity: str, timeout: str = "10") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", "fleet", "cmd", "gw-001", "ping", "--key", str(key), "--key-id", key_id,
             "--port", str(acl_broker.port), "--ca-file", str(folder / "ca.pem"),
             "--cert-file", str(folder / f"{identity}.crt"), "--key-file", str(folder / f"{identity}.key"),
             "--json", "--timeout", timeout],
            capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
        )  # fmt: skip

    done = cli("operator")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert json.loads(done.stdout)["data"]["gateway"] == "gw-001"
    # gw-002's certificate holding a valid operator key still cannot command gw-001: the broker
    # drops the request and delivers gw-002 no reply and no status.
    done = cli("gw-002", timeout="2")
    assert done.returncode == 1 and "no answer from gw-001" in done.stderr, (done.stdout, done.stderr)
    assert "its status topic says" not in done.stderr

    assert all(t.startswith("ioc/v1/gw-001/") for t in ioc.topics()), set(ioc.topics())
    assert b"online" in [p for t, p in ioc.messages if t == "ioc/v1/gw-001/status"]
    output = agent.output()
    assert "refused" not in output and "Traceback" not in output, output[-2000:]
