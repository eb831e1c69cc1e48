"""The retained ``city.gateway.inventory`` event: a real agent process behind the shipped ACL
(mutual TLS, the gateway's own client certificate), a SIGHUP that changes the config, a broker
restart that loses every retained message; and, in this process, a real agent whose inventory
checks run fast enough to watch its heartbeat and file cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trustme
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__
from agent.config.model import load_config
from agent.contract.schemas import EVENT_MODELS, GatewayInventory
from agent.fleet.inventory import Inventory, certificate_facts
from agent.fleet.keys import generate_key
from agent.observability.clock import kernel_clock_sync
from agent.runtime.agent import Agent
from tests.conftest import AgentProcess, free_port, wait_for
from tests.fleet.test_acl import AclBroker

TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


def _model(folder: Path, size: int = 3 * 1024 * 1024) -> tuple[Path, str]:
    """A model file and its manifest (the agent never runs it: the camera is disabled)."""
    model = folder / "detector.onnx"
    model.write_bytes(bytes(range(256)) * (size // 256))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    manifest = folder / "detector.yaml"
    manifest.write_text(f"name: test-detector\nversion: '2026.11'\nfile: detector.onnx\nsha256: '{digest}'\n")
    return manifest, digest


def _site(folder: Path, port: int, *, tls: str = "", interval: str = "50ms", fleet_extra: str = "") -> Path:
    _, public, key_id = generate_key()
    manifest, _ = _model(folder)
    site = folder / "site.yaml"
    site.write_text(
        "gateway: {id: gw-001, site: lab, health_interval: 60s}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {port}, keepalive: 5s, reconnect_min: 200ms, reconnect_max: 1s{tls}}}\n"
        f"buffer: {{path: {folder / 'buffer.db'}, max_bytes: 64MiB}}\n"
        f"fleet:\n  enabled: true\n  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read]}}]\n{fleet_extra}"
        "devices:\n"
        f"  - {{id: meter-1, driver: virtual, kind: meter, interval: {interval}}}\n"
        f"  - {{id: meter-2, driver: modbus, host: 127.0.0.1, port: {free_port()}, profile: eastron-sdm630,"
        " startup_error_behavior: ignore}\n"
        f"  - {{id: cam-1, driver: camera, enabled: false, source: /dev/null, model: {manifest},"
        " parking_bays: [{id: p1, polygon: [[0, 0], [10, 0], [10, 10]]}]}\n"
    )
    return site


def _hash_of(site: Path) -> str:
    """The spec's config hash, computed here from the site file as the agent loads it."""
    dump = load_config(site).model_dump(mode="json")
    sections = {name: dump[name] for name in ("devices", "priorities", "observability", "uplink", "fleet")}
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class Watch:
    """A TLS client (the ingest's certificate) noting when each message on gw-001's topics arrives."""

    def __init__(self, broker: AclBroker, name: str = "ioc") -> None:
        self.seen: list[tuple[float, str, bytes, bool]] = []
        self._lock = threading.Lock()
        folder = broker.workdir
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"watch-{time.time()}")
        self.client.tls_set(
            ca_certs=str(folder / "ca.pem"), certfile=str(folder / f"{name}.crt"), keyfile=str(folder / f"{name}.key")
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("ioc/v1/gw-001/status", 1), ("ioc/v1/gw-001/inventory", 1)]
        )
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._lock:
            self.seen.append((time.monotonic(), message.topic, bytes(message.payload), bool(message.retain)))

    def after(self, since: float, topic: str, payload: bytes | None = None) -> list[tuple[float, bytes]]:
        with self._lock:
            return [(t, p) for t, tp, p, _ in self.seen if t >= since and tp == topic and payload in (None, p)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[AclBroker, datetime]]:
    """The shipped broker configuration; gw-001's certificate expires in 90 days."""
    ca = trustme.CA()
    broker = AclBroker(tmp_path, ca)
    not_after = (datetime.now(UTC) + timedelta(days=90)).replace(microsecond=0)
    leaf = ca.issue_cert("gw-001", common_name="gw-001", not_after=not_after)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "gw-001.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "gw-001.key"))
    (tmp_path / "gw-001.key").chmod(0o600)
    broker.start()
    yield broker, not_after
    broker.stop()


