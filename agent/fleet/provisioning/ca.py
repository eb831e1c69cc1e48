"""Certificates: the responder's issuance from a CSR, and a lab's CA and claim certificates.

Issued leaves: CN from the allow-list (never the CSR's), EKU clientAuth, key usage
digitalSignature, basicConstraints CA:false, subject and authority key identifiers (RFC 5280
path building, as cryptography's verifier and OpenSSL expect).
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BACKDATE = dt.timedelta(minutes=5)  # a gateway clock a little behind still accepts a fresh certificate


class CsrRefused(Exception):
    """A CSR the responder will not sign; the message names the field and why."""


@dataclass(frozen=True)
class Issuer:
    """The issuing CA: its certificate chain (leaf first) and key."""

    cert: x509.Certificate
    chain_pem: bytes  # the issuing CA's chain without the root, appended to each leaf
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> Issuer:
        """From PEM files; ValueError naming the file."""
        try:
            certs = x509.load_pem_x509_certificates(cert_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"ca.cert_file {cert_file}: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"ca.key_file {key_file}: not a readable unencrypted PEM key ({type(exc).__name__})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"ca.key_file {key_file}: an EC key is expected")
        if certs[0].public_key() != key.public_key():
            raise ValueError(f"ca.key_file {key_file}: not the key of ca.cert_file {cert_file}")
        # Roots are left out: the gateway has its own (fleet.identity.ca_file).
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs if c.issuer != c.subject)
        return cls(certs[0], pem, key)

    def issue(self, csr_pem: str, common_name: str, days: int, now: dt.datetime | None = None) -> x509.Certificate:
        """A client certificate for the CSR's key, named ``common_name``.

        Raises:
            CsrRefused: not a CSR, its signature does not verify (no proof of possession), or not EC P-256.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise CsrRefused("csr: not a PEM certificate signing request") from None
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
            raise CsrRefused("csr: key type must be EC P-256")
        if not csr.is_signature_valid:
            raise CsrRefused("csr: signature does not verify (no proof of possession of the key)")
        now = now or dt.datetime.now(dt.UTC)
        return client_certificate(
            self.cert, self.key, public, common_name, now - BACKDATE, now + dt.timedelta(days=days)
        )

    def chain_for(self, leaf: x509.Certificate) -> str:
        """The answer's certificate_chain: the leaf, then the issuing CA's chain up to (not including) the root."""
        return (leaf.public_bytes(serialization.Encoding.PEM) + self.chain_pem).decode()


def client_certificate(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public: ec.EllipticCurvePublicKey,
    common_name: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A clientAuth leaf for ``public`` signed by ``ca``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def make_ca(common_name: str, days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 CA (for a lab; a production root stays offline)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (write it 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
