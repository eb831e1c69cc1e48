"""The PKCS#11 key store against SoftHSM2: a token initialised in a temporary folder for this module.

The key is made in the token and never leaves it; the CSR it signs verifies with cryptography and
is accepted by the responder's proof-of-possession check; pending/current survive a new process;
a wrong PIN names the token, never the PIN; ``validate`` refuses ``key_store: pkcs11``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from agent.config.model import load_config
from agent.errors import ConfigError
from agent.fleet.identity.keystore import CsrFields, KeyStoreError
from agent.fleet.identity.pkcs11_config import Pkcs11Config
from agent.fleet.identity.pkcs11_store import Pkcs11KeyStore
from agent.fleet.provisioning.ca import Issuer, make_ca, pem

ROOT = Path(__file__).resolve().parents[3]
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN, PIN, SO_PIN = "gw-token", "246810", "13579111"
FIELDS = CsrFields(serial="SN-0042", hardware_model="rpi4", agent_version="0.1.0", nonce="ab" * 16, common_name="gw")


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _point(spki_der: bytes) -> bytes:
    key = serialization.load_der_public_key(spki_der)
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SoftHSM2 token of its own (own softhsm2.conf and token folder), and its PIN file."""
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    util = shutil.which("softhsm2-util")
    assert util is not None, "softhsm2-util missing: ./dev installs Debian's softhsm2"
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
        check=True, capture_output=True,
    )  # fmt: skip
    # SoftHSM reads its conf and lists tokens at C_Initialize; python-pkcs11 keeps one library per process.
    pkcs11.lib(str(SOFTHSM)).reinitialize()
    try:
        yield {"conf": conf, "pin_file": _secret(folder / "pin", PIN), "folder": folder}
    finally:
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before


def _store(hsm: dict[str, Any], label: str, **overrides: Any) -> Pkcs11KeyStore:
    settings: dict[str, Any] = {
        "module": SOFTHSM,
        "token_label": TOKEN,
        "pin_file": hsm["pin_file"],
        "key_label": label,
    }
    return Pkcs11KeyStore(Pkcs11Config(**(settings | overrides)))


def _privates(label: str) -> list[Any]:
    token = pkcs11.lib(str(SOFTHSM)).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        found = []
        for which in ("current", "pending"):
            for key in session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: f"{label}.{which}"}
            ):
                found.append((which, bytes(key.id)))
        return found


def test_csr_is_signed_in_the_token_and_passes_proof_of_possession(hsm: dict[str, Any]) -> None:
    store = _store(hsm, "csr")
    store.generate()
    request = x509.load_pem_x509_csr(store.csr("pending", FIELDS))
    assert request.is_signature_valid
    assert _public_der(request.public_key()) == _public_der(store.public_key("pending"))  # type: ignore[arg-type]
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw"
    assert request.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0042"
    # The token's own public key object, read without the store, is the CSR's key.
    token = pkcs11.lib(str(SOFTHSM)).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        public = session.get_key(ObjectClass.PUBLIC_KEY, label="csr.pending")
        point = bytes(public[Attribute.EC_POINT])
    assert point[2:] == request.public_key().public_bytes(  # 04 41: the DER OCTET STRING around the point
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    # The responder issues for it: its CSR checks (signature, EC P-256) accept the token's signature.
    ca, ca_key = make_ca("lab root")
    issuer = Issuer(ca, b"", ca_key)
    leaf = issuer.issue(store.csr("pending", FIELDS).decode(), "gw-017", days=90)
    assert _public_der(leaf.public_key()) == _public_der(store.public_key("pending"))  # type: ignore[arg-type]
    assert pem(leaf).startswith(b"-----BEGIN CERTIFICATE-----")
    assert store.tls_key_file() is None
    assert store.kind == "pkcs11"


def test_private_key_is_sensitive_and_cannot_be_read(hsm: dict[str, Any]) -> None:
    store = _store(hsm, "sealed")
    store.generate()
    token = pkcs11.lib(str(SOFTHSM)).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        key = session.get_key(ObjectClass.PRIVATE_KEY, label="sealed.pending")
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]
        with pytest.raises(pkcs11.PKCS11Error):  # nor can it be made extractable afterwards
            key[Attribute.EXTRACTABLE] = True


