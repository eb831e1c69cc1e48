"""A simulated PLC on a real asyncua server: pumps with flow, pressure, a running flag and an energy counter.

Every scan (``rate`` per second) writes all variables with one source timestamp, as a PLC
stamps its process image, so a scan arrives at the driver as one batch and becomes one event.
Used by ``edge-agent simulate opcua``, the tests and ``bench/opcua.py``.

Address space (namespace ``urn:edge-agent:simulated-plc``, index 2 on a fresh server)::

    Objects/PLC/Pump<n>/Flow      ns=2;s=Pump<n>.Flow       Double   m3/h
                       /Pressure  ns=2;s=Pump<n>.Pressure   Double   bar
                       /Running   ns=2;s=Pump<n>.Running    Boolean  (Speed, Double rpm, with analog_only)
                       /Energy    ns=2;s=Pump<n>.Energy     Double   kWh, only increases
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole

from agent.protocols.opcua_certs import ensure_certificate
from drivers.opcua.uanames import Server, StatusCodes, data_value, node_id

log = logging.getLogger(__name__)

NAMESPACE = "urn:edge-agent:simulated-plc"
SECURE_POLICIES = [
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
]


@dataclass
class _Signal:
    """One simulated variable and how it evolves."""

    name: str
    node: ua.NodeId
    kind: str
    value: float | bool
    variant: ua.VariantType
    changes: int = 0  # value changes made by scans: bench/opcua.py accounts for each variable


class _Users:
    """asyncua user manager: a fixed user table, anonymous optional; nobody is admin."""

    def __init__(self, users: dict[str, str], allow_anonymous: bool) -> None:
        self.users = users
        self.allow_anonymous = allow_anonymous

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:  # fmt: skip
        # asyncua passes the secure channel's certificate for every token type, so no user name
        # means anonymous here: user certificate tokens are not offered (set_identity_tokens).
        del iserver, certificate
        if username is None:
            return User(role=UserRole.User) if self.allow_anonymous else None
        expected = self.users.get(username or "")
        if expected is not None and hmac.compare_digest(expected.encode(), (password or "").encode()):
            return User(role=UserRole.User, name=username)
        return None


class SimulatedPlc:
    """An OPC UA server with ``variables`` changing ``rate`` times a second."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        variables: int = 100,
        rate: float = 10.0,
        analog_only: bool = False,
        cert_dir: Path | None = None,
        users: dict[str, str] | None = None,
        allow_anonymous: bool = True,
        seed: int | None = None,
    ) -> None:
        """Configure; :meth:`start` builds the address space and listens."""
        self.endpoint = f"opc.tcp://{host}:{port}"
        self.variables = variables
        self.rate = rate
        self.analog_only = analog_only
        self.cert_dir = cert_dir
        self.users = users or {}
        self.allow_anonymous = allow_anonymous
        self.rng = random.Random(seed)
        self.server: Server | None = None
        self.signals: dict[str, _Signal] = {}
        self.scans = 0
        self.changes = 0
        self.namespace = 0
        self.thumbprint: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Build the server and start the scan loop (``rate`` 0: values change only through :meth:`set`)."""
        server = Server(user_manager=_Users(self.users, self.allow_anonymous))  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-agent simulated PLC")
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self.cert_dir is not None:
            cert = ensure_certificate(self.cert_dir, application_uri="urn:edge-agent:simulated-plc:server", server=True,
                                      cert_file="server-cert.der", key_file="server-key.pem")  # fmt: skip
            await server.set_application_uri(cert.application_uri)
            await server.load_certificate(str(cert.cert_path))
            await server.load_private_key(str(cert.key_path))
            self.thumbprint = cert.thumbprint
            policies += SECURE_POLICIES
        server.set_security_policy(policies)
        tokens: list[type] = [ua.UserNameIdentityToken] if self.users else []
        if self.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        self.namespace = await server.register_namespace(NAMESPACE)
        await self._build(server)
        await server.start()
        self.server = server
        if self.rate > 0:
            self._task = asyncio.create_task(self._scan_loop())

    async def _build(self, server: Server) -> None:
        ns = self.namespace
        plc = await server.nodes.objects.add_object(node_id("PLC", ns), ua.QualifiedName("PLC", ns))
        kinds = ["Flow", "Pressure", "Speed" if self.analog_only else "Running", "Energy"]
        pump = None
        for i in range(self.variables):
            number, kind = i // 4 + 1, kinds[i % 4]
            if i % 4 == 0:
                pump = await plc.add_object(node_id(f"Pump{number}", ns), ua.QualifiedName(f"Pump{number}", ns))
            assert pump is not None
            name = f"Pump{number}.{kind}"
            value: float | bool = {"Flow": 40.0, "Pressure": 4.0, "Speed": 1450.0, "Running": True,
                                   "Energy": 1000.0 * number}[kind]  # fmt: skip
            variant = ua.VariantType.Boolean if kind == "Running" else ua.VariantType.Double
            node = await pump.add_variable(node_id(name, ns), ua.QualifiedName(kind, ns), ua.Variant(value, variant))
            self.signals[name] = _Signal(name, node.nodeid, kind, value, variant)

    def node_id(self, name: str) -> str:
        """``ns=2;s=Pump1.Flow`` for ``Pump1.Flow``."""
        return self.signals[name].node.to_string()

    def _next(self, s: _Signal) -> float | bool:
        rng = self.rng
        if s.kind == "Running":
            return (not s.value) if rng.random() < 0.01 else s.value
        assert isinstance(s.value, float)
        if s.kind == "Energy":
            return round(s.value + rng.uniform(0.001, 0.01), 4)  # a counter: never goes back
        spread = {"Flow": 0.5, "Pressure": 0.05, "Speed": 5.0}[s.kind]
        return round(max(0.0, s.value + rng.gauss(0.0, spread)), 4) or 0.0001

    async def _scan_loop(self) -> None:
        period = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.scan()
            next_at += period
            delay = next_at - loop.time()
            if delay < 0:  # overran: skip the missed scans rather than bunch them up
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    async def scan(self) -> datetime:
        """One PLC scan: every variable gets its next value, all with one source timestamp (returned)."""
        assert self.server is not None
        stamp = datetime.now(UTC)
        write = self.server.write_attribute_value
        for s in self.signals.values():
            value = self._next(s)
            if value != s.value:
                self.changes += 1
                s.changes += 1
            s.value = value
            await write(s.node, data_value(ua.Variant(value, s.variant), StatusCodes.Good, stamp, stamp))
        self.scans += 1
        return stamp

    async def set(self, name: str, value: Any, *, status: int = StatusCodes.Good,
                  source_time: datetime | None = None) -> datetime:  # fmt: skip
        """Write one variable with a status code and source time (default now); returns the source time."""
        assert self.server is not None
        s = self.signals[name]
        stamp = source_time or datetime.now(UTC)
        if value is not None:
            s.value = value
        variant = ua.Variant(value, s.variant) if value is not None else ua.Variant()
        await self.server.write_attribute_value(s.node, data_value(variant, status, stamp, datetime.now(UTC)))
        return stamp

    async def stop(self) -> None:
        """Stop scanning and close every connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
