"""An OPC UA server exposing every device's latest normalised values (off by default).

SCADA systems and HMIs next to the gateway read it as they would a PLC::

    Objects/Gateway/Devices/<device_id>/<point, or quantity[_phase]>   Double, with EngineeringUnits
                                                                       (Boolean for digital_input: coils, bits)
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

Listening: on loopback (``opc.tcp://127.0.0.1:4840``) unless ``listen`` names another address (that
of the interface the SCADA network reaches, or 0.0.0.0 for every interface).

Access: no anonymous session unless ``allow_anonymous`` (and then read-only); users from
``users_file`` or ``user``/``password_file`` may write only the points listed in ``writable``.
As OPC UA clients expect: a point not listed has AccessLevel CurrentRead and any write to it is
BadNotWritable; a listed one has AccessLevel CurrentRead|CurrentWrite, and UserAccessLevel says
the same to a user login but CurrentRead to an anonymous session, whose writes get
BadUserAccessDenied. A Write request is answered per node, anonymous or not. Nobody gets
asyncua's admin role.

Writes: a write to a writable point is answered only after ``on_write(device, point, value)``
(the runtime hands it to the device's ``Driver.write``) returned: Good, and the variable shows
the value; or, if it raised or took longer than ``write_timeout``, a Bad code
(:func:`write_failure_code`: BadTimeout, BadNotWritable, BadOutOfRange, BadTypeMismatch,
BadCommunicationError...) and the variable keeps its value. Either way a log line names the
user, the point, the value and the outcome. While a write waits for its device, that client
connection's other requests wait too (asyncua serves a connection's requests in order).

Client certificates: on a secure endpoint (a security policy other than None), only the client
application certificates in ``trusted_clients_dir`` (default ``<cert_dir>/trusted-clients``,
created empty) are accepted, or those issued by a CA certificate there; any other is refused with
BadCertificateUntrusted, logged with its thumbprint and saved in ``<cert_dir>/rejected-clients``
for the operator to move. The certificate checked is the one the secure channel was opened with
(at CreateSession and again at ActivateSession); a CreateSession naming another is refused with
BadCertificateInvalid. The folder is read again when it changes. The None endpoint, when offered
too, takes any client: without security the certificate plays no part, and the one a client
names in CreateSession (node-opcua always names one) is ignored, as OPC UA Part 4 (5.7.2) says,
so it is neither checked nor saved.

The core never imports a driver, so the small certificate helper here mirrors
``drivers/opcua/certs.py`` rather than importing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from agent.contract.events import CROSSWALK_PRESENCE, DEVICE_STATUS, GATEWAY_STREAM, METER_READING, PARKING_OCCUPANCY
from agent.devices.api import Duration, StrictModel, resolve_path
from agent.errors import DriverWriteError
from agent.uplinks.api import UplinkSettings

if TYPE_CHECKING:
    from asyncua import ua
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
# Units of the event vocabulary (agent/contract/vocabulary.py) -> UN/CEFACT common codes (OPC UA Part 8, 5.6.3).
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


# Quantities whose values are 0/1 states (coils, discrete inputs, bits): Boolean variables, written as Booleans.
BOOLEAN_QUANTITIES = frozenset({"digital_input"})


class WritablePoint(StrictModel):
    """One variable OPC UA clients may write: it goes back to the device through ``on_write``."""

    device: str = Field(description="Device id.")
    point: str = Field(description="Variable name under the device (point, or quantity[_phase]).")


class OpcUaServerConfig(UplinkSettings):
    """The gateway's own OPC UA server (``uplink.opcua`` in the site file)."""

    enabled: bool = Field(default=False, description="Serve the devices' values over OPC UA.")
    listen: str = Field(
        default="opc.tcp://127.0.0.1:4840",
        pattern=r"^opc\.tcp://[^/\s:]+:\d+(/\S*)?$",
        description="Endpoint URL to listen on (opc.tcp://address:port[/path]). The default serves this host only "
        "(loopback); give the address of the interface SCADA reaches, or 0.0.0.0 for every interface.",
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
    trusted_clients_dir: Path | None = Field(
        default=None,
        description="With security: the only client application certificates accepted (DER or PEM files, or the "
        "CA certificates that issued them). Default: `<cert_dir>/trusted-clients`, created empty, so no client "
        "connects until trusted; a refused certificate is saved in `<cert_dir>/rejected-clients` to move there.",
    )
    writable: list[WritablePoint] = Field(default_factory=list, description="Variables clients may write.")
    write_timeout: Duration = Field(
        default=3.0, gt=0, le=60,
        description="How long a client's write waits for the device; then it is answered BadTimeout.",
    )  # fmt: skip
    publish_interval: Duration = Field(
        default=0.2, gt=0, le=10, description="Values reach the address space at most this often (coalesced)."
    )

    _paths = field_validator("users_file", "password_file", "cert_dir", "trusted_clients_dir", mode="before")(
        resolve_path
    )

    @field_validator("trusted_clients_dir")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"folder not found: {value}")
        return value

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
        if self.trusted_clients_dir is not None and all(p == "None" for p in self.security_policies):
            raise ValueError("trusted_clients_dir needs a security policy other than None (without one, clients "
                             "present no certificate)")  # fmt: skip
        return self

    def active(self) -> bool:
        """Off unless ``enabled``."""
        return self.enabled

    def secret_files(self, prefix: str) -> list[tuple[str, Path]]:
        """The users file and the single user's password file."""
        files = [(f"{prefix}.users_file", self.users_file), (f"{prefix}.password_file", self.password_file)]
        return [(name, path) for name, path in files if path is not None]

    @property
    def secure(self) -> bool:
        """Whether an endpoint with a security policy (and so client certificates) is offered."""
        return any(p != "None" for p in self.security_policies)

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
    quantity: str | None = None


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
        self._by_node: dict[ua.NodeId, tuple[str, str]] = {}  # every device variable
        self.trust: ClientTrust | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Build the address space and listen. Raises OSError (port busy) or ValueError (certificates, users)."""
        from asyncua import ua
        from asyncua.common.callback import CallbackType
        from asyncua.server.server import Server

        users = self.config.load_users()
        user_manager = _Users(users)
        server = Server(user_manager=user_manager)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.config.listen)
        server.set_server_name(self.name)
        uri = f"urn:{socket.gethostname()}:edge-agent:server"
        await server.set_application_uri(uri)
        if self.config.cert_dir is not None and self.config.secure:
            cert_path, key_path, self.thumbprint = await asyncio.to_thread(
                _server_certificate, self.config.cert_dir, uri
            )
            await server.load_certificate(str(cert_path))
            await server.load_private_key(str(key_path))
            log.info("OPC UA server certificate %s: SHA-1 thumbprint %s", cert_path, self.thumbprint)
            trust = ClientTrust(self.config.trusted_clients_dir or self.config.cert_dir / "trusted-clients",
                                self.config.cert_dir / "rejected-clients",
                                create=self.config.trusted_clients_dir is None)  # fmt: skip
            await asyncio.to_thread(trust.refresh)
            # On a secure channel the client's certificate is checked twice: at CreateSession (asyncua's
            # validator hook, run only when the client names a certificate there), and at
            # ActivateSession (the user manager), in case it named none. Both check the channel's
            # own certificate; on a None channel neither checks anything (_ChannelPolicy tells them).
            server.set_certificate_validator(trust.validate)
            user_manager.trust = trust
            self.trust = trust
            if "None" in self.config.security_policies:
                log.warning("OPC UA server: the None endpoint takes any client, with or without a certificate (no "
                            "certificate is checked without security); %s applies to the secure endpoints only",
                            trust.folder)  # fmt: skip
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
        # Writes to device variables are answered only once the device applied them: asyncua's
        # pre/post-write callbacks cannot change a write's result, so its attribute service is wrapped.
        iserver = server.iserver
        iserver.attribute_service = _DeviceWrites(iserver.attribute_service, self)  # type: ignore[assignment]
        server.subscribe_server_callback(CallbackType.PostRead, _session_access_levels)
        await server.start()
        # asyncua's one list of endpoint policy factories, read when a client opens a channel (no
        # await since start(): no channel was opened yet): each channel now notes what it is.
        factories: list[Any] = server._policies
        factories[:] = [_ChannelPolicy(f) for f in factories]
        self.server = server
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop())
        url = urlparse(self.config.listen)
        log.info("OPC UA server listening on %s:%s (%s; anonymous %s)%s", url.hostname, url.port,
                 ", ".join(self.config.security_policies), "allowed" if tokens and self.config.allow_anonymous
                 else "refused", _loopback_note(url.hostname))  # fmt: skip

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
                                                m.get("unit"), time, m.get("quantity"))  # fmt: skip
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
                   else ua.VariantType.Boolean if isinstance(first.value, bool) or first.quantity in BOOLEAN_QUANTITIES
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
    async def device_write(self, target: tuple[str, str], item: ua.WriteValue, user: Any) -> ua.StatusCode:
        """One client write to a device variable's value: Good only once the device applied it.

        A point not in ``writable`` is BadNotWritable, and a session without a user login
        BadUserAccessDenied, before anything reaches the device. Otherwise the device's answer
        decides: the driver's write must succeed within ``write_timeout``, else the client gets a
        Bad code (:func:`write_failure_code`) and the variable keeps its value. An applied value
        shows in the variable until the device's next event says otherwise.
        """
        from asyncua import ua
        from asyncua.crypto.permission_rules import UserRole

        device, point = target
        node, variant = self._variables[target]
        name = getattr(user, "name", None)
        who = f"user {name!r}" if name else "an anonymous session"
        value = item.Value.Value.Value if item.Value is not None and item.Value.Value is not None else None
        code, reason, delivered = "Good", "", False
        if target not in self._writable:
            code, reason = "BadNotWritable", "not in uplink.opcua.writable (read-only)"
        elif getattr(user, "role", None) != UserRole.User:
            code, reason = "BadUserAccessDenied", "only user logins write"
        elif item.IndexRange:
            code, reason = "BadWriteNotSupported", "an index range (the variable is written whole)"
        elif item.Value is None or item.Value.Value is None or item.Value.Value.VariantType != variant \
                or value is None:  # fmt: skip
            code, reason = "BadTypeMismatch", f"the variable is {variant.name}"
        elif self.on_write is None:
            code, reason = "BadNotWritable", "no device path"
        else:
            delivered = True
            try:
                await asyncio.wait_for(self._deliver(device, point, value), self.config.write_timeout)
            except Exception as exc:
                code = write_failure_code(exc)
                reason = str(exc) or f"no answer within {self.config.write_timeout:g}s"
        status = int(getattr(_codes(), code))
        if code != "Good":
            self.stats["refused_writes"] += 1
            outcome = "not applied by the device" if delivered else "refused"
            (log.warning if delivered or code != "BadNotWritable" else log.info)(
                "OPC UA write by %s: %s/%s = %r %s, answered %s: %s", who, device, point, value, outcome, code, reason
            )
            return _status(status)
        self.stats["writes"] += 1
        log.info("OPC UA write by %s: %s/%s = %r applied by the device", who, device, point, value)
        if self.server is not None:
            now = datetime.now(UTC)
            source = item.Value.SourceTimestamp if item.Value is not None else None
            await self.server.write_attribute_value(node, _data_value(ua.Variant(value, variant), status,
                                                                      source or now, now))  # fmt: skip
        return _status(status)

    async def _deliver(self, device: str, point: str, value: Any) -> None:
        assert self.on_write is not None
        result = self.on_write(device, point, value)
        if inspect.isawaitable(result):
            await result


# A device's refusal that names the value's problem goes to the client as is; others say what it
# means from the client's side of the gateway.
PASSED_WRITE_CODES = frozenset({
    "BadOutOfRange", "BadTypeMismatch", "BadNotWritable", "BadWriteNotSupported", "BadNotSupported",
    "BadDeviceFailure", "BadOutOfService", "BadInvalidArgument",
})  # fmt: skip


# What a driver's DriverWriteError.kind means to an OPC UA client.
WRITE_KIND_CODES: dict[str, str] = {
    "not_writable": "BadNotWritable", "out_of_range": "BadOutOfRange", "bad_value": "BadTypeMismatch",
    "timeout": "BadTimeout", "unavailable": "BadCommunicationError", "device_error": "BadDeviceFailure",
}  # fmt: skip


def write_failure_code(exc: BaseException) -> str:
    """The status code a client gets for a write the device did not apply.

    BadTimeout when the device did not answer within ``write_timeout``; an OPC UA device's own
    code when the driver raised from asyncua's error (BadOutOfRange, BadTypeMismatch...; the PLC's
    BadUserAccessDenied concerns the gateway's account: BadNotWritable here); else what the
    driver's :class:`DriverWriteError` ``kind`` says (:data:`WRITE_KIND_CODES`); else
    BadCommunicationError.
    """
    from asyncua.ua.uaerrors import UaStatusCodeError

    if isinstance(exc, TimeoutError):
        return "BadTimeout"
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        if isinstance(link, UaStatusCodeError):
            name = _codes_name(link.code)
            if name in PASSED_WRITE_CODES:
                return name
            return "BadNotWritable" if name == "BadUserAccessDenied" else "BadCommunicationError"
    if isinstance(exc, DriverWriteError):
        return WRITE_KIND_CODES[exc.kind]
    return "BadCommunicationError"


def _codes_name(code: int) -> str:
    from asyncua.ua.status_codes import get_name_and_doc

    return get_name_and_doc(code)[0]


class _DeviceWrites:
    """asyncua's attribute service, with client writes answered per node as OPC UA clients expect.

    A device variable's value goes through :meth:`OpcUaServer.device_write` (BadNotWritable unless
    ``writable``, BadUserAccessDenied without a user login, else the device's answer). Any other
    write is checked first: BadNodeIdUnknown, BadNotWritable (an attribute other than the value,
    or a value whose AccessLevel has no CurrentWrite), BadUserAccessDenied (no user login, or a
    UserAccessLevel without CurrentWrite); what passes goes to the wrapped service. Reads are the
    wrapped service's. Results keep the request's order, one status code per node.
    """

    def __init__(self, inner: Any, owner: OpcUaServer) -> None:
        self.inner = inner
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, params: Any) -> Any:
        return self.inner.read(params)

    async def write(self, params: ua.WriteParameters, user: Any = None) -> list[ua.StatusCode]:
        from asyncua import ua
        from asyncua.crypto.permission_rules import UserRole
        from asyncua.ua.attribute_ids import AttributeIds

        if user is None or getattr(user, "role", None) == UserRole.Admin:
            # asyncua's own session (no client is ever Admin here): the address space, not the device
            return await self._inner_write(params, user)
        results: list[ua.StatusCode] = []
        for item in params.NodesToWrite:
            target = self.owner._by_node.get(item.NodeId)
            if target is not None and item.AttributeId == AttributeIds.Value:
                results.append(await self.owner.device_write(target, item, user))
                continue
            refusal = self._refusal(item, user)
            if refusal is None:
                one = ua.WriteParameters()
                one.NodesToWrite = [item]
                results += self._count(await self._inner_write(one, user))
            else:
                self.owner.stats["refused_writes"] += 1
                results.append(refusal)
        return results

    def _refusal(self, item: ua.WriteValue, user: Any) -> ua.StatusCode | None:
        """The status code refusing a write to a node that is not a device variable's value, or None."""
        from asyncua import ua
        from asyncua.crypto.permission_rules import UserRole
        from asyncua.ua.attribute_ids import AttributeIds

        read = ua.ReadParameters()
        read.NodesToRead = [
            ua.ReadValueId(NodeId=item.NodeId, AttributeId=a)
            for a in (AttributeIds.NodeId, AttributeIds.AccessLevel, AttributeIds.UserAccessLevel)
        ]
        exists, access, user_access = self.inner.read(read)
        codes = _codes()
        if exists.StatusCode is None or not exists.StatusCode.is_good():
            return _status(codes.BadNodeIdUnknown)
        if item.AttributeId != AttributeIds.Value:
            return _status(codes.BadNotWritable)  # no node here has WriteMask bits
        if access.StatusCode is None or not access.StatusCode.is_good() or access.Value is None:
            return access.StatusCode or _status(codes.BadAttributeIdInvalid)  # not a variable
        if not access.Value.Value & ua.AccessLevel.CurrentWrite.mask:
            return _status(codes.BadNotWritable)
        if getattr(user, "role", None) != UserRole.User or user_access.Value is None \
                or not user_access.Value.Value & ua.AccessLevel.CurrentWrite.mask:  # fmt: skip
            return _status(codes.BadUserAccessDenied)
        return None

    async def _inner_write(self, params: ua.WriteParameters, user: Any) -> list[ua.StatusCode]:
        result: list[ua.StatusCode] = await (self.inner.write(params) if user is None
                                             else self.inner.write(params, user=user))  # fmt: skip
        return result

    def _count(self, results: list[ua.StatusCode]) -> list[ua.StatusCode]:
        self.owner.stats["refused_writes"] += sum(1 for r in results if not r.is_good())
        return results


