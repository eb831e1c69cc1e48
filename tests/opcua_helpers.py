"""OPC UA test parts shared by the driver's tests and the gateway server's: a simulated PLC on its
own event loop thread and a module's certificates, a PLC that only accepts login certificates,
user certificates, a recording DriverContext, and node-opcua scripts as subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.server.user_managers import CertificateUserManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from agent.protocols.opcua_certs import ensure_certificate
from agent.uplinks.opcua_server.config import OpcUaServerConfig
from agent.uplinks.opcua_server.server import OpcUaServer
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.simulator import SimulatedPlc
from drivers.opcua.uanames import Server, node_id
from tests.conftest import ROOT, Recorder, free_port  # noqa: F401 - Recorder re-exported for the OPC UA tests
from tests.npm_peers import node_with_packages

PASSWORD = "s3cret-pump"  # noqa: S105 - the simulated PLC's test user


@contextlib.asynccontextmanager
async def serving(config: OpcUaServerConfig) -> AsyncIterator[tuple[OpcUaServer, list[tuple[str, str, Any]]]]:
    """The gateway's OPC UA server, started, with the writes it hands to devices recorded; stopped after."""
    writes: list[tuple[str, str, Any]] = []

    async def on_write(device: str, point: str, value: Any) -> None:
        writes.append((device, point, value))

    server = OpcUaServer(config, on_write=on_write)
    await server.start()
    try:
        yield server, writes
    finally:
        await server.stop()


def run(coro: Callable[[], Awaitable[None]], timeout: float = 100) -> None:
    """Run a test body with a budget under pytest-timeout's 120 s (so its own traceback shows).

    Generous: the steps inside carry their own deadlines, and two test workers beside node-opcua
    processes that make their certificates at start can slow a body's set-up several-fold.
    """
    asyncio.run(asyncio.wait_for(coro(), timeout))


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


def module_fixtures() -> tuple[Any, Any]:
    """A test module's ``pki`` and ``plc`` fixtures, as ``pki, plc = module_fixtures()``.

    ``pki``: certificates made once for the module (generating RSA keys is the slow part of
    security): the simulated PLC's folder, the gateway's certificate, its password file and a
    wrong one. ``plc``: one simulated PLC for the module, 8 variables (Pump1, Pump2), values
    changed by the tests.
    """

    @pytest.fixture(scope="module")
    def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        base = tmp_path_factory.mktemp("pki")
        ensure_certificate(base / "gateway")
        (base / "password").write_text(PASSWORD + "\n")
        (base / "wrong").write_text("not-the-password\n")
        return {"server": base / "server", "gateway": base / "gateway", "password": base / "password",
                "wrong": base / "wrong"}  # fmt: skip

    @pytest.fixture(scope="module")
    def plc(pki: dict[str, Path]) -> Iterator[ThreadedPlc]:
        sim = SimulatedPlc(free_port(), variables=8, rate=0, cert_dir=pki["server"], users={"op": PASSWORD},
                           allow_anonymous=True, seed=7)  # fmt: skip
        threaded = ThreadedPlc(sim)
        yield threaded
        threaded.close()

    return pki, plc


POINTS = [
    {"name": "flow", "node": "ns=2;s=Pump1.Flow", "quantity": "flow", "scale": 2.0},
    {"name": "energy", "node": "0:Objects/2:PLC/2:Pump1/2:Energy", "quantity": "active_energy"},
    {"name": "pressure", "node": "ns=2;s=Pump1.Pressure", "quantity": "pressure"},
    {"name": "running", "node": "ns=2;s=Pump1.Running", "bay": "P-01"},
    {"name": "people", "node": "ns=2;s=Pump2.Pressure", "area": "north"},
]


def device(plc: ThreadedPlc, **keys: Any) -> OpcUaConfig:
    """The simulated PLC as an ``opcua`` device (id ``plc``) with :data:`POINTS`."""
    raw = {"id": "plc", "driver": "opcua", "endpoint": plc.plc.endpoint, "interval": "100ms", "timeout": "2s",
           "points": POINTS, **keys}  # fmt: skip
    return OpcUaConfig.model_validate(raw)


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


# ---- node-opcua: an independent OPC UA implementation (tests/interop/opcua) ----------------------

INTEROP = ROOT / "tests" / "interop" / "opcua"


def node_opcua() -> str:
    """The ``node`` executable, with the pinned node-opcua installed (the suite's only independent OPC UA peer)."""
    return node_with_packages(INTEROP, "node-opcua")


class NodeScript:
    """A node-opcua script (client.js, server.js) as a subprocess speaking JSON lines.

    Every stdout line is a JSON object: answers carry the ``id`` of the command they answer, the
    rest are events (``{"event": ...}``). node-opcua's own logging goes to stderr, kept for messages.
    """

    def __init__(self, node: str, script: str, *args: str) -> None:
        self.command = [node, str(INTEROP / script), *args]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.stderr: deque[str] = deque(maxlen=200)
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> NodeScript:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, cwd=INTEROP, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._tasks = [asyncio.create_task(self._read(self.proc.stdout, json_lines=True)),
                       asyncio.create_task(self._read(self.proc.stderr, json_lines=False))]  # fmt: skip
        return self

    async def _read(self, stream: asyncio.StreamReader, *, json_lines: bool) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if json_lines:
                try:
                    self.lines.append(json.loads(text))
                except ValueError:
                    self.stderr.append(f"(stdout, not JSON) {text}")
                self._changed.set()
            else:
                self.stderr.append(text)
        if json_lines:
            self._changed.set()

    def log(self) -> str:
        return "\n".join(self.stderr)

    async def wait(self, predicate: Callable[[dict[str, Any]], Any], what: str, timeout: float = 15) -> dict[str, Any]:
        """The first line (answer or event) that satisfies ``predicate``; fails naming ``what``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = next((line for line in self.lines if predicate(line)), None)
            if found is not None:
                return found
            exited = self.proc is not None and self.proc.returncode is not None
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or (exited and self._tasks[0].done()):
                raise AssertionError(f"{self.command[1]}: no {what} ({'exited' if exited else 'timed out'}); "
                                     f"lines: {self.lines[-5:]}\nstderr:\n{self.log()[-3000:]}")  # fmt: skip
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def request(self, op: str, timeout: float = 15, **fields: Any) -> dict[str, Any]:
        """Send one command; its answer (``ok`` true or false)."""
        assert self.proc is not None and self.proc.stdin is not None
        ident = next(self._ids)
        self.proc.stdin.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.wait(lambda line: line.get("id") == ident, f"answer to {op}", timeout)

    async def close(self) -> None:
        """Ask it to close (a client leaves its session and channel, a server shuts down), then end it.

        Once the answer says so, the process is killed rather than awaited: Node takes half a
        second to tear down after node-opcua, which adds up over a test module.
        """
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(AssertionError, ConnectionError):
                await self.request("close", timeout=5)
            self.kill()
            await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
