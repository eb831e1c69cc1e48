"""An OPC UA server exposing every device's latest normalised values (off by default).

SCADA systems and HMIs next to the gateway read it as they would a PLC::

    Objects/Gateway/Devices/<device_id>/<point, or quantity[_phase]>   Double, with EngineeringUnits
                                       /<point, or bay_<bay>>          Boolean (parking: occupied)
                                       /<point, or area_<area>>        Int64 (crosswalk: people waiting)
                                       /status                         String: online / offline

Values carry the reading's time as source timestamp and a status code from its quality
(good -> Good, stale -> UncertainLastUsableValue, bad -> the driver's Bad code when it describes a
value, BadConfigurationError for an unknown node, else BadNoCommunication). When a device goes
offline its values turn UncertainLastUsableValue.

:meth:`OpcUaServer.update` is called for every event, so it only files the values in a dict
(the latest per variable wins); a task hands them to asyncua at most every
``publish_interval``, creating variables the first time they are seen.

Access: no anonymous session unless ``allow_anonymous`` (and then read-only); users from
``users_file`` or ``user``/``password_file`` may write only the points listed in ``writable``:
such writes reach ``on_write(device, point, value)`` and are logged; any other write is
refused with BadUserAccessDenied. Nobody gets asyncua's admin role.

The core never imports a driver, so the small certificate helper here mirrors
``drivers/opcua/certs.py`` rather than importing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from agent.driver_api import Duration, StrictModel, resolve_path
from agent.events import CROSSWALK_PRESENCE, DEVICE_STATUS, GATEWAY_STREAM, METER_READING, PARKING_OCCUPANCY

if TYPE_CHECKING:
    from asyncua import ua
    from asyncua.common.callback import ServerItemCallback
    from asyncua.common.node import Node
    from asyncua.server.server import Server

log = logging.getLogger(__name__)

PolicyName = Literal[
    "None",
    "Basic256Sha256_Sign",
    "Basic256Sha256_SignAndEncrypt",
    "Aes128Sha256RsaOaep_Sign",
    "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Aes256Sha256RsaPss_Sign",
    "Aes256Sha256RsaPss_SignAndEncrypt",
]
NAMESPACE = "urn:edge-agent:gateway"
UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
# Units of the event vocabulary (agent/vocabulary.py) -> UN/CEFACT common codes (OPC UA Part 8, 5.6.3).
UNECE_CODES: dict[str, tuple[str, str]] = {
    "kWh": ("KWH", "kilowatt hour"), "kvarh": ("K3", "kilovolt ampere reactive hour"),
    "kW": ("KWT", "kilowatt"), "kvar": ("KVR", "kilovar"), "kVA": ("KVA", "kilovolt ampere"),
    "V": ("VLT", "volt"), "A": ("AMP", "ampere"), "Hz": ("HTZ", "hertz"), "m3": ("MTQ", "cubic metre"),
    "m3/h": ("MQH", "cubic metre per hour"), "degC": ("CEL", "degree Celsius"), "bar": ("BAR", "bar"),
    "%": ("P1", "percent"), "W": ("WTT", "watt"), "Wh": ("WHR", "watt hour"), "l": ("LTR", "litre"),
}  # fmt: skip
# Bad codes a driver may name (OPC UA drivers pass the server's) that describe a value, so they are
# kept; others (e.g. BadNodeIdUnknown) describe a request and would mislead a reader here.
VALUE_CODES = frozenset({
    "BadSensorFailure", "BadDeviceFailure", "BadOutOfService", "BadConfigurationError", "BadNotConnected",
    "BadCommunicationError", "BadWaitingForInitialData", "BadOutOfRange", "BadNoCommunication",
})  # fmt: skip


class WritablePoint(StrictModel):
    """One variable OPC UA clients may write: it goes back to the device through ``on_write``."""

    device: str = Field(description="Device id.")
    point: str = Field(description="Variable name under the device (point, or quantity[_phase]).")


class OpcUaServerConfig(StrictModel):
    """The gateway's own OPC UA server (``uplink.opcua_server`` in the site file, when wired)."""

    enabled: bool = Field(default=False, description="Serve the devices' values over OPC UA.")
    listen: str = Field(
        default="opc.tcp://0.0.0.0:4840",
        pattern=r"^opc\.tcp://[^/\s:]+:\d+(/\S*)?$",
        description="Endpoint URL to listen on (opc.tcp://address:port[/path]).",
    )
    security_policies: list[PolicyName] = Field(
        default_factory=lambda: list[PolicyName](["Basic256Sha256_SignAndEncrypt"]),
        min_length=1,
        description="Endpoints offered: None, Basic256Sha256_Sign(AndEncrypt), Aes128Sha256RsaOaep_..., "
        "Aes256Sha256RsaPss_...",
    )
    allow_anonymous: bool = Field(default=False, description="Let sessions without a login read (never write).")
    users_file: Path | None = Field(default=None, description="Users, one `name:password` per line (# comments).")
    user: str | None = Field(default=None, description="A single user (with password_file).")
    password_file: Path | None = Field(default=None, description="The single user's password. Never inline.")
    cert_dir: Path | None = Field(
        default=None, description="Folder of the server certificate (created on first run); needed for security."
    )
    writable: list[WritablePoint] = Field(default_factory=list, description="Variables clients may write.")
    publish_interval: Duration = Field(
        default=0.2, gt=0, le=10, description="Values reach the address space at most this often (coalesced)."
    )

    _paths = field_validator("users_file", "password_file", "cert_dir", mode="before")(resolve_path)

    @field_validator("users_file", "password_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not (value.is_file() and os.access(value, os.R_OK)):
            raise ValueError(f"file not found or not readable: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaServerConfig:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file go together (the password is never written inline)")
        if self.enabled and any(p != "None" for p in self.security_policies) and self.cert_dir is None:
            raise ValueError("cert_dir is required with a security policy other than None (the server certificate "
                             "is created there)")  # fmt: skip
        if self.enabled and not (self.allow_anonymous or self.users_file or self.user):
            raise ValueError("nobody could log in: give users_file, user/password_file, or allow_anonymous: true")
        if self.writable and not (self.users_file or self.user):
            raise ValueError("writable points need users (anonymous sessions never write)")
        return self

    def load_users(self) -> dict[str, str]:
        """User name -> password from ``users_file`` and ``user``/``password_file``."""
        users: dict[str, str] = {}
        if self.users_file is not None:
            for n, line in enumerate(self.users_file.read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, password = line.partition(":")
                if not sep or not name:
                    raise ValueError(f"{self.users_file}:{n}: expected name:password")
                users[name] = password
        if self.user is not None and self.password_file is not None:
            text = self.password_file.read_text()
            users[self.user] = text.splitlines()[0] if text else ""
        return users


@dataclass(slots=True)
class _Pending:
    """The latest value of one variable, waiting for the next flush."""

    value: Any
    quality: str
    reason: str | None
    unit: str | None
    time: datetime


WriteCallback = Callable[[str, str, Any], Awaitable[None] | None]


class OpcUaServer:
    """The server; call :meth:`update` for every event once :meth:`start` returned."""

    def __init__(self, config: OpcUaServerConfig, *, on_write: WriteCallback | None = None,
                 name: str = "edge-agent") -> None:  # fmt: skip
        """Keep the config; no I/O (``start`` builds the server)."""
        self.config = config
        self.on_write = on_write
        self.name = name
        self.server: Server | None = None
        self.thumbprint: str | None = None
        self.stats = {"updates": 0, "flushes": 0, "writes": 0, "variables": 0, "refused_writes": 0}
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._offline: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ns = 0
        self._devices_folder: Node | None = None
        self._devices: dict[str, Node] = {}
        self._variables: dict[tuple[str, str], tuple[ua.NodeId, ua.VariantType]] = {}
        self._writable = {(w.device, w.point) for w in config.writable}
        self._by_node: dict[ua.NodeId, tuple[str, str]] = {}
        self._callbacks: set[asyncio.Task[None]] = set()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Build the address space and listen. Raises OSError (port busy) or ValueError (certificates, users)."""
        from asyncua import ua
        from asyncua.common.callback import CallbackType
        from asyncua.server.server import Server

        users = self.config.load_users()
        server = Server(user_manager=_Users(users))  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.config.listen)
        server.set_server_name(self.name)
        uri = f"urn:{socket.gethostname()}:edge-agent:server"
        await server.set_application_uri(uri)
        if self.config.cert_dir is not None and any(p != "None" for p in self.config.security_policies):
            cert_path, key_path, self.thumbprint = await asyncio.to_thread(
                _server_certificate, self.config.cert_dir, uri
            )
            await server.load_certificate(str(cert_path))
            await server.load_private_key(str(key_path))
            log.info("OPC UA server certificate %s: SHA-1 thumbprint %s", cert_path, self.thumbprint)
        names = {"None": "NoSecurity"}
        policies = [getattr(ua.SecurityPolicyType, names.get(p, p)) for p in self.config.security_policies]
        server.set_security_policy(policies, permission_ruleset=_Rules())  # type: ignore[arg-type]
        tokens: list[type] = [ua.UserNameIdentityToken] if users else []
        if self.config.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        self._ns = await server.register_namespace(NAMESPACE)
        gateway = await server.nodes.objects.add_folder(
            _node_id("Gateway", self._ns), ua.QualifiedName("Gateway", self._ns)
        )
        self._devices_folder = await gateway.add_folder(_node_id("Devices", self._ns),
                                                        ua.QualifiedName("Devices", self._ns))  # fmt: skip
        server.subscribe_server_callback(CallbackType.PostWrite, self._post_write)
        await server.start()
        self.server = server
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop())
        url = urlparse(self.config.listen)
        log.info("OPC UA server listening on %s:%s (%s; anonymous %s)", url.hostname, url.port,
                 ", ".join(self.config.security_policies), "allowed" if tokens and self.config.allow_anonymous
                 else "refused")  # fmt: skip

    async def stop(self) -> None:
        """Push what is pending, stop listening; never raises."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.server is not None:
            server, self.server = self.server, None
            try:
                await self._flush()
                await server.stop()
            except Exception:
                log.warning("OPC UA server did not stop cleanly", exc_info=True)

    # ---- the hot path --------------------------------------------------------------------
    def update(self, device: str, event_type: str, data: dict[str, Any], time: datetime) -> None:
        """File one event's values; cheap (dict stores), safe to call for every event."""
        if device == GATEWAY_STREAM:
            return
        pending = self._pending
        if event_type == METER_READING:
            for m in data.get("measurements", ()):
                key = m.get("point") or (f"{m['quantity']}_{m['phase']}" if m.get("phase") else m["quantity"])
                pending[device, key] = _Pending(m.get("value"), m.get("quality", "good"), m.get("reason"),
                                                m.get("unit"), time)  # fmt: skip
        elif event_type == PARKING_OCCUPANCY:
            key = data.get("point") or f"bay_{data['bay']}"
            pending[device, key] = _Pending(bool(data["occupied"]), "good", None, None, time)
        elif event_type == CROSSWALK_PRESENCE:
            key = data.get("point") or f"area_{data['area']}"
            pending[device, key] = _Pending(int(data["count"]), "good", None, None, time)
        elif event_type == DEVICE_STATUS:
            status = data.get("status", "offline")
            pending[device, "status"] = _Pending(status, "good", None, None, time)
            if status == "offline":
                self._offline.add(device)
            else:
                self._offline.discard(device)
        else:
            return
        self.stats["updates"] += 1
        if self._wake is not None and not self._wake.is_set():
            self._wake.set()

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("OPC UA server: values could not be published")
            await asyncio.sleep(self.config.publish_interval)

    async def _flush(self) -> None:
        from asyncua import ua

        if self.server is None or not self._pending:
            return
        batch, self._pending = self._pending, {}
        now = datetime.now(UTC)
        write = self.server.write_attribute_value
        for (device, name), p in batch.items():
            target = self._variables.get((device, name))
            if target is None:
                target = await self._create(device, name, p)
            node, variant = target
            quality = "stale" if device in self._offline and name != "status" and p.quality == "good" else p.quality
            status = _status_code(quality, p.reason)
            value = ua.Variant(_coerce(p.value, variant), variant) if quality != "bad" and p.value is not None \
                else ua.Variant()  # fmt: skip
            await write(node, _data_value(value, status, p.time, now))
        if self._offline:
            await self._mark_offline(batch)
        self.stats["flushes"] += 1

    async def _mark_offline(self, batch: dict[tuple[str, str], _Pending]) -> None:
        """Values of a device that just went offline keep their value but turn Uncertain."""

        assert self.server is not None
        went_offline = {d for (d, n) in batch if n == "status" and d in self._offline}
        for (device, name), (node, _) in self._variables.items():
            if device in went_offline and name != "status":
                current = self.server.read_attribute_value(node)
                if current.StatusCode is not None and current.StatusCode.is_good():
                    stale = _data_value(current.Value, _codes().UncertainLastUsableValue, current.SourceTimestamp,
                                        datetime.now(UTC))  # fmt: skip
                    await self.server.write_attribute_value(node, stale)

    async def _create(self, device: str, name: str, first: _Pending) -> tuple[ua.NodeId, ua.VariantType]:
        from asyncua import ua

        ns = self._ns
        folder = self._devices.get(device)
        if folder is None:
            assert self._devices_folder is not None
            folder = await self._devices_folder.add_object(_node_id(f"Devices.{device}", ns),
                                                           ua.QualifiedName(device, ns))  # fmt: skip
            self._devices[device] = folder
        variant = (ua.VariantType.String if name == "status"
                   else ua.VariantType.Boolean if isinstance(first.value, bool)
                   else ua.VariantType.Int64 if isinstance(first.value, int) and first.unit is None
                   else ua.VariantType.Double)  # fmt: skip
        node_id = _node_id(f"Devices.{device}.{name}", ns)
        default = {ua.VariantType.String: "", ua.VariantType.Boolean: False, ua.VariantType.Int64: 0}.get(variant, 0.0)
        var = await folder.add_variable(node_id, ua.QualifiedName(name, ns), ua.Variant(default, variant))
        if first.unit:
            await _add_unit(var, first.unit, ns, node_id)
        if (device, name) in self._writable:
            await var.set_writable()
            self._by_node[node_id] = (device, name)
        self._variables[device, name] = (node_id, variant)
        self.stats["variables"] += 1
        return node_id, variant

    # ---- writes from clients -------------------------------------------------------------
    async def _post_write(self, event: ServerItemCallback, _service: Any) -> None:
        """After asyncua applied a client's write (refused ones never succeed): pass it on."""
        if not event.is_external:
            return
        user = getattr(event.user, "name", None) or "?"
        for item, result in zip(event.request_params.NodesToWrite, event.response_params, strict=False):
            target = self._by_node.get(item.NodeId)
            if target is None or result is None or not result.is_good():
                if target is None and (result is None or not result.is_good()):
                    self.stats["refused_writes"] += 1
                continue
            value = item.Value.Value.Value if item.Value is not None and item.Value.Value is not None else None
            device, point = target
            self.stats["writes"] += 1
            log.info("OPC UA write by user %r: %s/%s = %r", user, device, point, value)
            if self.on_write is not None:
                await self._deliver(device, point, value)

    async def _deliver(self, device: str, point: str, value: Any) -> None:
        assert self.on_write is not None
        try:
            result = self.on_write(device, point, value)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            # Already acknowledged to the client (asyncua applies a write before this hook runs);
            # the variable shows the device's own value again with its next event.
            log.warning("OPC UA write %s/%s = %r not applied to the device: %s", device, point, value, exc)


def _coerce(value: Any, variant: ua.VariantType) -> Any:
    from asyncua import ua

    if variant == ua.VariantType.Double:
        return float(value)
    if variant == ua.VariantType.Int64:
        return int(value)
    if variant == ua.VariantType.Boolean:
        return bool(value)
    return str(value)


def _codes() -> Any:
    from asyncua.ua.status_codes import StatusCodes

    return StatusCodes


def _node_id(identifier: str | int, namespace: int = 0) -> ua.NodeId:
    """asyncua types NodeId fields with NewTypes that plain str/int do not satisfy under mypy."""
    from asyncua.ua.uatypes import NodeId

    return NodeId(identifier, namespace)  # type: ignore[arg-type]


def _data_value(value: Any, code: int, source: datetime | None, server: datetime) -> ua.DataValue:
    from asyncua.ua.uatypes import DataValue, StatusCode

    status: Any = StatusCode(code)  # type: ignore[arg-type]
    return DataValue(value, status, source, server)  # type: ignore[arg-type]


def _status_code(quality: str, reason: str | None) -> int:
    codes = _codes()
    if quality == "good":
        return int(codes.Good)
    if quality == "stale":
        return int(codes.UncertainLastUsableValue)
    if reason in VALUE_CODES:
        return int(getattr(codes, reason))
    if reason and (reason.startswith("BadNodeId") or reason in ("BadNoMatch", "BadBrowseNameInvalid")):
        # The device has no such variable: here the variable exists, so say what it means for it.
        return int(codes.BadConfigurationError)
    return int(codes.BadNoCommunication)


def unece_unit_id(code: str) -> int:
    """OPC UA's UnitId of a UN/CEFACT common code: its ASCII bytes, big-endian (Part 8, 5.6.3)."""
    unit_id = 0
    for char in code:
        unit_id = (unit_id << 8) | ord(char)
    return unit_id


async def _add_unit(var: Node, unit: str, ns: int, node_id: ua.NodeId) -> None:
    """EngineeringUnits (EUInformation) when the unit has a UN/CEFACT code, else a plain ``Unit`` property."""
    from asyncua import ua
    from asyncua.ua.object_ids import ObjectIds

    known = UNECE_CODES.get(unit)
    if known is None:
        await var.add_property(_node_id(f"{node_id.Identifier!s}.Unit", ns), ua.QualifiedName("Unit", ns),
                               ua.Variant(unit, ua.VariantType.String))  # fmt: skip
        return
    code, description = known
    eu = ua.EUInformation(NamespaceUri=UNECE_URI, UnitId=unece_unit_id(code), DisplayName=ua.LocalizedText(unit),
                          Description=ua.LocalizedText(description))  # fmt: skip
    await var.add_property(_node_id(f"{node_id.Identifier!s}.EngineeringUnits", ns),
                           ua.QualifiedName("EngineeringUnits", 0), ua.Variant(eu, ua.VariantType.ExtensionObject),
                           datatype=_node_id(ObjectIds.EUInformation))  # fmt: skip


class _Users:
    """asyncua user manager: the configured users are role User; anonymous (if offered) is role Anonymous."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:  # fmt: skip
        from asyncua.crypto.permission_rules import User, UserRole

        # asyncua passes the secure channel's certificate whatever the token, and user
        # certificate tokens are not offered: no user name means an anonymous token, which
        # asyncua only lets through when allow_anonymous put it in the identity tokens.
        del iserver, certificate
        if username is None:
            return User(role=UserRole.Anonymous)
        expected = self.users.get(username)
        if expected is not None and hmac.compare_digest(expected.encode(), (password or "").encode()):
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA server: login refused for user %r", username)
        return None


class _Rules:
    """Which services each role may call: anonymous reads, browses and subscribes; users may also write.

    asyncua's default ruleset refuses anonymous sessions everything and lets its admin role edit
    the address space; nobody here is admin.
    """

    def __init__(self) -> None:
        from asyncua.crypto.permission_rules import USER_TYPES, UserRole
        from asyncua.ua.object_ids import ObjectIds

        user = {_node_id(t) for t in USER_TYPES}
        changing = {_node_id(t) for t in (ObjectIds.WriteRequest_Encoding_DefaultBinary,
                                          ObjectIds.CallRequest_Encoding_DefaultBinary,
                                          ObjectIds.HistoryUpdateRequest_Encoding_DefaultBinary)}  # fmt: skip
        self._allowed = {UserRole.User: user, UserRole.Anonymous: user - changing}

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        del body
        return action_type_id in self._allowed.get(user.role, set())


def _server_certificate(folder: Path, uri: str) -> tuple[Path, Path, str]:
    """(cert, key, SHA-1 thumbprint): the server's pair in ``folder``, created if missing or expired."""
    from asyncua.crypto.cert_gen import generate_self_signed_app_certificate
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = folder / "server-cert.der", folder / "server-key.pem"
    if cert_path.is_file() and key_path.is_file():
        der = cert_path.read_bytes()
        if x509.load_der_x509_certificate(der).not_valid_after_utc > datetime.now(UTC):
            return cert_path, key_path, hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    host = socket.gethostname()
    cert = generate_self_signed_app_certificate(
        key, f"edge-agent server@{host}", {}, [x509.UniformResourceIdentifier(uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=3650,
    )  # fmt: skip
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    der = cert.public_bytes(Encoding.DER)
    cert_path.write_bytes(der)
    log.warning("OPC UA server certificate created: %s", cert_path)
    return cert_path, key_path, hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
