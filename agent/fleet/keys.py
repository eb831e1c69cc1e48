"""Ed25519 signing keys of the fleet operator: made by ``fleet keygen``, named in site files by their text.

A public key travels as ``ed25519:<base64 of its 32 raw bytes>``: one line a site file can hold,
with its algorithm in front so that a key of another kind is refused by name, not misread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "ed25519:"


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def public_text(key: Ed25519PublicKey) -> str:
    """The key as a site file lists it: ``ed25519:<base64>``."""
    return PREFIX + base64.b64encode(_raw(key)).decode("ascii")


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for the key: the first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def parse_public_text(text: str) -> Ed25519PublicKey:
    """The key ``public_text`` printed.

    Raises:
        ValueError: not ``ed25519:`` followed by the base64 of 32 bytes; the message says which part is wrong.
    """
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise ValueError(f"a public key must start with {PREFIX!r} (as `edge-agent fleet keygen` prints it)")
    try:
        raw = base64.b64decode(text[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the public key after {PREFIX!r} is not base64 ({exc})") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_key() -> tuple[bytes, str, str]:
    """A new key: (private key as unencrypted PKCS#8 PEM, public text, key id).

    Unencrypted because the signing machine is meant to be offline; the file's mode protects it
    (``load_private_key`` refuses one that others can read).
    """
    # PEM needs the serialization module (1 MB resident): only on the operator's side, not in the agent.
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return pem, public_text(key.public_key()), key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in ``path`` (PEM, unencrypted).

    Raises:
        ValueError: the file cannot be read, group or others may access it, or it holds no
            unencrypted Ed25519 key; the message names the file and the fix.
    """
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ValueError(
                f"{path} can be accessed by group or others (mode {mode & 0o777:o}): run `chmod 600 {path}`"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the signing key {path}: {exc.strerror or exc}") from exc
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's word for "this one needs a password"
        raise ValueError(f"{path} is encrypted: give an unencrypted PKCS#8 Ed25519 key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            f"{path} holds a key of another kind ({type(key).__name__}), not an Ed25519 key"
            " (make one with `edge-agent fleet keygen`)"
        )
    return key
