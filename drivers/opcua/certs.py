"""Login certificates (OPC UA X509 identity tokens) the driver signs in with.

The gateway's application certificate, which the secure channel uses, is shared with the OPC UA
server: :mod:`agent.protocols.opcua_certs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, load_der_private_key, load_pem_private_key

from agent.protocols.opcua_certs import is_pem, load_certificate, thumbprint


@dataclass(frozen=True)
class UserIdentity:
    """A login certificate (OPC UA X509 identity token) with its private key, loaded once."""

    certificate: x509.Certificate
    key: PrivateKeyTypes
    thumbprint: str


def load_user_identity(cert_path: Path, key_path: Path) -> UserIdentity:
    """The login certificate and its key, DER or PEM whatever the file names say.

    asyncua's own loaders guess the format from the extension, so a PEM key named ``user.key``
    would fail on every connect with an unreadable error; loading it here fails once, at start.

    Raises:
        ValueError: either file cannot be read, or the key is not the certificate's.
    """
    cert = load_certificate(cert_path)
    data = key_path.read_bytes()
    try:
        key = load_pem_private_key(data, password=None) if is_pem(data) else load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"user_private_key {key_path} cannot be read (an unencrypted PEM or DER key): {exc}") from exc
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"user_private_key {key_path} is not the key of user_certificate {cert_path}")
    return UserIdentity(cert, key, thumbprint(cert.public_bytes(Encoding.DER)))
