"""The gateway's OPC UA application instance certificates: created on first run, then reused.

One helper for both sides of the gateway: the ``opcua`` driver's client certificate
(``client-cert.der``) and the OPC UA server's own (``server-cert.der``, ``uplink.opcua``).

A peer accepts a secure channel only from an application whose certificate it trusts, so the
certificate must stay the same across restarts (a new one has to be trusted again) and its
SHA-1 thumbprint is logged: that is what a PLC's engineering tool or a SCADA client shows next
to a rejected certificate. Several devices (and the ``browse`` tool) may share one folder, so
creation is serialised with a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

CERT_FILE = "client-cert.der"
KEY_FILE = "client-key.pem"
VALID_DAYS = 3650  # re-trusting a certificate on every peer is costly; ten years, like most vendors' tools
RENEW_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class AppCertificate:
    """Where the pair is and what a technician needs to trust it."""

    cert_path: Path
    key_path: Path
    application_uri: str
    thumbprint: str
    not_after: datetime
    created: bool


def thumbprint(der: bytes) -> str:
    """SHA-1 of the DER certificate in upper-case hex, as PLC tools and UaExpert display it."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def is_pem(data: bytes) -> bool:
    """Whether a certificate or key file is PEM (else DER): OPC UA tools write both, whatever the extension."""
    return data.lstrip().startswith(b"-----BEGIN")


def load_certificate(path: Path) -> x509.Certificate:
    """A certificate file, DER or PEM (OPC UA tools write both, whatever the extension says).

    Raises:
        ValueError: the file is neither.
    """
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data) if is_pem(data) else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a DER or PEM certificate ({exc})") from exc


def default_application_uri() -> str:
    """``urn:<hostname>:edge-agent``: unique per gateway, readable in a PLC's trust list."""
    return f"urn:{socket.gethostname()}:edge-agent"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _uri_of(cert: x509.Certificate) -> str | None:
    with contextlib.suppress(x509.ExtensionNotFound):
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found = uris.get_values_for_type(x509.UniformResourceIdentifier)
        return found[0] if found else None
    return None


def _generate(application_uri: str, *, server: bool, name: str) -> tuple[bytes, bytes]:
    """(DER certificate, PEM key): self-signed, with the URI and host name OPC UA checks."""
    from asyncua.crypto.cert_gen import generate_self_signed_app_certificate

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    usage = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    host = socket.gethostname()
    cert = generate_self_signed_app_certificate(
        key,
        f"{name}@{host}",
        {},
        [x509.UniformResourceIdentifier(application_uri), x509.DNSName(host)],
        extended=usage,
        days=VALID_DAYS,
    )
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return cert.public_bytes(Encoding.DER), pem


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _usable(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, str] | None:
    """The existing certificate and why it cannot be used ('' if it can), or None if absent."""
    if not (cert_path.is_file() and key_path.is_file()):
        return None
    try:
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
        key = load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{cert_path} or {key_path} cannot be read ({exc}); remove both to create a new pair") from exc
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{key_path} is not the key of {cert_path}; remove both to create a new pair")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        return cert, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    return cert, ""


def ensure_certificate(
    folder: Path,
    *,
    application_uri: str | None = None,
    server: bool = False,
    cert_file: str = CERT_FILE,
    key_file: str = KEY_FILE,
    name: str = "edge-agent",
) -> AppCertificate:
    """Load the pair in ``folder``, creating it (and the folder) if missing or expired.

    ``server``: a server's certificate (usable for both ends of a channel), which clients trust;
    else a client's, which servers trust. ``name``: the subject's common name, before ``@<host>``.

    Raises:
        ValueError: the folder cannot be written, or the files are unreadable or do not match.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ValueError(f"cannot create cert_dir {folder}: {exc.strerror}") from exc
    cert_path, key_path = folder / cert_file, folder / key_file
    try:
        with _locked(folder):
            existing = _usable(cert_path, key_path)
            if existing is not None and not existing[1]:
                cert = existing[0]
                return _describe(cert, cert_path, key_path, created=False, server=server)
            if existing is not None:
                log.warning("OPC UA certificate %s %s: creating a new one (it must be trusted again)", cert_path,
                            existing[1])  # fmt: skip
            uri = (existing and _uri_of(existing[0])) or application_uri or default_application_uri()
            der, pem = _generate(uri, server=server, name=name)
            _write_private(key_path, pem, 0o600)
            _write_private(cert_path, der, 0o644)
    except OSError as exc:
        raise ValueError(f"cannot write the OPC UA certificate in {folder}: {exc.strerror or exc}") from exc
    return _describe(x509.load_der_x509_certificate(der), cert_path, key_path, created=True, server=server)


def _describe(
    cert: x509.Certificate, cert_path: Path, key_path: Path, *, created: bool, server: bool
) -> AppCertificate:
    der = cert.public_bytes(Encoding.DER)
    info = AppCertificate(cert_path, key_path, _uri_of(cert) or default_application_uri(), thumbprint(der),
                          cert.not_valid_after_utc, created)  # fmt: skip
    if info.not_after - datetime.now(UTC) < RENEW_WARNING:
        log.warning("OPC UA certificate %s expires on %s: delete it (and its key) to create a new one, then trust "
                    "the new one on the %s", cert_path, f"{info.not_after:%Y-%m-%d}",
                    "clients" if server else "servers")  # fmt: skip
    return info
