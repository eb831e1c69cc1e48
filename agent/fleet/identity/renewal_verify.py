"""Checking a renewal answer before anything is written: one function, :func:`verify_answer`.

The claim flow checks its answers the same way (the shared spec); when its verifier lands,
this function is the one place to swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError


class AnswerRefused(ValueError):
    """The answer is not usable; the message names the field and why."""


@dataclass(frozen=True)
class Issued:
    """A checked ``issued`` answer."""

    chain_pem: bytes
    leaf: x509.Certificate
    answer: dict[str, Any]


def verify_answer(
    answer: dict[str, Any],
    *,
    nonce: str,
    gateway_id: str,
    pending_key: ec.EllipticCurvePublicKey,
    roots: list[x509.Certificate],
    now: datetime,
) -> Issued:
    """An ``issued`` answer whose chain ends at ``roots``, holds ``pending_key`` and names ``gateway_id``.

    Raises:
        AnswerRefused: naming the field (``status``, ``nonce``, ``certificate_chain``, ...) and why.
    """
    if answer.get("nonce") != nonce:
        raise AnswerRefused("nonce: not the one this request sent")
    status = answer.get("status")
    if status != "issued":
        reason = str(answer.get("reason") or "no reason given")[:200]
        raise AnswerRefused(f"status: {str(status)[:20]!r} ({reason})")
    if answer.get("gateway_id") != gateway_id:
        raise AnswerRefused(f"gateway_id: {str(answer.get('gateway_id'))[:64]!r}, this gateway is {gateway_id!r}")
    text = answer.get("certificate_chain")
    if not isinstance(text, str) or "-----BEGIN CERTIFICATE-----" not in text:
        raise AnswerRefused("certificate_chain: missing or not PEM")
    try:
        chain = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise AnswerRefused(f"certificate_chain: cannot be read ({exc})") from exc
    leaf = chain[0]
    if leaf.public_key() != pending_key:
        raise AnswerRefused("certificate_chain: the leaf does not hold this gateway's new public key")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [gateway_id]:
        raise AnswerRefused(f"certificate_chain: the leaf's CN is not {gateway_id!r}")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise AnswerRefused("certificate_chain: the leaf is not for client authentication (extendedKeyUsage)")
    # Client certificates carry no subjectAltName here (the CN is the broker user name).
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, chain[1:])
    except VerificationError as exc:
        raise AnswerRefused(f"certificate_chain: does not verify up to fleet.identity.ca_file ({exc})") from exc
    return Issued(text.encode(), leaf, answer)


def load_roots(pem: bytes) -> list[x509.Certificate]:
    """The CA file's certificates."""
    return x509.load_pem_x509_certificates(pem)
