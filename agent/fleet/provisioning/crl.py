"""The CRL Mosquitto's ``crlfile`` reads: every certificate of a revoked allow-list entry."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.fleet.provisioning.ca import Issuer
from agent.fleet.provisioning.ledger import Issued


def write_crl(path: Path, issuer: Issuer, revoked: list[Issued], days: int, now: dt.datetime | None = None) -> None:
    """Write a CRL signed by the issuing CA (PEM; not secret, mode 0644), atomically."""
    now = now or dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(entry.serial_number, 16)).revocation_date(now).build()
        )
    crl = builder.sign(issuer.key, hashes.SHA256())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.chmod(0o644)
    tmp.replace(path)
