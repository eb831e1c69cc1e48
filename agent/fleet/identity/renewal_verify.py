"""Checking a renewal answer before anything is written: one function, :func:`verify_answer`,
the answer's fields here and its chain as the claim checks it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.fleet.identity.verify import AnswerRefused, check_chain

__all__ = ["AnswerRefused", "Issued", "verify_answer"]


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
    """An ``issued`` answer to our request whose chain ends at ``roots``, holds ``pending_key`` and
    names ``gateway_id`` (the claim's :func:`~agent.fleet.identity.verify.check_chain`).

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
    leaf = check_chain(text, roots, pending_key, gateway_id, now)
    return Issued(text.encode(), leaf, answer)