def _inventory(payload: bytes) -> dict[str, Any]:
    """The event, checked against the envelope and the data schema docs/events.md shows."""
    event = json.loads(payload)
    assert {k: event[k] for k in ("specversion", "type", "source", "datacontenttype", "gateway", "device")} == {
        "specversion": "1.0",
        "type": "city.gateway.inventory",
        "source": "/gateways/gw-001/devices/gateway",
        "datacontenttype": "application/json",
        "gateway": "gw-001",
        "device": "gateway",
    }
    assert "seq" not in event  # a retained state document, not a buffered event
    assert len(event["id"]) == 32 and datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    GatewayInventory.model_validate(event["data"])
    assert EVENT_MODELS["city.gateway.inventory"] is GatewayInventory
    return event


def test_the_inventory_is_retained_on_connect_on_change_and_after_a_broker_restart(
    tls_broker: tuple[AclBroker, datetime], agent_factory: Any
) -> None:
    broker, not_after = tls_broker
    folder = broker.workdir
    files = f"ca_file: {folder / 'ca.pem'}, cert_file: {folder / 'gw-001.crt'}, key_file: {folder / 'gw-001.key'}"
    tls = f", tls: {{{files}}}"
    site = _site(folder, broker.port, tls=tls)
    watch = Watch(broker)
    try:
        started = time.monotonic()
        agent: AgentProcess = agent_factory(site)
        online = wait_for(lambda: watch.after(started, "ioc/v1/gw-001/status", b"online"), 20, "gw-001 online")[0][0]
        arrived, payload = wait_for(lambda: watch.after(started, "ioc/v1/gw-001/inventory"), 10, "the inventory")[0]
        assert arrived - online < 5.0, arrived - online
        event = _inventory(payload)
        data = event["data"]
        assert data["agent_version"] == __version__
        assert data["config"] == {"version": 0, "hash": _hash_of(site), "origin": "local"}
        kernel = kernel_clock_sync()
        assert data["clock"] == {
            "synced": kernel[0] if kernel else None,
            "source": "kernel" if kernel else "unavailable",
        }
        assert isinstance(data["buffer"]["rows"], int) and data["buffer"]["rows"] >= 0
        assert 0 <= data["uptime_s"] < 30
        cert = data["certificate"]
        assert "CN=gw-001" in cert["subject"].split(",")
        assert cert["not_after"] == not_after.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        assert cert["days_left"] in (89, 90)
        manifest = folder / "detector.yaml"
        digest = hashlib.sha256((folder / "detector.onnx").read_bytes()).hexdigest()
        assert data["models"] == [
            {"manifest": str(manifest), "name": "test-detector", "path": str(folder / "detector.onnx"),
             "sha256": digest, "version": "2026.11", "verified": True, "devices": ["cam-1"]}
        ]  # fmt: skip
        [profile] = data["profiles"]
        assert profile["name"] == "eastron-sdm630" and profile["devices"] == ["meter-2"]
        assert profile["sha256"] == hashlib.sha256(Path(profile["path"]).read_bytes()).hexdigest()

        # A reload that changes a device changes the config hash: a new inventory, retained.
        first_hash = data["config"]["hash"]
        site.write_text(site.read_text().replace("interval: 50ms", "interval: 70ms"))
        assert _hash_of(site) != first_hash
        reloaded = time.monotonic()
        agent.signal(signal.SIGHUP)
        changed = wait_for(
            lambda: [p for _, p in watch.after(reloaded, "ioc/v1/gw-001/inventory")
                     if json.loads(p)["data"]["config"]["hash"] != first_hash],
            15, "the inventory after the reload",
        )  # fmt: skip
        assert json.loads(changed[0])["data"]["config"]["hash"] == _hash_of(site)
        assert time.monotonic() - reloaded < 12  # checked every 10 s at most; a reload checks at once

        # A broker restart loses every retained message (the shipped configuration keeps none):
        # the gateway's next connection publishes the inventory again.
        broker.stop()
        restarted = time.monotonic()
        broker.start()
        online = wait_for(lambda: watch.after(restarted, "ioc/v1/gw-001/status", b"online"), 20, "online again")[0][0]
        arrived, payload = wait_for(lambda: watch.after(restarted, "ioc/v1/gw-001/inventory"), 10, "inventory again")[0]
        assert arrived - online < 5.0
        assert _inventory(payload)["data"]["config"]["hash"] == _hash_of(site)
        fresh = Watch(broker)  # a client that connects now finds it retained
        try:
            wait_for(lambda: fresh.after(0, "ioc/v1/gw-001/inventory"), 10, "the retained inventory")
            assert all(retained for _, topic, _, retained in fresh.seen if topic.endswith("/inventory"))
        finally:
            fresh.close()
        assert "Traceback" not in agent.output()
    finally:
        watch.close()


