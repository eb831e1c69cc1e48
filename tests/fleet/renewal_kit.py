"""A test CA made with ``cryptography``: roots, client certificates from CSRs, the broker's certificate."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not ca, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class KitCA:
    """A self-signed root that signs client certificates (EKU clientAuth) and a broker certificate."""

    def __init__(self, name: str = "test root", now: datetime | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        start = (now or datetime.now(UTC)) - 400 * DAY
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + 4000 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def _leaf(
        self, public: ec.EllipticCurvePublicKey, cn: str, not_before: datetime, days: float, server: bool = False
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + days * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def from_csr(self, csr_pem: bytes, cn: str, not_before: datetime, days: float = 90) -> x509.Certificate:
        """A client certificate for the CSR's key (its signature checked), CN chosen here."""
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return self._leaf(public, cn, not_before, days)

    def client(self, folder: Path, cn: str, *, days: float = 90, start: datetime | None = None) -> tuple[Path, Path]:
        """A new key and client certificate as ``cert.pem`` and ``key.pem`` (0600) in ``folder``."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(key.public_key(), cn, start or datetime.now(UTC) - DAY, days)
        (folder / "cert.pem").write_bytes(cert_pem(cert))
        (folder / "key.pem").write_bytes(key_pem(key))
        for name in ("cert.pem", "key.pem"):
            (folder / name).chmod(0o600)
        return folder / "cert.pem", folder / "key.pem"

    def server(self, folder: Path) -> Path:
        """The broker's key and certificate in one PEM file (localhost, 127.0.0.1)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(key.public_key(), "localhost", datetime.now(UTC) - DAY, 30, server=True)
        path = folder / "server.pem"
        path.write_bytes(key_pem(key) + cert_pem(cert))
        return path
