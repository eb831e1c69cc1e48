"""The rules on their own: answer checks, the responder's decisions, the rate limit, the CRL,
the identity folder's crash rule, key permissions and the site file's ``fleet.identity``."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config.model import parse_config
from agent.errors import ConfigError
from agent.fleet.identity.claim import REFUSED_MIN_WAIT, wait_after
from agent.fleet.identity.files import IdentityFiles
from agent.fleet.identity.keystore import CsrFields, FileKeyStore, KeyStoreError
from agent.fleet.identity.verify import AnswerRefused, check_chain
from agent.fleet.provisioning.ca import Issuer, key_pem, make_ca, pem
from agent.fleet.provisioning.config import ResponderConfig
from agent.fleet.provisioning.crl import write_crl
from agent.fleet.provisioning.decide import Decider, Request
from agent.fleet.provisioning.ledger import Ledger
from agent.fleet.provisioning.ratelimit import TokenBucket

FIELDS = CsrFields("SN-1", "rpi4", "0.1.0", "0" * 32, "whatever-the-csr-says")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    ca, ca_key = make_ca("unit root")
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    (tmp_path / "ca.key").write_bytes(key_pem(ca_key))
    (tmp_path / "ca.key").chmod(0o600)
    config = ResponderConfig.model_validate(
        {
            "ca": {"cert_file": str(tmp_path / "ca.pem"), "key_file": str(tmp_path / "ca.key")},
            "state_file": str(tmp_path / "state.json"),
            "allow": [
                {"serial": "SN-1", "gateway_id": "gw-1", "groups": ["north"]},
                {"serial": "SN-2", "gateway_id": "gw-2", "reprovision": True},
                {"serial": "SN-3", "gateway_id": "gw-3", "revoked": True},
            ],
        }
    )
    clock = Clock()
    decider = Decider(config, Issuer.load(tmp_path / "ca.pem", tmp_path / "ca.key"), Ledger(config.state_file),
                      TokenBucket(config.rate_limit, clock))  # fmt: skip
    store = FileKeyStore(tmp_path / "identity")
    store.generate()
    return {"ca": ca, "ca_key": ca_key, "decider": decider, "clock": clock, "store": store, "tmp": tmp_path}


def _claim(world: dict[str, Any], serial: str, csr: bytes | None = None, **extra: Any) -> dict[str, Any]:
    nonce = secrets.token_hex(16)
    body = {"serial": serial, "nonce": nonce, "csr": (csr or world["store"].csr("pending", FIELDS)).decode(), **extra}
    world["clock"].now += 0.2  # well inside the rate limit
    decision = world["decider"].decide(Request("claim", "claim-lab", serial, json.dumps(body).encode()))
    assert decision.answer["nonce"] == nonce
    return dict(decision.answer)


def test_issued_answer_names_the_allow_lists_id_and_verifies(world: dict[str, Any]) -> None:
    answer = _claim(world, "SN-1")
    assert answer["status"] == "issued" and answer["gateway_id"] == "gw-1" and answer["groups"] == ["north"]
    leaf = check_chain(answer["certificate_chain"], [world["ca"]], world["store"].public_key("pending"), "gw-1")
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"  # never the CSR's CN
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc >= dt.timedelta(days=90)
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    state = json.loads((world["tmp"] / "state.json").read_text())
    assert state["serials"]["SN-1"][0]["gateway_id"] == "gw-1"
    assert (world["tmp"] / "state.json").stat().st_mode & 0o777 == 0o600


def test_refusals_name_why(world: dict[str, Any]) -> None:
    assert _claim(world, "SN-1")["status"] == "issued"
    again = _claim(world, "SN-1")
    assert again["status"] == "refused" and "already provisioned as gw-1" in again["reason"]
    unknown = _claim(world, "SN-404")
    assert unknown["reason"] == "serial SN-404: not on the allow-list" and unknown["retry_after"] == 60
    assert "revoked" in _claim(world, "SN-3")["reason"]
    assert _claim(world, "SN-2")["status"] == _claim(world, "SN-2")["status"] == "issued"  # reprovision: true
    rsa_key = rsa.generate_private_key(65537, 2048)
    rsa_csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(rsa_key, hashes.SHA256())
    assert _claim(world, "SN-2", rsa_csr.public_bytes(serialization.Encoding.PEM))["reason"] == (
        "csr: key type must be EC P-256"
    )
    # Someone else's public key in a CSR signed by ours: no proof of possession.
    good = x509.load_pem_x509_csr(world["store"].csr("pending", FIELDS))
    other = ec.generate_private_key(ec.SECP256R1())
    forged = x509.CertificateSigningRequestBuilder().subject_name(good.subject).sign(other, hashes.SHA256())
    swapped = _swap_key(forged, good)
    assert "no proof of possession" in _claim(world, "SN-2", swapped)["reason"]
    world["clock"].now += 0.2
    mismatch = world["decider"].decide(
        Request("claim", "claim-lab", "SN-2", json.dumps({"serial": "SN-1", "nonce": "a" * 32, "csr": ""}).encode())
    )
    assert mismatch.answer["reason"] == "serial: differs from the serial in the topic"


def _swap_key(forged: x509.CertificateSigningRequest, good: x509.CertificateSigningRequest) -> bytes:
    """``forged`` with ``good``'s public key put in, its signature left as it was."""
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    theirs, ours = forged.public_key().public_bytes(*spki), good.public_key().public_bytes(*spki)
    at = bytes(der).index(theirs)
    der[at : at + len(theirs)] = ours
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def test_renewal_only_for_the_gateway_itself_once_provisioned(world: dict[str, Any]) -> None:
    body = {"serial": "SN-1", "nonce": "b" * 32, "csr": world["store"].csr("pending", FIELDS).decode()}

    def renew(who: str) -> Any:
        world["clock"].now += 0.2
        return world["decider"].decide(Request("renewal", who, None, json.dumps(body).encode()))

    early = renew("gw-1")
    assert early.answer["reason"] == "gateway gw-1: never provisioned: claim first"
    _claim(world, "SN-1")
    stranger = renew("gw-2")
    assert stranger.answer["reason"] == "serial SN-1: belongs to gw-1, not to gw-2"
    renewed = renew("gw-1")
    assert renewed.answer["status"] == "issued" and renewed.answer["gateway_id"] == "gw-1", renewed.answer


