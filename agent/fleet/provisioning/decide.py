"""One request in, one answer out: the responder's rules, without the broker.

Checked in this order, each refusal naming the field: the rate limit (``retry``), the JSON,
the serial, the allow-list, revocation, one certificate per serial (claims), the gateway of a
renewal, then the CSR (proof of possession, EC P-256). The CN is always the allow-list's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from agent.fleet.provisioning.ca import CsrRefused, Issuer
from agent.fleet.provisioning.config import SERIAL_PATTERN, Allowed, ResponderConfig
from agent.fleet.provisioning.ledger import Issued, Ledger
from agent.fleet.provisioning.ratelimit import TokenBucket

MAX_REQUEST_BYTES = 16 * 1024
REFUSED_RETRY_AFTER = 3600.0  # a refusal an operator must act on: the gateway asks again in an hour
NONCE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Request:
    """Where a request came from: ``who`` is the claim CN or the gateway id in its topic."""

    kind: Literal["claim", "renewal"]
    who: str
    serial: str | None  # the serial in a claim's topic
    payload: bytes


@dataclass(frozen=True)
class Decision:
    """The answer to publish and the line to log."""

    answer: dict[str, Any]
    outcome: str  # issued | refused | retry
    serial: str
    gateway_id: str
    reason: str


class Decider:
    """The responder's rules over its config, CA, ledger and rate limit."""

    def __init__(self, config: ResponderConfig, issuer: Issuer, ledger: Ledger, bucket: TokenBucket) -> None:
        """Holds them; the ledger is written on each issuance."""
        self.config = config
        self.issuer = issuer
        self.ledger = ledger
        self.bucket = bucket

    def decide(self, request: Request, *, paced: bool = False) -> Decision:
        """The answer to ``request``; ``paced``: its slot was reserved (:meth:`TokenBucket.reserve`)."""
        doc = _parse(request.payload)
        nonce = doc.get("nonce") if isinstance(doc, dict) else None
        nonce = nonce if isinstance(nonce, str) and NONCE.match(nonce) else ""
        serial = request.serial or (doc.get("serial") if isinstance(doc, dict) else None) or ""
        serial = serial if isinstance(serial, str) else ""

        def no(reason: str, status: str = "refused", after: float = REFUSED_RETRY_AFTER, gw: str = "") -> Decision:
            answer = {"status": status, "nonce": nonce, "reason": reason, "retry_after": after}
            return Decision(answer, status, serial[:64], gw, reason)

        wait = 0.0 if paced else self.bucket.take()
        if wait:
            return no(f"rate limit of {self.config.rate_limit:g}/s reached", "retry", wait)
        if not isinstance(doc, dict):
            return no("request: not a JSON object (or larger than 16 KiB)")
        if not nonce:
            return no("nonce: missing or not 128-bit lowercase hex")
        if not re.match(SERIAL_PATTERN, serial):
            return no("serial: missing or not a serial")
        if request.serial is not None and doc.get("serial") != request.serial:
            return no("serial: differs from the serial in the topic")
        if request.kind == "claim" and self.config.claim_names and request.who not in self.config.claim_names:
            return no(f"claim identity {request.who!r} is not in claim_names")
        allowed = self.config.by_serial(serial)
        if allowed is None:
            return no(f"serial {serial}: not on the allow-list", after=self.config.unknown_retry_after)
        gw = allowed.gateway_id
        if allowed.revoked:
            return no(f"serial {serial}: revoked", gw=gw)
        issued = self.ledger.issued(serial)
        if request.kind == "claim" and issued and not allowed.reprovision:
            return no(f"serial {serial}: already provisioned as {gw}; reprovision is not allowed for it", gw=gw)
        if request.kind == "renewal":
            if request.who != gw:
                return no(f"serial {serial}: belongs to {gw}, not to {request.who}", gw=request.who)
            if not issued:
                return no(f"gateway {gw}: never provisioned: claim first", gw=gw)
        csr = doc.get("csr")
        if not isinstance(csr, str):
            return no("csr: missing", gw=gw)
        try:
            cert = self.issuer.issue(csr, gw, self.config.validity_days)
        except CsrRefused as exc:
            return no(str(exc), gw=gw)
        return self._issued(request, allowed, serial, nonce, cert)

    def _issued(self, request: Request, allowed: Allowed, serial: str, nonce: str, cert: Any) -> Decision:
        not_after = cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        # Recorded before the answer leaves: a crash in between costs a certificate, never a double issue.
        self.ledger.add(
            serial, Issued(format(cert.serial_number, "x"), allowed.gateway_id, not_after, now, request.kind)
        )
        answer = {
            "status": "issued",
            "nonce": nonce,
            "gateway_id": allowed.gateway_id,
            "certificate_chain": self.issuer.chain_for(cert),
            "brokers": [b.model_dump() for b in self.config.brokers],
            "config_version": self.config.config_version,
            "groups": list(allowed.groups),
            "not_after": not_after,
        }
        return Decision(answer, "issued", serial, allowed.gateway_id, f"{request.kind}, valid until {not_after}")

    def revoked(self) -> list[Issued]:
        """Every certificate issued to an allow-list entry marked revoked."""
        return [i for a in self.config.allow if a.revoked for i in self.ledger.issued(a.serial)]


def _parse(payload: bytes) -> Any:
    if len(payload) > MAX_REQUEST_BYTES:
        return None
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
