"""Renewal through the real provisioning responder (a process), on the shipped ACL: a gateway
claims its identity, and later (its certificate aged here by hand) renews it over its own
connection, without a restart, the fleet channel off (renewal needs only fleet.identity)."""

from __future__ import annotations

import datetime as dt
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.fleet.provisioning.ca import client_certificate, key_pem, pem
from tests.conftest import AgentProcess, last_seqs, wait_for
from tests.fleet.identity.kit import Lab, TlsBroker, TlsClient, responder_yaml, site_yaml, start_responder

SERIAL, GATEWAY = "SN-R001", "gw-r01"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("renewal-lab")
    the_lab = Lab(folder)
    broker = TlsBroker(folder, the_lab)
    broker.start()
    log = folder / "responder.log"
    allow = [{"serial": SERIAL, "gateway_id": GATEWAY}]
    responder = start_responder(the_lab, broker.port, responder_yaml(the_lab, folder, allow), log)
    watcher = TlsClient(the_lab, broker.port, "watcher", ["#"])
    yield {"lab": the_lab, "port": broker.port, "log": log, "watcher": watcher}
    watcher.close()
    responder.send_signal(signal.SIGTERM)
    responder.wait(10)
    broker.stop()


def _seqs(watcher: TlsClient) -> list[int]:
    return [json.loads(p)["seq"] for _t, p in watcher.received(f"ioc/v1/{GATEWAY}/meter-1/")]


def _age(the_lab: Lab, folder: Path) -> int:
    """Replace the issued pair by one on day 61 of 90 (issued by the same CA): renewal is due."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=61)
    cert = client_certificate(the_lab.issuing, the_lab.issuing_key, key.public_key(), GATEWAY, start,
                              start + dt.timedelta(days=90))  # fmt: skip
    (folder / "cert.pem").write_bytes(pem(cert) + pem(the_lab.issuing))
    (folder / "key.pem").write_bytes(key_pem(key))
    return cert.serial_number


def test_a_claimed_gateway_renews_through_the_responder_without_a_restart(lab: dict[str, Any], tmp_path: Path) -> None:
    config = site_yaml(tmp_path / "site.yaml", lab["lab"], lab["port"], SERIAL)
    watcher: TlsClient = lab["watcher"]
    agent = AgentProcess(config, tmp_path / "claim.log").start()
    try:
        wait_for(lambda: _seqs(watcher), 20, "events of the claimed gateway")
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
    finally:
        agent.kill()
    identity = tmp_path / "fleet" / "identity"
    aged = _age(lab["lab"], identity)

    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        wait_for(lambda: "client certificate renewed" in agent.output(), 30, "the renewal")
        chain = x509.load_pem_x509_certificates((identity / "cert.pem").read_bytes())
        assert chain[0].serial_number != aged and chain[0].issuer == lab["lab"].issuing.subject
        assert chain[0].not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=89)
        assert sorted(p.name for p in identity.iterdir()) == ["cert.pem", "identity.json", "key.pem"]
        exchanged = watcher.received(f"fleet/v1/{GATEWAY}/identity/")
        assert [t for t, _ in exchanged] == [
            f"fleet/v1/{GATEWAY}/identity/request",
            f"fleet/v1/{GATEWAY}/identity/answer",
        ]
        request, answer = (json.loads(p) for _, p in exchanged)
        assert request["serial"] == SERIAL and request["gateway_id"] == GATEWAY and answer["nonce"] == request["nonce"]
        issued = x509.load_pem_x509_certificates(answer["certificate_chain"].encode())[0]
        assert answer["status"] == "issued" and issued.serial_number == chain[0].serial_number
        # The responder's own record of it (its state file: serial -> issued certificates, claim then renewal).
        state = (lab["log"].parent / "responder-state.json").read_text()
        assert format(issued.serial_number, "x") in state and "renewal" in state
        before = len(_seqs(watcher))
        wait_for(lambda: len(_seqs(watcher)) > before + 5, 10, "events after the swap")
        assert agent.proc.poll() is None and agent.proc.pid == pid
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
    finally:
        agent.kill()
    last = last_seqs(tmp_path / "buffer.db")["meter-1"]
    wait_for(lambda: set(range(1, last + 1)) <= set(_seqs(watcher)), 10, "every seq of both runs")
