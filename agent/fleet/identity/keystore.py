"""Where the gateway's private keys live: behind :class:`KeyStore`, a file by default.

The file store keeps EC P-256 keys as PKCS#8 PEM, mode 0600, in the identity folder
(files.py): ``key.next.pem`` is the pending key a CSR was made for, ``key.pem`` the current one.
A key never leaves the store other than as the file Python's ``ssl`` loads for the handshake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.fleet.identity.files import KEY, KEY_NEXT, too_open, write_private

Which = Literal["current", "pending"]


@dataclass(frozen=True)
class CsrFields:
    """What a CSR says about the gateway; the CN is only a hint (the responder takes the allow-list's)."""

    serial: str
    hardware_model: str
    agent_version: str
    nonce: str
    common_name: str


class KeyStore(Protocol):
    """A gateway's current key and the pending one a renewal or a claim made."""

    kind: str

    def generate(self) -> None:
        """A new EC P-256 key as the pending key (replacing an older pending one)."""

    def public_key(self, which: Which) -> ec.EllipticCurvePublicKey:
        """The public half of the current or the pending key."""

    def csr(self, which: Which, fields: CsrFields) -> bytes:
        """A PEM CSR signed by that key."""

    def promote(self) -> None:
        """The pending key becomes the current one (atomically)."""

    def tls_key_file(self) -> Path | None:
        """The current key as a file Python's ssl can load; None: the key cannot leave the store."""


class KeyStoreError(Exception):
    """A key the store cannot use, naming the file and why."""


class FileKeyStore:
    """Keys as PEM files of mode 0600 in ``folder``."""

    kind = "file"

    def __init__(self, folder: Path) -> None:
        """Nothing is read until a key is asked for."""
        self.folder = folder

    def _path(self, which: Which) -> Path:
        return self.folder / (KEY if which == "current" else KEY_NEXT)

    def check_permissions(self) -> list[str]:
        """A line for every key file group or others may read."""
        return [p for p in (too_open(self._path("current")), too_open(self._path("pending"))) if p]

    def generate(self) -> None:
        """A new EC P-256 key written to ``key.next.pem`` (0600, atomic)."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(self._path("pending"), pem)

    def has(self, which: Which) -> bool:
        """Whether that key file exists."""
        return self._path(which).exists()

    def _private(self, which: Which) -> ec.EllipticCurvePrivateKey:
        path = self._path(which)
        problem = too_open(path)
        if problem:
            raise KeyStoreError(problem)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise KeyStoreError(f"{path}: not a readable PEM private key ({type(exc).__name__})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise KeyStoreError(f"{path}: not an EC P-256 key")
        return key

    def public_key(self, which: Which) -> ec.EllipticCurvePublicKey:
        """The public half of that key."""
        return self._private(which).public_key()

    def csr(self, which: Which, fields: CsrFields) -> bytes:
        """A CSR for that key; the serial goes in the subject's serialNumber."""
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
        """``key.next.pem`` over ``key.pem`` (one rename, then the folder synced)."""
        os.replace(self._path("pending"), self._path("current"))
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def tls_key_file(self) -> Path | None:
        """``key.pem``: ssl loads it at each connect."""
        return self._path("current")
