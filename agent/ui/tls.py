"""The page's own certificate: ECDSA P-256, self-signed, made at first start for the address it serves.

Off loopback the page is HTTPS only. Nobody can vouch for a gateway's address on a site LAN,
so the technician checks the SHA-256 fingerprint that ``edge-agent ui info`` prints against the
one the browser shows. The key never leaves the state folder (0600).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ui.state import write_private

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
VALID_DAYS = 3650  # a gateway lives in a cabinet for years; the fingerprint, not the date, is what is checked


def certificate_paths(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) files in the state folder."""
    return folder / CERT_FILE, folder / KEY_FILE


def ensure_certificate(folder: Path, host: str, name: str) -> tuple[Path, Path]:
    """The certificate for ``host`` (an IP address), made if missing or made for another address."""
    cert_path, key_path = certificate_paths(folder)
    if cert_path.exists() and key_path.exists() and host in _addresses(cert_path):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edge-agent {name}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    """``AB:CD:...``: the SHA-256 of the certificate, as browsers show it."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _addresses(cert_path: Path) -> list[str]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(a) for a in names.get_values_for_type(x509.IPAddress)]
