"""Secure endpoints: the server's own certificate, and the client certificates it accepts.

The server's certificate is ``<cert_dir>/server-cert.der`` (key ``server-key.pem``), created on
first start and reused while valid (:mod:`agent.protocols.opcua_certs`, shared with the driver).

On a secure endpoint (a security policy other than None), only the client application
certificates in ``trusted_clients_dir`` (default ``<cert_dir>/trusted-clients``, created empty)
are accepted, or those issued by a CA certificate there; any other is refused with
BadCertificateUntrusted, logged with its thumbprint and saved in ``<cert_dir>/rejected-clients``
for the operator to move. The certificate checked is the one the secure channel was opened with
(at CreateSession and again at ActivateSession); a CreateSession naming another is refused with
BadCertificateInvalid. The folder is read again when it changes. The None endpoint, when offered
too, takes any client: without security the certificate plays no part, and the one a client
names in CreateSession (node-opcua always names one) is ignored, as OPC UA Part 4 (5.7.2) says,
so it is neither checked nor saved.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.protocols.opcua_certs import ensure_certificate, load_certificate, thumbprint

if TYPE_CHECKING:
    from asyncua.server.server import Server

    from agent.uplinks.opcua_server.config import OpcUaServerConfig

log = logging.getLogger(__name__)

SERVER_CERT_FILE, SERVER_KEY_FILE = "server-cert.der", "server-key.pem"


@dataclass(frozen=True, slots=True)
class Channel:
    """The channel a client's requests come over: secured or not, and the client certificate it was opened with."""

    secure: bool
    certificate: bytes | None


# The channel of the connection being served. asyncua serves each connection in its own task and
# opens its channel there, so the value set then is the one its CreateSession and ActivateSession
# see; asyncua's validator and user manager are told nothing about the channel themselves.
CHANNEL: ContextVar[Channel | None] = ContextVar("opcua_server_channel", default=None)


class ChannelPolicy:
    """asyncua's security policy factory for one endpoint, noting each channel it opens in ``CHANNEL``.

    A None channel has no client certificate, whatever the client put in its OpenSecureChannel
    header: without security, certificates are neither provided nor verified (Part 4, 5.6.2).
    """

    def __init__(self, inner: Any) -> None:
        from asyncua.ua import MessageSecurityMode

        self.inner = inner
        self.secure = inner.mode != MessageSecurityMode.None_

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def matches(self, uri: str, mode: Any = None) -> bool:
        return bool(self.inner.matches(uri, mode))

    def create(self, peer_certificate: bytes | None) -> Any:
        if not self.secure:
            peer_certificate = None
        CHANNEL.set(Channel(self.secure, peer_certificate or None))
        return self.inner.create(peer_certificate)


