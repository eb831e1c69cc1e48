"""Operator keys: generated, saved, loaded back, and refused when others could read them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, NoEncryption, PrivateFormat

from agent.fleet.envelope import COMMAND_TYPE, TrustedKey, sign
from agent.fleet.keys import generate_key, key_id, load_private_key, parse_public_text, public_text
from tests.fleet.envelopes import GATEWAY, GROUPS, NOW, body
from tests.fleet.test_envelope import check


def _saved(tmp_path: Path, pem: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "operator.pem"
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def test_a_generated_key_loads_back_and_signs_what_its_public_text_verifies(tmp_path: Path) -> None:
    pem, text, kid = generate_key()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert re.fullmatch(r"ed25519:[A-Za-z0-9+/]{43}=", text)
    assert re.fullmatch(r"[0-9a-f]{16}", kid)
    key = load_private_key(_saved(tmp_path, pem))
    assert public_text(key.public_key()) == text
    assert key_id(parse_public_text(text)) == kid
    trusted = {kid: TrustedKey.from_text(kid, text, ["write"])}
    data = sign(COMMAND_TYPE, body(), key, kid)
    assert check(data, keys=trusted, gateway=GATEWAY, groups=GROUPS, now=NOW).key_id == kid
    assert generate_key()[2] != kid


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_a_key_others_can_reach_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = _saved(tmp_path, generate_key()[0], mode)
    with pytest.raises(ValueError, match=re.escape(f"chmod 600 {path}")):
        load_private_key(path)


def test_a_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    pem = other.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(ValueError, match=r"another kind .*, not an Ed25519 key"):
        load_private_key(_saved(tmp_path, pem))


def test_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    key = load_private_key(_saved(tmp_path, generate_key()[0]))
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret"))
    with pytest.raises(ValueError, match="is encrypted"):
        load_private_key(_saved(tmp_path, pem))


@pytest.mark.parametrize(
    "content", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_a_file_without_a_key_is_refused(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ValueError, match="is not a PEM private key"):
        load_private_key(_saved(tmp_path, content))


def test_a_missing_key_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"cannot read the signing key {tmp_path / 'absent.pem'}"):
        load_private_key(tmp_path / "absent.pem")
