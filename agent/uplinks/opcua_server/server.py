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
``publish_interval``, creating variables the first time they are seen (``nodes.py``).

Listening: on loopback (``opc.tcp://127.0.0.1:4840``) unless ``listen`` names another address (that
of the interface the SCADA network reaches, or 0.0.0.0 for every interface).

Who may log in and write (``access.py``), how a write reaches the device and what the client is
answered (``writes.py``), and which client certificates a secure endpoint accepts (``trust.py``)
are described where they are done.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from agent.contract.data import measurement_point
from agent.contract.events import CROSSWALK_PRESENCE, DEVICE_STATUS, GATEWAY_STREAM, METER_READING, PARKING_OCCUPANCY
from agent.protocols.opcua_certs import default_application_uri
from agent.uplinks.opcua_server.access import Rules, Users, session_access_levels
from agent.uplinks.opcua_server.nodes import (
    DeviceNodes,
    Pending,
    coerce,
    data_value,
    quality_code,
    status_codes,
)
from agent.uplinks.opcua_server.trust import ChannelPolicy, secure
from agent.uplinks.opcua_server.writes import DeviceWrites, WriteCallback

if TYPE_CHECKING:
    from asyncua.server.server import Server

    from agent.uplinks.opcua_server.config import OpcUaServerConfig
    from agent.uplinks.opcua_server.trust import ClientTrust

log = logging.getLogger(__name__)


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
        self.nodes = DeviceNodes({(w.device, w.point) for w in config.writable})
        self.trust: ClientTrust | None = None
        self._pending: dict[tuple[str, str], Pending] = {}
        self._offline: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Build the address space and listen. Raises OSError (port busy) or ValueError (certificates, users)."""
        from asyncua import ua
        from asyncua.common.callback import CallbackType
        from asyncua.server.server import Server

        users = self.config.load_users()
        user_manager = Users(users)
        server = Server(user_manager=user_manager)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.config.listen)
        server.set_server_name(self.name)
        uri = f"{default_application_uri()}:server"
        await server.set_application_uri(uri)
        if self.config.cert_dir is not None and self.config.secure:
            self.thumbprint, self.trust = await secure(server, self.config, uri)
            user_manager.trust = self.trust
        names = {"None": "NoSecurity"}
        policies = [getattr(ua.SecurityPolicyType, names.get(p, p)) for p in self.config.security_policies]
        server.set_security_policy(policies, permission_ruleset=Rules())  # type: ignore[arg-type]
        tokens: list[type] = [ua.UserNameIdentityToken] if users else []
        if self.config.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        await self.nodes.build(server)
        # Writes to device variables are answered only once the device applied them: asyncua's
        # pre/post-write callbacks cannot change a write's result, so its attribute service is wrapped.
        iserver = server.iserver
        iserver.attribute_service = DeviceWrites(iserver.attribute_service, self)  # type: ignore[assignment]
        server.subscribe_server_callback(CallbackType.PostRead, session_access_levels)
        await server.start()
        # asyncua's one list of endpoint policy factories, read when a client opens a channel (no
        # await since start(): no channel was opened yet): each channel now notes what it is.
        factories: list[Any] = server._policies
        factories[:] = [ChannelPolicy(f) for f in factories]
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
                pending[device, measurement_point(m)] = Pending(
                    m.get("value"), m.get("quality", "good"), m.get("reason"), m.get("unit"), time, m.get("quantity")
                )
        elif event_type == PARKING_OCCUPANCY:
            key = data.get("point") or f"bay_{data['bay']}"
            pending[device, key] = Pending(bool(data["occupied"]), "good", None, None, time)
        elif event_type == CROSSWALK_PRESENCE:
            key = data.get("point") or f"area_{data['area']}"
            pending[device, key] = Pending(int(data["count"]), "good", None, None, time)
        elif event_type == DEVICE_STATUS:
            status = data.get("status", "offline")
            pending[device, "status"] = Pending(status, "good", None, None, time)
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
            target = self.nodes.variables.get((device, name))
            if target is None:
                target = await self.nodes.create(device, name, p)
                self.stats["variables"] += 1
            node, variant = target
            quality = "stale" if device in self._offline and name != "status" and p.quality == "good" else p.quality
            code = quality_code(quality, p.reason)
            value = ua.Variant(coerce(p.value, variant), variant) if quality != "bad" and p.value is not None \
                else ua.Variant()  # fmt: skip
            await write(node, data_value(value, code, p.time, now))
        if self._offline:
            await self._mark_offline(batch)
        self.stats["flushes"] += 1

    async def _mark_offline(self, batch: dict[tuple[str, str], Pending]) -> None:
        """Values of a device that just went offline keep their value but turn Uncertain."""

        assert self.server is not None
        went_offline = {d for (d, n) in batch if n == "status" and d in self._offline}
        for (device, name), (node, _) in self.nodes.variables.items():
            if device in went_offline and name != "status":
                current = self.server.read_attribute_value(node)
                if current.StatusCode is not None and current.StatusCode.is_good():
                    stale = data_value(current.Value, status_codes().UncertainLastUsableValue, current.SourceTimestamp,
                                       datetime.now(UTC))  # fmt: skip
                    await self.server.write_attribute_value(node, stale)


def _loopback_note(host: str | None) -> str:
    """What the listening line adds when only this host can connect."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        loopback = False
    return "; loopback only: set uplink.opcua.listen to an address SCADA reaches to serve other hosts" if loopback \
        else ""  # fmt: skip
