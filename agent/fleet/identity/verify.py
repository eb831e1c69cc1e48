"""Whether an issued answer may be believed: its chain ends at our CA, holds our key, names our id.

Checked with cryptography's X.509 verification (RFC 5280 path building: every signature,
every validity period, the CA's constraints); then the leaf must hold the pending public key,
have CN = the gateway id the answer gives, and allow clientAuth.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class AnswerRefused(Exception):
    """An answer the gateway does not accept; the message names why in one line."""


def load_roots(ca_file: Path) -> list[x509.Certificate]:
    """The CA certificates of ``fleet.identity.ca_file``.

    Raises:
        AnswerRefused: unreadable or holds no certificate (naming the file).
    """
    try:
        roots = x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise AnswerRefused(f"fleet.identity.ca_file {ca_file}: {exc}") from None
    return roots


def check_chain(
    chain_pem: str,
    roots: list[x509.Certificate],
    public_key: ec.EllipticCurvePublicKey,
    gateway_id: str,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The verified leaf of ``chain_pem``.

    Raises:
        AnswerRefused: naming the first thing wrong.
    """
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError as exc:
        raise AnswerRefused(f"certificate_chain: not PEM certificates ({exc})") from None
    leaf, intermediates = chain[0], chain[1:]
    mine = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mine != theirs:
        raise AnswerRefused("certificate_chain: the certificate does not hold this gateway's pending key")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name != gateway_id:
        raise AnswerRefused(f"certificate_chain: CN {common_name[:64]!r} is not the gateway_id {gateway_id!r}")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise AnswerRefused("certificate_chain: the certificate does not allow clientAuth")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(now or dt.datetime.now(dt.UTC))
        .extension_policies(ee_policy=_ee_policy(), ca_policy=verification.ExtensionPolicy.webpki_defaults_ca())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise AnswerRefused(f"certificate_chain: does not verify up to fleet.identity.ca_file ({exc})") from None
    return leaf


def _ee_policy() -> verification.ExtensionPolicy:
    """The Web PKI's end-entity rules, except that no subjectAltName is needed: the CN names the gateway."""
    return verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