def test_heartbeat_buffer_figures_and_the_file_cache_in_a_running_agent(tmp_path: Path) -> None:
    """No broker: events pile up in the buffer. Checks every 0.1 s, a heartbeat every 0.6 s."""
    site = _site(tmp_path, free_port(), fleet_extra="  clock: trusted\n")

    async def scenario() -> tuple[list[tuple[float, dict[str, Any]]], Inventory, float]:
        agent = Agent(load_config(site), config_path=site)
        assert agent.inventory is not None  # the fleet channel is on
        inventory = agent.inventory = Inventory(
            agent.status, agent.inbound.reports, tmp_path, check_every=0.1, heartbeat=0.6
        )
        task = asyncio.create_task(agent.run())
        puts: list[tuple[float, dict[str, Any]]] = []
        last = b""
        model = tmp_path / "detector.onnx"
        changed_at = 0.0
        # The clock starts at the first put, not at the call: a loaded machine spends a second or
        # more starting the agent, and the heartbeats the test counts come after that.
        start: float | None = None
        deadline = time.monotonic() + 20
        while (start is None or time.monotonic() - start < 3.0) and time.monotonic() < deadline:
            body = agent.inbound.reports.current().get("inventory", b"")
            if body and body != last:
                puts.append((time.monotonic(), json.loads(body)))
                last = body
                start = puts[0][0]
            if start is not None and not changed_at and time.monotonic() - start > 2.0:
                with model.open("ab") as f:  # a replaced model: a change, put at the next check
                    f.write(b"tampered")
                changed_at = time.monotonic()
            await asyncio.sleep(0.02)
        agent.request_stop()
        await asyncio.wait_for(task, 10)
        return puts, inventory, changed_at

    puts, inventory, changed_at = asyncio.run(scenario())
    before = [(t, e) for t, e in puts if t < changed_at]
    # Uptime and buffer figures changed at every 0.1 s check; only the heartbeat put them out.
    assert len(before) >= 3, [e["data"]["uptime_s"] for _, e in puts]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(before)]
    assert all(gap > 0.5 for gap in gaps), gaps
    uptimes = [e["data"]["uptime_s"] for _, e in before]
    assert uptimes == sorted(uptimes) and uptimes[-1] > uptimes[0]
    buffer = before[-1][1]["data"]["buffer"]
    assert buffer["rows"] > 0 and buffer["oldest_age_s"] > 0  # nothing delivered: no broker
    assert before[-1][1]["data"]["clock"] == {"synced": True, "source": "trusted"}
    for _, event in puts:
        GatewayInventory.model_validate(event["data"])

    # The replaced model went out at the next check, not at the next heartbeat.
    after = [(t, e) for t, e in puts if t >= changed_at]
    assert after and after[0][0] - changed_at < 0.5
    [model] = after[0][1]["data"]["models"]
    assert model["verified"] is False
    assert model["sha256"] == hashlib.sha256((tmp_path / "detector.onnx").read_bytes()).hexdigest()
    # About 28 checks in 3 s, yet the 3 MB model was hashed twice (before and after the change),
    # and the profile and manifest each read a few times at most.
    assert inventory.files.files.reads <= 8, inventory.files.files.reads


def test_certificate_facts_of_expired_unreadable_and_der_files(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    expired = trustme.CA().issue_cert("old", common_name="old", not_after=now - timedelta(days=3, hours=1))
    pem = tmp_path / "old.crt"
    expired.cert_chain_pems[0].write_to_path(str(pem))
    facts = certificate_facts(pem, now)
    assert facts["subject"].startswith("CN=old,") and facts["days_left"] == -4  # floor: it expired 3 days 1 hour ago
    der = tmp_path / "old.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(pem.read_text()))
    assert certificate_facts(der, now)["not_after"] == facts["not_after"]
    assert (
        x509.load_pem_x509_certificate(pem.read_bytes()).not_valid_after_utc.strftime("%Y-%m-%d")
        == (facts["not_after"][:10])
    )
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert certificate_facts(garbage, now)["error"]
    missing = certificate_facts(tmp_path / "missing.crt", now)
    assert missing["subject"] is None and "No such file" in missing["error"]