# AccessLevel bits that allow a change: CurrentWrite, HistoryWrite, StatusWrite, TimestampWrite (Part 3, 8.57).
WRITE_ACCESS_BITS = 0x02 | 0x08 | 0x20 | 0x40


def _session_access_levels(event: Any, _dispatcher: Any) -> None:
    """asyncua's post-read callback: what UserAccessLevel tells the session reading it.

    asyncua keeps one UserAccessLevel per variable; it is what a user login may do (CurrentWrite
    on the ``writable`` points). Sessions without a login never write, so they are shown the
    level without its write bits, as clients grey out what they cannot change.
    """
    from dataclasses import replace

    from asyncua import ua
    from asyncua.crypto.permission_rules import UserRole
    from asyncua.ua.attribute_ids import AttributeIds

    if getattr(event.user, "role", None) in (UserRole.User, UserRole.Admin):
        return
    results: list[ua.DataValue] = event.response_params
    for n, item in enumerate(event.request_params.NodesToRead):
        if item.AttributeId != AttributeIds.UserAccessLevel:
            continue
        found = results[n]
        if found.Value is not None and isinstance(found.Value.Value, int) and found.Value.Value & WRITE_ACCESS_BITS:
            level = found.Value.Value & ~WRITE_ACCESS_BITS
            results[n] = replace(found, Value=ua.Variant(level, found.Value.VariantType))


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