def test_rate_limit_never_more_than_the_limit_in_a_second() -> None:
    clock = Clock()
    bucket = TokenBucket(10, clock)
    granted, waits = [], []
    for i in range(300):  # 100 requests a second for 3 s
        clock.now = 1000 + i * 0.01
        wait = bucket.take()
        (granted if wait == 0 else waits).append(clock.now if wait == 0 else wait)
    per_second = [sum(1 for t in granted if s <= t < s + 1) for s in (1000, 1001, 1002)]
    assert max(per_second) <= 10 and sum(per_second) >= 28
    assert min(waits) >= 1 and max(waits) > 10  # the backlog is spread over the seconds it needs


def test_a_burst_is_held_for_its_slots_at_the_full_rate_and_the_rest_told_to_retry() -> None:
    clock = Clock()
    clock.now = 1000.0
    bucket = TokenBucket(10, clock)
    delays = [bucket.reserve(10.0) for _ in range(120)]  # 120 gateways asking at the same moment
    held = [d for d in delays if d is not None]
    assert len(held) == 101 and held == sorted(held) and held[0] == 0.0  # slots 0.0, 0.1 ... 10.0 s
    slots = [1000.0 + d for d in held]
    assert max(sum(1 for t in slots if s <= t < s + 1) for s in range(1000, 1011)) <= 10
    assert bucket.take() >= 10  # and one asking now is told to come back after the held ones


def test_answer_checks_name_why(world: dict[str, Any]) -> None:
    store: FileKeyStore = world["store"]
    answer = _claim(world, "SN-2")
    chain = answer["certificate_chain"]
    key = store.public_key("pending")
    other_ca, _ = make_ca("someone else's root")
    with pytest.raises(AnswerRefused, match=r"does not verify up to fleet\.identity\.ca_file"):
        check_chain(chain, [other_ca], key, "gw-2")
    with pytest.raises(AnswerRefused, match="does not hold this gateway's pending key"):
        check_chain(chain, [world["ca"]], ec.generate_private_key(ec.SECP256R1()).public_key(), "gw-2")
    with pytest.raises(AnswerRefused, match="CN 'gw-2' is not the gateway_id 'gw-9'"):
        check_chain(chain, [world["ca"]], key, "gw-9")
    server_only = _leaf(world, key, ExtendedKeyUsageOID.SERVER_AUTH)
    with pytest.raises(AnswerRefused, match="does not allow clientAuth"):
        check_chain(server_only, [world["ca"]], key, "gw-2")
    with pytest.raises(AnswerRefused, match="does not verify"):
        check_chain(chain, [world["ca"]], key, "gw-2", now=dt.datetime.now(dt.UTC) + dt.timedelta(days=100))
    with pytest.raises(AnswerRefused, match="not PEM certificates"):
        check_chain("garbage", [world["ca"]], key, "gw-2")


def _leaf(world: dict[str, Any], key: ec.EllipticCurvePublicKey, usage: x509.ObjectIdentifier) -> str:
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-2")]))
        .issuer_name(world["ca"].subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(world["ca_key"], hashes.SHA256())
    )
    return pem(cert).decode()


