"""The renewal's files in ``<state>/fleet/identity/`` (docs/fleet.md): the pending key, the new
chain, and their promotion once the new certificate has connected.

Written against the shared identity layout so renewal runs before the key store lands; the key
store's ``generate``/``csr``/``promote`` replace :class:`PendingKey` one for one.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.fleet.nonces import _write_atomically
from agent.uplinks.api import IdentityFiles

KEY, CERT = "key.pem", "cert.pem"
KEY_NEXT, CERT_NEXT = "key.next.pem", "cert.next.pem"
IDENTITY_JSON = "identity.json"
Which = Literal["current", "pending"]


def identity_dir(buffer_path: Path) -> Path:
    """``<buffer folder>/fleet/identity`` (0700), beside the other fleet state."""
    return buffer_path.parent / "fleet" / "identity"


@dataclass(frozen=True)
class CsrFields:
    """What a CSR says about the gateway (the shared spec's); the CN is only a hint."""

    serial: str
    hardware_model: str
    agent_version: str
    nonce: str
    common_name: str


class PendingKey:
    """The identity folder's keys and chains, current and pending (``.next``), as the spec's file key store."""

    kind = "file"

    def __init__(self, folder: Path) -> None:
        """``folder``: the identity folder."""
        self.folder = folder

    @property
    def current(self) -> IdentityFiles:
        """``cert.pem`` and ``key.pem``."""
        return IdentityFiles(self.folder / CERT, self.folder / KEY)

    @property
    def next(self) -> IdentityFiles:
        """``cert.next.pem`` and ``key.next.pem``."""
        return IdentityFiles(self.folder / CERT_NEXT, self.folder / KEY_NEXT)

    def generate(self) -> None:
        """A new EC P-256 key as the pending one (replacing an older pending key), 0600."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_atomically(self.folder / KEY_NEXT, pem)

    def _private(self, which: Which) -> ec.EllipticCurvePrivateKey:
        path = self.folder / (KEY if which == "current" else KEY_NEXT)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: not an EC key")
        return key

    def public_key(self, which: Which) -> ec.EllipticCurvePublicKey:
        """That key's public half."""
        return self._private(which).public_key()

    def csr(self, which: Which, fields: CsrFields) -> bytes:
        """A PEM CSR signed by that key (proof of possession; the CN is only a hint)."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, fields.common_name),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, fields.serial),
            ]
        )
        request = (
            x509.CertificateSigningRequestBuilder().subject_name(subject).sign(self._private(which), hashes.SHA256())
        )
        return request.public_bytes(serialization.Encoding.PEM)

    def promote(self) -> None:
        """The pending key becomes the current one (one atomic rename)."""
        os.replace(self.folder / KEY_NEXT, self.folder / KEY)
        _sync(self.folder)


class Chains:
    """The identity folder's certificate chains: the new one waits as ``cert.next.pem``."""

    def __init__(self, folder: Path) -> None:
        """``folder``: the identity folder."""
        self.folder = folder

    def write_cert_next(self, chain_pem: bytes) -> None:
        """The answer's chain as ``cert.next.pem`` (0600, atomic)."""
        _write_atomically(self.folder / CERT_NEXT, chain_pem)

    def promote_cert(self) -> None:
        """``cert.next.pem`` becomes ``cert.pem`` (after the key was promoted)."""
        os.replace(self.folder / CERT_NEXT, self.folder / CERT)
        _sync(self.folder)

    def discard_next(self) -> None:
        """Forget a renewal that failed: the pending key and chain go."""
        for name in (CERT_NEXT, KEY_NEXT):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()


def recover(folder: Path) -> None:
    """Finish a promotion a crash interrupted: ``key.pem`` is new, ``cert.pem`` still old."""
    key, cert, cert_next = folder / KEY, folder / CERT, folder / CERT_NEXT
    if not (key.exists() and cert.exists() and cert_next.exists()):
        return
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if _leaf_key(cert) != private.public_key() and _leaf_key(cert_next) == private.public_key():
        os.replace(cert_next, cert)
        _sync(folder)


def _leaf_key(path: Path) -> Any:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].public_key()


def update_identity_json(folder: Path, leaf: x509.Certificate) -> None:
    """Record the new certificate's serial number and expiry in ``identity.json`` (if it exists)."""
    path = folder / IDENTITY_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(doc, dict):
        return
    doc["not_after"] = leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    doc["certificate_serial"] = format(leaf.serial_number, "x")
    doc["issued_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    _write_atomically(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def read_identity_json(folder: Path) -> dict[str, Any]:
    """``identity.json`` as a dict (empty if missing or unreadable)."""
    try:
        doc = json.loads((folder / IDENTITY_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _sync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