_CHILD = """
import sys
from pathlib import Path
from agent.fleet.identity.pkcs11_config import Pkcs11Config
from agent.fleet.identity.pkcs11_store import Pkcs11KeyStore
from cryptography.hazmat.primitives import serialization as s
store = Pkcs11KeyStore(Pkcs11Config(module=Path(sys.argv[1]), token_label=sys.argv[2], pin_file=Path(sys.argv[3]),
                                    key_label=sys.argv[4]))
if sys.argv[5] == "generate":
    store.generate()
for which in ("current", "pending"):
    if store.has(which):
        der = store.public_key(which).public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)
        print(which, der.hex())
"""


def _child(hsm: dict[str, Any], label: str, action: str) -> dict[str, bytes]:
    """What a new process sees in the token: {which: public key DER}."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "SOFTHSM2_CONF": str(hsm["conf"])}
    args = [str(SOFTHSM), TOKEN, str(hsm["pin_file"]), label, action]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return {line.split()[0]: bytes.fromhex(line.split()[1]) for line in done.stdout.splitlines()}


def test_pending_and_current_survive_a_new_process_and_promote_replaces_the_old_pair(hsm: dict[str, Any]) -> None:
    store = _store(hsm, "life")
    first = _child(hsm, "life", "generate")  # made by another process
    assert set(first) == {"pending"}
    assert _public_der(store.public_key("pending")) == first["pending"]
    with pytest.raises(KeyStoreError, match="no current key"):
        store.public_key("current")
    store.promote()
    assert _public_der(store.public_key("current")) == first["pending"]
    store.generate()
    second = _public_der(store.public_key("pending"))
    assert second != first["pending"]
    store.generate()  # a new pending replaces the older pending pair, the current one stays
    third = _public_der(store.public_key("pending"))
    assert third not in (first["pending"], second)
    assert [w for w, _ in _privates("life")] == ["current", "pending"]
    store.promote()
    assert _child(hsm, "life", "look") == {"current": third}  # what this process promoted
    assert [w for w, _ in _privates("life")] == ["current"]  # the old current pair is gone from the token
    with pytest.raises(KeyStoreError, match="no pending key"):
        store.promote()


def test_a_crash_right_after_the_relabel_leaves_the_new_key_current(hsm: dict[str, Any]) -> None:
    store = _store(hsm, "crash")
    store.generate()
    store.promote()
    old = _public_der(store.public_key("current"))
    store.generate()
    new = _public_der(store.public_key("pending"))
    token = pkcs11.lib(str(SOFTHSM)).get_token(token_label=TOKEN)
    with token.open(rw=True, user_pin=PIN) as session:  # promote's first write, then the "crash"
        session.get_key(ObjectClass.PRIVATE_KEY, label="crash.pending")[Attribute.LABEL] = "crash.current"
    assert len(_privates("crash")) == 2
    assert _public_der(store.public_key("current")) == new != old
    assert not store.has("pending")
    request = x509.load_pem_x509_csr(store.csr("current", FIELDS))
    assert request.is_signature_valid and _public_der(request.public_key()) == new  # type: ignore[arg-type]
    store.generate()  # the next write clears the pair the crash left and relabels the public half
    assert [w for w, _ in _privates("crash")] == ["current", "pending"]
    with token.open(user_pin=PIN) as session:
        public = session.get_key(ObjectClass.PUBLIC_KEY, label="crash.current")
        assert bytes(public[Attribute.EC_POINT])[2:] == _point(new)
    assert _public_der(store.public_key("current")) == new


def test_a_wrong_pin_names_the_token_and_the_file_but_not_the_pin(
    hsm: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = _secret(hsm["folder"] / "wrong-pin", "97531")
    with pytest.raises(KeyStoreError) as refused:
        _store(hsm, "pin", pin_file=wrong).generate()
    message = str(refused.value)
    assert f"PKCS#11 token {TOKEN!r}" in message
    assert str(wrong) in message and "refused the PIN" in message
    assert "97531" not in message and "97531" not in caplog.text
    assert not _privates("pin")
    with pytest.raises(KeyStoreError, match=r"'no-such-token'.*no token with that label"):
        _store(hsm, "pin", token_label="no-such-token").generate()  # noqa: S106 (a label, not a password)
    with pytest.raises(KeyStoreError, match=r"\(/etc/hostname\): cannot load the module"):
        _store(hsm, "pin", module=Path("/etc/hostname")).generate()
    wrong.chmod(0o644)
    with pytest.raises(KeyStoreError, match=r"pin_file: .*permissions 0644 are too open for a PIN; chmod 600"):
        Pkcs11KeyStore(Pkcs11Config.model_construct(module=SOFTHSM, token_label=TOKEN, pin_file=wrong)).generate()


_ENGINE_CONF = """openssl_conf = init
[init]
engines = engines
[engines]
pkcs11 = pkcs11
[pkcs11]
engine_id = pkcs11
dynamic_path = {engine}
MODULE_PATH = {module}
PIN = {pin}
init = 1
"""


def _engine() -> Path:
    """Debian 12's libengine-pkcs11-openssl, in OpenSSL's engines folder (per architecture)."""
    shown = subprocess.run(["openssl", "version", "-e"], capture_output=True, text=True, check=True).stdout
    return Path(shown.split('"')[1]) / "pkcs11.so"


_LOAD = """
import ssl, sys
try:
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(sys.argv[1], sys.argv[2])
except (OSError, ssl.SSLError) as exc:
    print("refused", type(exc).__name__)