def _loopback_note(host: str | None) -> str:
    """What the listening line adds when only this host can connect."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        loopback = False
    return "; loopback only: set uplink.opcua.listen to an address SCADA reaches to serve other hosts" if loopback \
        else ""  # fmt: skip


def _node_id(identifier: str | int, namespace: int = 0) -> ua.NodeId:
    """asyncua types NodeId fields with NewTypes that plain str/int do not satisfy under mypy."""
    from asyncua.ua.uatypes import NodeId

    return NodeId(identifier, namespace)  # type: ignore[arg-type]


def _data_value(value: Any, code: int, source: datetime | None, server: datetime) -> ua.DataValue:
    from asyncua.ua.uatypes import DataValue, StatusCode

    status: Any = StatusCode(code)  # type: ignore[arg-type]
    return DataValue(value, status, source, server)  # type: ignore[arg-type]


def _status(code: int) -> ua.StatusCode:
    from asyncua.ua.uatypes import StatusCode

    return StatusCode(code)  # type: ignore[arg-type]


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
                certs.append(_load_certificate(path.read_bytes()))
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

        channel = _CHANNEL.get()
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

        thumb = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
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


def _load_certificate(data: bytes) -> Any:
    from cryptography import x509

    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


@dataclass(frozen=True, slots=True)
class _Channel:
    """The channel a client's requests come over: secured or not, and the client certificate it was opened with."""

    secure: bool
    certificate: bytes | None