class ClientTrust:
    """The client application certificates the server accepts: the files in one folder.

    A client certificate is trusted when the folder holds that very certificate (DER or PEM, any
    extension; how self-signed application certificates are trusted), or the CA certificate that
    issued it (checked by asyncua's TrustStore policy). The folder is read again when its
    listing changes, so trusting a client needs no restart. A refused certificate is saved in
    ``rejected`` (at most ``MAX_REJECTED`` files) for the operator to move to ``folder``.
    """

    MAX_REJECTED = 100

    def __init__(self, folder: Path, rejected: Path, *, create: bool) -> None:
        """``create``: make the folder if missing (the default folder starts empty)."""
        self.folder = folder
        self.rejected = rejected
        self.create = create
        self._listing: tuple[tuple[str, int, int], ...] | None = None
        self._pinned: set[bytes] = set()
        self._verifier: Any = None
        self._reported: set[str] = set()

    def refresh(self) -> None:
        """Read the folder again if its listing changed (name, size, mtime of each file)."""
        from asyncua.crypto.truststore import TrustStore
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        if self.create:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = sorted(p for p in self.folder.iterdir() if p.is_file()) if self.folder.is_dir() else []
        listing = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if listing == self._listing:
            return
        certs: list[x509.Certificate] = []
        for path in files:
            try:
                certs.append(load_certificate(path))
            except ValueError:
                log.warning("OPC UA server: %s is not a certificate (DER or PEM); ignored", path)
        self._pinned = {c.public_bytes(Encoding.DER) for c in certs}
        store_policy = TrustStore([], []).policy_builder  # asyncua's: issuers must be CA certificates
        self._verifier = store_policy.store(x509.verification.Store(certs)).build_client_verifier() if certs else None
        self._listing = listing
        (log.info if certs else log.warning)(
            "OPC UA server: %d trusted client certificate(s) in %s%s", len(certs), self.folder,
            "" if certs else "; every secure connection is refused until one is put there",
        )  # fmt: skip

    def trusted(self, der: bytes) -> bool:
        """Whether the DER certificate is one of the folder's, or issued by one of them; valid now."""
        from cryptography import x509

        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return False
        if der in self._pinned:
            return True
        if self._verifier is None:
            return False
        try:
            self._verifier.verify(cert, [])
        except x509.verification.VerificationError:
            return False
        return True

    def check(self, der: bytes | None, app_uri: str | None = None) -> bool:
        """Refresh, then :meth:`trusted`; a refused certificate is logged once and saved for review."""
        if not der:
            return False
        self.refresh()
        if self.trusted(der):
            return True
        self._reject(der, app_uri)
        return False

    async def validate(self, cert: Any, app: Any) -> None:
        """asyncua's certificate validator hook, called at CreateSession when the client names a certificate.

        On a None channel the certificate is ignored (OPC UA Part 4, 5.7.2: the Server shall ignore
        it if the securityPolicyUri is None). On a secure channel, the channel's certificate must be
        trusted (else BadCertificateUntrusted) and be the one named here (else BadCertificateInvalid).
        """
        from asyncua.common.utils import ServiceError
        from asyncua.ua.status_codes import StatusCodes
        from cryptography.hazmat.primitives.serialization import Encoding

        channel = CHANNEL.get()
        if channel is not None and not channel.secure:
            return
        named = cert.public_bytes(Encoding.DER)
        der = channel.certificate if channel is not None else named
        if not await asyncio.to_thread(self.check, der, getattr(app, "ApplicationUri", None)):
            raise ServiceError(StatusCodes.BadCertificateUntrusted)
        if named != der:
            log.warning("OPC UA server: session refused: CreateSession names another certificate than the one "
                        "the secure channel was opened with")  # fmt: skip
            raise ServiceError(StatusCodes.BadCertificateInvalid)

    def _reject(self, der: bytes, app_uri: str | None) -> None:
        from cryptography import x509

        thumb = thumbprint(der)
        if thumb in self._reported:
            return
        self._reported.add(thumb)
        saved = self.rejected / f"{thumb}.der"
        try:
            self.rejected.mkdir(parents=True, exist_ok=True, mode=0o700)
            if len(list(self.rejected.iterdir())) < self.MAX_REJECTED:
                saved.write_bytes(der)
            else:
                saved = Path("(not saved: rejected-clients is full)")
        except OSError as exc:
            saved = Path(f"(not saved: {exc.strerror})")
        try:
            subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        except ValueError:
            subject = "?"
        log.warning("OPC UA server: client certificate refused, not trusted: %s, application URI %s, SHA-1 "
                    "thumbprint %s; saved as %s: move it to %s to trust it", subject, app_uri or "?", thumb,
                    saved, self.folder)  # fmt: skip


async def secure(server: Server, config: OpcUaServerConfig, uri: str) -> tuple[str, ClientTrust]:
    """Give ``server`` its certificate and the trust list of ``config``: (SHA-1 thumbprint, trust list).

    Raises:
        ValueError: the certificate cannot be created or read.
    """
    assert config.cert_dir is not None
    cert = await asyncio.to_thread(ensure_certificate, config.cert_dir, application_uri=uri, server=True,
                                   cert_file=SERVER_CERT_FILE, key_file=SERVER_KEY_FILE,
                                   name="edge-agent server")  # fmt: skip
    if cert.created:
        log.warning("OPC UA server certificate created: %s", cert.cert_path)
    await server.load_certificate(str(cert.cert_path))
    await server.load_private_key(str(cert.key_path))
    log.info("OPC UA server certificate %s: SHA-1 thumbprint %s", cert.cert_path, cert.thumbprint)
    trust = ClientTrust(config.trusted_clients_dir or config.cert_dir / "trusted-clients",
                        config.cert_dir / "rejected-clients", create=config.trusted_clients_dir is None)  # fmt: skip
    await asyncio.to_thread(trust.refresh)
    # On a secure channel the client's certificate is checked twice: at CreateSession (asyncua's
    # validator hook, run only when the client names a certificate there), and at
    # ActivateSession (the user manager), in case it named none. Both check the channel's
    # own certificate; on a None channel neither checks anything (ChannelPolicy tells them).
    server.set_certificate_validator(trust.validate)
    if "None" in config.security_policies:
        log.warning("OPC UA server: the None endpoint takes any client, with or without a certificate (no "
                    "certificate is checked without security); %s applies to the secure endpoints only",
                    trust.folder)  # fmt: skip
    return cert.thumbprint, trust
