"""The gateway's claim loop against a forger that answers every request with a tampered certificate:
each answer is refused naming why, counted, and nothing is kept. A real Mosquitto with the ACL; the
forger logs in as the responder."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.identity.claim import Claimer, ClaimSettings
from agent.fleet.identity.files import IdentityFiles
from agent.fleet.identity.keystore import FileKeyStore
from agent.fleet.provisioning.ca import client_certificate, make_ca, pem
from tests.conftest import wait_for
from tests.fleet.identity.kit import CLAIM_CN, Lab, TlsBroker


def test_tampered_answers_are_refused_naming_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lab = Lab(tmp_path)
    broker = TlsBroker(tmp_path, lab)
    broker.start()
    other_ca, other_key = make_ca("not our root")
    now = dt.datetime.now(dt.UTC)

    def elsewhere(_key: Any) -> Any:
        return ec.generate_private_key(ec.SECP256R1()).public_key()

    forgeries = [
        ("wrong CA", lambda key: (other_ca, other_key, key, "gw-042")),
        ("someone else's key", lambda key: (lab.issuing, lab.issuing_key, elsewhere(key), "gw-042")),
        ("wrong CN", lambda key: (lab.issuing, lab.issuing_key, key, "gw-999")),
    ]
    sent: list[str] = []

    def on_message(client: paho.Client, _u: Any, message: Any) -> None:
        request = json.loads(message.payload)
        if len(sent) >= len(forgeries):
            return
        name, forge = forgeries[len(sent)]
        ca, ca_key, public, cn = forge(x509.load_pem_x509_csr(request["csr"].encode()).public_key())
        leaf = client_certificate(ca, ca_key, public, cn, now - dt.timedelta(minutes=1), now + dt.timedelta(days=1))
        chain = pem(leaf) + (pem(lab.issuing) if ca is lab.issuing else b"")
        answer = {
            "status": "issued",
            "nonce": request["nonce"],
            "gateway_id": "gw-042",
            "certificate_chain": chain.decode(),
        }
        sent.append(name)
        client.publish(message.topic.replace("/request", "/answer"), json.dumps(answer), qos=1)

    forger = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-forger")
    forger.tls_set(ca_certs=str(tmp_path / "ca.pem"), certfile=str(tmp_path / "provisioner.crt"),
                   keyfile=str(tmp_path / "provisioner.key"))  # fmt: skip
    forger.on_message = on_message
    forger.on_connect = lambda c, *_: c.subscribe("prov/+/+/request", qos=1)
    forger.connect("127.0.0.1", broker.port)
    forger.loop_start()
    folder = tmp_path / "identity"
    settings = ClaimSettings(
        host="127.0.0.1", port=broker.port, broker_ca=tmp_path / "ca.pem", cert_file=tmp_path / f"{CLAIM_CN}.crt",
        key_file=tmp_path / f"{CLAIM_CN}.key", v5=False, serial="SN-0042", hardware_model="test", root="prov",
        ca_file=tmp_path / "ca.pem", answer_timeout=5, retry_interval=0.1, gateway_id=None,
    )  # fmt: skip
    claimer = Claimer(settings, FileKeyStore(folder), IdentityFiles(folder))
    caplog.set_level(logging.INFO, logger="agent.fleet.identity")
    thread = threading.Thread(target=claimer.run)
    thread.start()
    try:
        wait_for(lambda: claimer.refused_answers == 3, 20, "three tampered answers refused")
    finally:
        claimer.stop()
        thread.join(10)
        forger.disconnect()
        forger.loop_stop()
        broker.stop()
    refused = [r.getMessage() for r in caplog.records if "answer refused" in r.getMessage()]
    assert refused == [
        "claim: answer refused: certificate_chain: does not verify up to fleet.identity.ca_file (validation failed:"
        " candidates exhausted: all candidates exhausted with no interior errors)",
        "claim: answer refused: certificate_chain: the certificate does not hold this gateway's pending key",
        "claim: answer refused: certificate_chain: CN 'gw-999' is not the gateway_id 'gw-042'",
    ], refused
    assert not (folder / "identity.json").exists() and not (folder / "cert.pem").exists()
    assert not (folder / "key.pem").exists()  # only the pending key, never promoted
