"""OPC UA test parts: a simulated PLC on its own event loop thread, a PLC that only accepts login
certificates, user certificates, and a recording DriverContext."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.server.user_managers import CertificateUserManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from drivers.opcua.certs import ensure_certificate
from drivers.opcua.simulator import SimulatedPlc
from drivers.opcua.uanames import Server, node_id
from tests.conftest import Recorder  # noqa: F401 - re-exported for the OPC UA tests


class ThreadedPlc:
    """A SimulatedPlc served from a background thread, so it outlives each test's asyncio.run.

    Module-scoped fixtures use it: an asyncua server takes seconds to build its address space.
    """

    def __init__(self, plc: SimulatedPlc) -> None:
        self.plc = plc
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="opcua-plc", daemon=True)
        self.thread.start()
        self.call(plc.start())

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def acall(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """The same, awaitable from a test's own event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.call(self.plc.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass(frozen=True)
class UserCert:
    """A login certificate: PEM files named as operators get them (``.crt``/``.key``), and the DER copy."""

    cert: Path
    key: Path
    der: Path


def make_user_certificate(folder: Path, name: str) -> UserCert:
    """A self-signed user certificate (CN=name) and its key; what a plant's PKI would hand out."""
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    out = UserCert(folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.der")
    out.cert.write_bytes(cert.public_bytes(Encoding.PEM))
    out.key.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    out.der.write_bytes(cert.public_bytes(Encoding.DER))
    return out


class CertificateLoginPlc:
    """An asyncua server whose only login is an X509 identity token with one trusted user certificate.

    Basic256Sha256/SignAndEncrypt only: the token's signature covers the server certificate,
    which the client takes from the secure channel.
    """

    def __init__(self, port: int, cert_dir: Path, trusted_user: Path) -> None:
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self.cert_dir = cert_dir
        self.trusted_user = trusted_user
        self.server: Server | None = None
        self.flow: ua.NodeId | None = None

    async def start(self) -> None:
        users = CertificateUserManager()
        await users.add_user(self.trusted_user, name="operator")
        server = Server(user_manager=users)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.endpoint)
        cert = ensure_certificate(self.cert_dir, application_uri="urn:test:certificate-plc", server=True,
                                  cert_file="server-cert.der", key_file="server-key.pem")  # fmt: skip
        await server.set_application_uri(cert.application_uri)
        await server.load_certificate(str(cert.cert_path))
        await server.load_private_key(str(cert.key_path))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        server.set_identity_tokens([ua.X509IdentityToken])
        ns = await server.register_namespace("urn:test:certificate-plc:values")
        plc = await server.nodes.objects.add_object(node_id("PLC", ns), ua.QualifiedName("PLC", ns))
        var = await plc.add_variable(node_id("Flow", ns), ua.QualifiedName("Flow", ns),
                                     ua.Variant(1.0, ua.VariantType.Double))  # fmt: skip
        self.flow = var.nodeid
        await server.start()
        self.server = server

    async def set_flow(self, value: float) -> None:
        assert self.server is not None and self.flow is not None
        await self.server.write_attribute_value(self.flow, ua.DataValue(ua.Variant(value, ua.VariantType.Double)))

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