# The channel of the connection being served. asyncua serves each connection in its own task and
# opens its channel there, so the value set then is the one its CreateSession and ActivateSession
# see; asyncua's validator and user manager are told nothing about the channel themselves.
_CHANNEL: ContextVar[_Channel | None] = ContextVar("opcua_server_channel", default=None)


class _ChannelPolicy:
    """asyncua's security policy factory for one endpoint, noting each channel it opens in ``_CHANNEL``.

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
        _CHANNEL.set(_Channel(self.secure, peer_certificate or None))
        return self.inner.create(peer_certificate)


class _Users:
    """asyncua user manager: the configured users are role User; anonymous (if offered) is role Anonymous.

    With a trust list, a secure channel's certificate must be trusted (BadCertificateUntrusted):
    asyncua's validator hook runs only when the client names a certificate in CreateSession,
    which it may leave out. A None channel's session is never refused for a certificate.
    """

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.trust: ClientTrust | None = None

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:  # fmt: skip
        from asyncua.common.utils import ServiceError
        from asyncua.crypto.permission_rules import User, UserRole
        from asyncua.ua.status_codes import StatusCodes

        # asyncua passes the channel's client certificate (empty on a None channel) whatever the
        # token, and user certificate tokens are not offered: no user name means an anonymous
        # token, which asyncua only lets through when allow_anonymous put it in the identity tokens.
        del iserver
        channel = _CHANNEL.get()
        secure, der = (channel.secure, channel.certificate) if channel is not None else (bool(certificate), certificate)
        if self.trust is not None and secure and not self.trust.check(der):
            log.warning("OPC UA server: session refused: the secure channel's client certificate is not trusted")
            raise ServiceError(StatusCodes.BadCertificateUntrusted)
        if username is None:
            return User(role=UserRole.Anonymous)
        expected = self.users.get(username)
        if expected is not None and hmac.compare_digest(expected.encode(), (password or "").encode()):
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA server: login refused for user %r", username)
        return None


class _Rules:
    """Which services each role may call: anonymous reads, browses and subscribes; users may also call methods.

    Both may send Write requests: :class:`_DeviceWrites` answers each node (an anonymous session
    gets BadUserAccessDenied or BadNotWritable per node, not a refused request). asyncua's default
    ruleset refuses anonymous sessions everything and lets its admin role edit the address space;
    nobody here is admin.
    """

    def __init__(self) -> None:
        from asyncua.crypto.permission_rules import USER_TYPES, UserRole
        from asyncua.ua.object_ids import ObjectIds

        user = {_node_id(t) for t in USER_TYPES}
        changing = {_node_id(t) for t in (ObjectIds.CallRequest_Encoding_DefaultBinary,
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