else:
    print("loaded")
"""


def test_the_engine_reaches_the_token_key_but_pythons_ssl_does_not(hsm: dict[str, Any], tmp_path: Path) -> None:
    """Why validate refuses key_store: pkcs11 (docs/fleet.md): if this starts failing, revisit the refusal."""
    store = _store(hsm, "tls")
    store.generate()
    store.promote()
    ca, ca_key = make_ca("lab root")
    leaf = Issuer(ca, b"", ca_key).issue(store.csr("current", FIELDS).decode(), "gw-017", days=1)
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pem(leaf))
    conf = tmp_path / "engine.cnf"
    conf.write_text(_ENGINE_CONF.format(engine=_engine(), module=SOFTHSM, pin=PIN))
    env = os.environ | {"OPENSSL_CONF": str(conf), "SOFTHSM2_CONF": str(hsm["conf"])}
    uri = f"pkcs11:token={TOKEN};object=tls.current;type=private"
    openssl = subprocess.run(
        ["openssl", "pkey", "-engine", "pkcs11", "-inform", "engine", "-in", uri, "-pubout"],
        env=env, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert openssl.returncode == 0, openssl.stderr
    engine_key = serialization.load_pem_public_key(openssl.stdout)
    assert _public_der(engine_key) == _public_der(store.public_key("current"))  # type: ignore[arg-type]
    # The URI is taken for a file name; the certificate file holds no key (the engine is not asked).
    for keyfile, why in ((uri, "FileNotFoundError"), (str(cert), "SSLError")):
        done = subprocess.run(
            [sys.executable, "-c", _LOAD, str(cert), keyfile], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.stdout.split() == ["refused", why], done.stdout + done.stderr


def _site(folder: Path, identity: str) -> Path:
    ca, _ = make_ca("lab root")
    (folder / "ca.pem").write_bytes(pem(ca))
    site = folder / "site.yaml"
    site.write_text(
        "gateway: {id: gw-017}\n"
        "uplink:\n"
        f"  mqtt: {{host: broker.example, tls: {{ca_file: {folder / 'ca.pem'}}}}}\n"
        f"buffer: {{path: {folder / 'buffer.db'}}}\n"
        "fleet:\n"
        "  identity:\n"
        f"    ca_file: {folder / 'ca.pem'}\n" + identity + "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 1s}\n"
    )
    return site


def test_validate_refuses_a_token_key_for_the_tls_client_certificate(hsm: dict[str, Any], tmp_path: Path) -> None:
    token = f"    pkcs11: {{module: {SOFTHSM}, token_label: {TOKEN}, pin_file: {hsm['pin_file']}}}\n"
    site = _site(tmp_path, "    key_store: pkcs11\n" + token)
    done = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(site)],
        capture_output=True, text=True, check=False, timeout=60, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert "fleet.identity.key_store: pkcs11 cannot be used here" in done.stderr
    assert "loads client keys only from files" in done.stderr
    assert "Keys in a PKCS#11 token" in done.stderr
    assert PIN not in done.stderr + done.stdout
    with pytest.raises(ConfigError, match=r"fleet\.identity\.pkcs11: required with key_store: pkcs11"):
        load_config(_site(tmp_path, "    key_store: pkcs11\n"))
    with pytest.raises(ConfigError, match=r"fleet\.identity\.pkcs11: only used with key_store: pkcs11"):
        load_config(_site(tmp_path, token))
    loose = _secret(tmp_path / "loose-pin", PIN)
    loose.chmod(0o640)
    with pytest.raises(ConfigError, match=r"pin_file.*0640 are too open for a PIN; chmod 600"):
        load_config(_site(tmp_path, "    key_store: pkcs11\n" + token.replace(str(hsm["pin_file"]), str(loose))))
    assert load_config(_site(tmp_path, "    key_store: file\n")).fleet.identity is not None