def test_crl_lists_every_certificate_of_a_revoked_entry(world: dict[str, Any], tmp_path: Path) -> None:
    decider: Decider = world["decider"]
    config = decider.config.model_copy(update={"allow": [a.model_copy(update={"revoked": a.serial == "SN-2"})
                                                         for a in decider.config.allow]})  # fmt: skip
    first, second = _claim(world, "SN-2"), _claim(world, "SN-2")
    decider.config = config
    write_crl(tmp_path / "crl.pem", decider.issuer, decider.revoked(), 7)
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.is_signature_valid(world["ca"].public_key())  # type: ignore[arg-type]
    serials = {r.serial_number for r in crl}
    for answer in (first, second):
        leaf = x509.load_pem_x509_certificates(answer["certificate_chain"].encode())[0]
        assert leaf.serial_number in serials
    assert len(serials) == 2


def test_wait_after_a_refusal_is_at_least_a_minute() -> None:
    assert wait_after("refused", 1, 2.0) == REFUSED_MIN_WAIT == 60
    assert wait_after("refused", 3600, 2.0) == 3600
    waits = [wait_after("retry", 5, 2.0) for _ in range(200)]
    assert 4.0 <= min(waits) < 4.5 and 5.5 < max(waits) <= 6.0


def test_key_files_refuse_wide_permissions_naming_the_file(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "identity")
    store.generate()
    pending = tmp_path / "identity" / "key.next.pem"
    assert pending.stat().st_mode & 0o777 == 0o600 and (tmp_path / "identity").stat().st_mode & 0o777 == 0o700
    pending.chmod(0o640)
    expected = f"{pending}: permissions 0640 are too open for a private key; chmod 600 {pending}"
    assert store.check_permissions() == [expected]
    with pytest.raises(KeyStoreError, match="chmod 600"):
        store.csr("pending", FIELDS)


def test_a_crash_between_the_two_renames_is_finished_at_start(world: dict[str, Any]) -> None:
    store: FileKeyStore = world["store"]
    folder = store.folder
    files = IdentityFiles(folder)
    old = _claim(world, "SN-2")
    files.write_cert_next(old["certificate_chain"].encode())
    store.promote()
    files.promote_cert()
    store.generate()
    new = _claim(world, "SN-2")
    files.write_cert_next(new["certificate_chain"].encode())
    store.promote()  # ... and the power went: key.pem is new, cert.pem old, cert.next.pem new
    assert files.recover() == "finished a promotion a crash interrupted (cert.next.pem holds key.pem)"
    leaf = files.leaf()
    assert leaf is not None and leaf.public_key() == store.public_key("current")
    assert not (folder / "cert.next.pem").exists() and files.recover() is None


SITE = """
uplink:
  mqtt: {{host: 127.0.0.1, port: 8883, tls: {{ca_file: {ca}{extra}}}}}
buffer: {{path: {tmp}/buffer.db}}
fleet:
  identity:
    ca_file: {ca}
{claim}devices: []
"""


def _site(tmp: Path, *, extra: str = "", claim: bool = True, gateway: str = "") -> str:
    (tmp / "c.crt").write_text("x")
    (tmp / "c.key").write_text("x")
    block = f"    claim: {{cert_file: {tmp}/c.crt, key_file: {tmp}/c.key, serial: SN-1}}\n" if claim else ""
    return (gateway or "gateway: {site: lab}\n") + SITE.format(ca=tmp / "c.crt", extra=extra, tmp=tmp, claim=block)


def test_site_file_under_fleet_identity(tmp_path: Path) -> None:
    config = parse_config(_site(tmp_path), tmp_path / "site.yaml")
    assert config.gateway.id == ""  # to be claimed: the agent starts nothing until then
    mqtt: Any = config.uplink.mqtt  # type: ignore[attr-defined]
    assert mqtt.tls.cert_file == tmp_path / "fleet" / "identity" / "cert.pem"
    extra = f", cert_file: {tmp_path}/c.crt, key_file: {tmp_path}/c.key"
    with pytest.raises(ConfigError) as refused:
        parse_config(_site(tmp_path, extra=extra), tmp_path / "site.yaml")
    assert "uplink.mqtt.tls.cert_file, uplink.mqtt.tls.key_file: the client certificate is fleet.identity's" in str(
        refused.value
    )
    with pytest.raises(ConfigError, match=r"gateway\.id: required unless fleet\.identity\.claim is set"):
        parse_config(_site(tmp_path, claim=False), tmp_path / "site.yaml")
    folder = tmp_path / "fleet" / "identity"
    folder.mkdir(parents=True)
    (folder / "identity.json").write_text(json.dumps({"gateway_id": "gw-017", "serial": "SN-1", "not_after": "x"}))
    assert parse_config(_site(tmp_path, claim=False), tmp_path / "site.yaml").gateway.id == "gw-017"
    with pytest.raises(ConfigError, match="provisioned as 'gw-017'"):
        parse_config(_site(tmp_path, gateway="gateway: {id: gw-018}\n"), tmp_path / "site.yaml")
