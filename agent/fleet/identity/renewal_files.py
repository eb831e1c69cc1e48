"""The renewal's side of the identity folder (files.py): the new chain waits as ``cert.next.pem``
until the broker accepted it; a refused one goes, with its pending key."""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import UTC, datetime

from cryptography import x509

from agent.fleet.identity.files import CERT_NEXT, KEY_NEXT, IdentityFiles


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


class Chains:
    """``cert.next.pem`` written, promoted or dropped; ``identity.json`` told the new expiry."""

    def __init__(self, files: IdentityFiles) -> None:
        """``files``: the identity folder."""
        self.files = files

    def write_cert_next(self, chain_pem: bytes) -> None:
        """The answer's chain as ``cert.next.pem`` (0600, atomic)."""
        self.files.write_cert_next(chain_pem)

    def promote_cert(self) -> None:
        """``cert.next.pem`` becomes ``cert.pem`` (after the key store promoted the key)."""
        self.files.promote_cert()

    def discard_next(self) -> None:
        """Forget a renewal that failed: the new chain and (file store) the pending key go."""
        for name in (CERT_NEXT, KEY_NEXT):
            with contextlib.suppress(FileNotFoundError):
                self.files.path(name).unlink()

    def record(self, leaf: x509.Certificate) -> None:
        """``identity.json`` gets the new certificate's ``not_after`` and ``issued_at``."""
        with contextlib.suppress(ValueError):
            identity = self.files.identity()
            if identity is not None:
                self.files.write_identity(
                    dataclasses.replace(
                        identity, not_after=_rfc3339(leaf.not_valid_after_utc), issued_at=_rfc3339(datetime.now(UTC))
                    )
                )
