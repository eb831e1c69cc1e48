"""The identity folder, ``<state>/fleet/identity/`` (0700; every file 0600).

- ``key.pem``, ``cert.pem``: the current key (PKCS#8 PEM) and its chain, leaf first, root excluded.
- ``key.next.pem``, ``cert.next.pem``: a key waiting for its certificate, and that certificate.
- ``identity.json``: who the gateway is (gateway id, serial, not_after, brokers, groups...).

Promotion renames ``key.next.pem`` then ``cert.next.pem`` over the current pair, each rename
atomic. A crash between the two leaves ``key.pem`` (new) beside ``cert.pem`` (old) and
``cert.next.pem`` (new): :func:`recover` sees the current certificate does not hold the current
key and finishes the promotion. A first claim writes ``cert.next.pem`` and ``identity.json``
before promoting, so a crash after the answer never loses a certificate the responder will not
issue twice.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.fleet.nonces import _write_atomically

log = logging.getLogger(__name__)

KEY, CERT, KEY_NEXT, CERT_NEXT, IDENTITY = "key.pem", "cert.pem", "key.next.pem", "cert.next.pem", "identity.json"


def identity_dir(buffer_path: Path) -> Path:
    """The identity folder of an agent with this buffer (beside the other fleet state)."""
    return buffer_path.parent / "fleet" / "identity"


def write_private(path: Path, data: bytes) -> None:
    """``data`` into ``path`` atomically (tmp + fsync + rename), mode 0600, its folder 0700."""
    _write_atomically(path, data)
    with suppress(OSError):
        os.chmod(path.parent, 0o700)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def too_open(path: Path) -> str | None:
    """``"<path>: permissions 0640 are too open; chmod 600 <path>"`` when group or others may read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
    if mode & 0o077 == 0:
        return None
    return f"{path}: permissions {mode:04o} are too open for a private key; chmod 600 {path}"


@dataclass(frozen=True)
class Identity:
    """``identity.json``."""

    gateway_id: str
    serial: str
    not_after: str
    brokers: list[dict[str, Any]] = field(default_factory=list)
    config_version: int | None = None
    groups: list[str] = field(default_factory=list)
    issued_at: str = ""

    def to_json(self) -> bytes:
        """The file's bytes."""
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode() + b"\n"


class IdentityFiles:
    """Reads and writes the folder's files; the key files belong to the key store."""

    def __init__(self, folder: Path) -> None:
        """Nothing is touched until a read or write."""
        self.folder = folder

    def path(self, name: str) -> Path:
        """A file of the folder by name (KEY, CERT, ...)."""
        return self.folder / name

    def identity(self) -> Identity | None:
        """``identity.json``, or None if the gateway was never provisioned.

        Raises:
            ValueError: the file exists but is not an identity (naming the field).
        """
        try:
            doc: Any = json.loads(self.path(IDENTITY).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path(IDENTITY)}: unreadable: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"{self.path(IDENTITY)}: not a JSON object")
        for name in ("gateway_id", "serial", "not_after"):
            if not isinstance(doc.get(name), str) or not doc[name]:
                raise ValueError(f"{self.path(IDENTITY)}: {name}: missing or not a string")
        known = {k: v for k, v in doc.items() if k in Identity.__dataclass_fields__}
        return Identity(**known)

    def write_identity(self, identity: Identity) -> None:
        """Replace ``identity.json`` atomically."""
        write_private(self.path(IDENTITY), identity.to_json())

    def write_cert_next(self, chain_pem: bytes) -> None:
        """The chain an answer brought, waiting for promotion."""
        write_private(self.path(CERT_NEXT), chain_pem)

    def promote_cert(self) -> None:
        """``cert.next.pem`` becomes ``cert.pem`` (after the key store promoted the key)."""
        os.replace(self.path(CERT_NEXT), self.path(CERT))
        _fsync_dir(self.folder)

    def leaf(self, name: str = CERT) -> x509.Certificate | None:
        """The first certificate of a chain file, or None if there is none."""
        try:
            return x509.load_pem_x509_certificates(self.path(name).read_bytes())[0]
        except (OSError, ValueError, IndexError):
            return None

    def recover(self) -> str | None:
        """Finish a promotion a crash interrupted; returns what was done (None: nothing to do)."""
        key = _public_der(self.path(KEY))
        key_next = _public_der(self.path(KEY_NEXT))
        cert_next = self.leaf(CERT_NEXT)
        if key is None and key_next is not None and cert_next is not None and _holds(cert_next, key_next):
            os.replace(self.path(KEY_NEXT), self.path(KEY))
            self.promote_cert()
            return "promoted the pending key and certificate a crash left behind"
        cert = self.leaf(CERT)
        mismatched = key is not None and cert is not None and not _holds(cert, key)
        if mismatched and key is not None and cert_next is not None and _holds(cert_next, key):
            self.promote_cert()
            return "finished a promotion a crash interrupted (cert.next.pem holds key.pem)"
        return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _public_der(key_file: Path) -> bytes | None:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _holds(cert: x509.Certificate, public_der: bytes) -> bool:
    found = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return found == public_der
