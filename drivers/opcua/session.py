"""One connection to an OPC UA server: connect, resolve the points, subscribe or read.

A :class:`Session` lives from one connect to the loss of that connection; the driver makes a
new one to reconnect, which re-resolves browse paths and re-creates the subscription (a
restarted server has forgotten both). Errors become :class:`SessionError` with a sentence a
technician can act on; a password never appears in one.

Subscriptions use asyncua's service layer (``Client.uaclient``) rather than its high-level
``Subscription``: each PublishResponse reaches us whole, as one batch, with no per-change
objects or tasks, which is what keeps 10,000 changes/s affordable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlparse

from asyncua import ua
from asyncua.crypto import security_policies

from agent.protocols.opcua_certs import AppCertificate, thumbprint
from drivers.opcua.certs import UserIdentity
from drivers.opcua.config import OpcUaConfig, PointConfig, node_kind
from drivers.opcua.mapping import Sample, bad_sample, code_name, sample_of
from drivers.opcua.uanames import (
    AttributeIds,
    Client,
    ObjectIds,
    UaError,
    UaStatusCodeError,
    UaStringParsingError,
    node_id,
)

log = logging.getLogger(__name__)

SESSION_TIMEOUT_MS = 60_000  # the server frees our session a minute after we vanish
CHUNK = 500  # nodes per Read / CreateMonitoredItems request: below common server limits
POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
# A server that cannot apply a deadband refuses the monitored item with one of these (Part 4, 7.22.2):
# the item is created again without the filter and the gateway applies the deadband itself.
FILTER_REFUSED = frozenset({"BadMonitoredItemFilterUnsupported", "BadMonitoredItemFilterInvalid",
                            "BadFilterNotAllowed", "BadDeadbandFilterInvalid"})  # fmt: skip


class SessionError(Exception):
    """The connection failed or was lost; the message says why and what to check."""


@dataclass(frozen=True)
class Credentials:
    """What the gateway logs in with (the password is read from its file by the driver)."""

    password: str | None
    certificate: AppCertificate | None
    user: UserIdentity | None = None


def _endpoint(config: OpcUaConfig) -> str:
    url = urlparse(config.endpoint)
    return f"{url.hostname}:{url.port or 4840}"


def describe(exc: BaseException, config: OpcUaConfig, cert: AppCertificate | None = None,
             user: UserIdentity | None = None) -> str:  # fmt: skip
    """A technician's sentence for a connect or request failure."""
    name = type(exc).__name__
    where = _endpoint(config)
    if isinstance(exc, UaStatusCodeError):
        code = code_name(exc.code)
        if code == "BadUserAccessDenied" and config.username is not None:
            return f"the server refused user {config.username!r}: {code}; check username/password_file"
        if code in ("BadUserAccessDenied", "BadIdentityTokenInvalid") and config.user_certificate is not None:
            thumb = f" (SHA-1 thumbprint {user.thumbprint})" if user else ""
            return (f"the server refused the user certificate {config.user_certificate}{thumb}: {code}; trust it "
                    "on the server as a user certificate, or check user_certificate/user_private_key")  # fmt: skip
        if code in ("BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid"):
            how = (f"user {config.username!r}" if config.username else "certificate login" if config.user_certificate
                   else "anonymous login")  # fmt: skip
            return f"the server refused {how}: {code}; check which logins the server allows"
        if code.startswith(("BadCertificate", "BadSecurity")):
            thumb = f" (SHA-1 thumbprint {cert.thumbprint})" if cert else ""
            return (f"the server rejected the secure channel: {code}; trust the gateway's certificate{thumb} on "
                    "the server, or check server_certificate")  # fmt: skip
        return code
    if isinstance(exc, UaError) and "No matching endpoints" in str(exc):
        return (f"{where} offers no endpoint with security {config.security_policy}/{config.security_mode}; "
                "`edge-agent browse opcua --endpoints` lists what it offers")  # fmt: skip
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"timeout talking to {where}"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"{name}: {exc}" if str(exc) else name


class Session:
    """A connected client and the points resolved on it."""

    def __init__(self, config: OpcUaConfig, credentials: Credentials) -> None:
        """Prepare; :meth:`open` connects."""
        self.config = config
        self.credentials = credentials
        self.client = Client(config.endpoint, timeout=config.timeout, watchdog_intervall=config.watchdog)
        self.client.session_timeout = SESSION_TIMEOUT_MS
        self.client.name = self.client.description = f"edge-agent {config.id}"
        self.nodes: dict[str, ua.NodeId] = {}  # point name -> resolved node
        self.unresolved: dict[str, str] = {}  # point name -> why it has no node
        self.lost: str | None = None
        self._wake = asyncio.Event()
        self._batches: asyncio.Queue[ua.NotificationMessage] = asyncio.Queue()
        self._handles: dict[int, PointConfig] = {}
        # point name -> deadband (engineering units) the gateway applies because the server may not:
        # every percent deadband, and an absolute one the server refused.
        self.gateway_deadbands: dict[str, float] = {}

    # ---- connect -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect (security, login), then resolve every point. Raises SessionError."""
        c, config, cert = self.client, self.config, self.credentials.certificate
        try:
            if cert is not None:
                c.application_uri = cert.application_uri
            if config.security_policy != "None":
                assert cert is not None  # config validation: security needs cert_dir
                await c.set_security(
                    POLICIES[config.security_policy],
                    str(cert.cert_path),
                    str(cert.key_path),
                    server_certificate=str(config.server_certificate) if config.server_certificate else None,
                    mode=MODES[config.security_mode],
                )
            if config.username is not None:
                c.set_user(config.username)
                c.set_password(self.credentials.password or "")
            user = self.credentials.user
            if user is not None:
                c.user_certificate, c.user_private_key = user.certificate, user.key
            c.connection_lost_callback = self._on_lost
            await asyncio.wait_for(c.connect(), config.timeout * 3)
        except Exception as exc:
            await self.close()
            raise SessionError(describe(exc, config, cert, self.credentials.user)) from exc
        try:
            await self._resolve()
        except SessionError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise SessionError(describe(exc, config, cert)) from exc

    async def _on_lost(self, exc: Exception) -> None:
        self._set_lost(f"connection lost: {describe(exc, self.config)}")

    def _set_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        self._wake.set()

    async def _resolve(self) -> None:
        """NodeIds are parsed; browse paths translated in one request; unknown nodes found by one Read."""
        paths: list[tuple[PointConfig, ua.RelativePath]] = []
        for p in self.config.points:
            if node_kind(p.node) == "node_id":
                try:
                    self.nodes[p.name] = ua.NodeId.from_string(p.node)
                except (ValueError, UaStringParsingError) as exc:
                    self.unresolved[p.name] = f"invalid NodeId: {exc}"
            else:
                steps = "/".join(s for s in p.node.strip("/").split("/"))
                paths.append((p, ua.RelativePath.from_string("/" + steps)))
        if paths:
            results = await self.client.translate_browsepaths(node_id(ObjectIds.RootFolder), [r for _, r in paths])
            for (p, _), result in zip(paths, results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    target = result.Targets[0].TargetId  # an ExpandedNodeId: keep the local NodeId part
                    self.nodes[p.name] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
                else:
                    self.unresolved[p.name] = code_name(result.StatusCode.value)
        names = list(self.nodes)
        for start in range(0, len(names), CHUNK):
            chunk = names[start : start + CHUNK]
            classes = await self.client.uaclient.read_attributes([self.nodes[n] for n in chunk], AttributeIds.NodeClass)
            for name, dv in zip(chunk, classes, strict=True):
                if dv.StatusCode is not None and not dv.StatusCode.is_good():
                    self.unresolved[name] = code_name(dv.StatusCode.value)
                elif dv.Value is not None and dv.Value.Value != ua.NodeClass.Variable:
                    self.unresolved[name] = f"not a variable ({ua.NodeClass(dv.Value.Value).name})"
        order = [p.name for p in self.config.points]
        self.unresolved = dict(sorted(self.unresolved.items(), key=lambda item: order.index(item[0])))
        for name, reason in self.unresolved.items():
            self.nodes.pop(name, None)
            point = next(p for p in self.config.points if p.name == name)
            log.warning("device %s: point %r (%s) cannot be read: %s", self.config.id, name, point.node, reason)
        if not self.nodes:
            raise SessionError(
                "no point can be read: "
                + "; ".join(f"{n} ({self._node_of(n)}): {r}" for n, r in self.unresolved.items())
            )

    def _node_of(self, name: str) -> str:
        return next(p.node for p in self.config.points if p.name == name)

    def unresolved_samples(self) -> list[Sample]:
        """A bad sample for each point that has no node on this server."""
        now = datetime.now(UTC)
        return [bad_sample(p, self.unresolved[p.name], now) for p in self.config.points if p.name in self.unresolved]

    # ---- subscribe -----------------------------------------------------------------------
    async def subscribe(self) -> list[Sample]:
        """One subscription with a monitored item per point; bad samples for refused items."""
        config = self.config
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = config.interval * 1000
        params.RequestedMaxKeepAliveCount = max(3, int(10_000 / max(config.interval * 1000, 1)))
        params.RequestedLifetimeCount = params.RequestedMaxKeepAliveCount * 3
        params.MaxNotificationsPerPublish = 0  # no limit: one publish carries a whole scan
        params.PublishingEnabled = True
        try:
            percent = await self._percent_deadbands()
            result = await self.client.uaclient.create_subscription(params, self._on_publish)
            refused = await self._monitor(result.SubscriptionId, percent)
        except Exception as exc:
            raise SessionError(describe(exc, config)) from exc
        now = datetime.now(UTC)
        return [bad_sample(p, reason, now) for p, reason in refused] + self.unresolved_samples()

    async def _percent_deadbands(self) -> dict[str, float]:
        """Point name -> its percent deadband in engineering units, from the node's EURange property.

        A percent deadband is relative to EURange (Part 8, 5.3.2); the gateway applies it itself
        as well (asyncua's server, for one, accepts the filter and ignores it). A point whose node
        has no usable EURange gets no deadband at all, with a warning: a server would refuse the
        filter (BadDeadbandFilterInvalid) and the point would not be monitored.
        """
        wanted = [p for p in self.config.points
                  if p.name in self.nodes and (db := self.config.deadband_of(p)) is not None
                  and db.type == "percent" and db.value > 0]  # fmt: skip
        out: dict[str, float] = {}
        if not wanted:
            return out
        eu_range = ua.RelativePath.from_string(".0:EURange")  # ".": Aggregates, which HasProperty is a subtype of
        paths = [ua.BrowsePath(StartingNode=self.nodes[p.name], RelativePath=eu_range) for p in wanted]
        found: list[tuple[PointConfig, ua.NodeId]] = []
        why: dict[str, str] = {}
        for start in range(0, len(paths), CHUNK):
            results = await self.client.uaclient.translate_browsepaths_to_nodeids(paths[start : start + CHUNK])
            for p, result in zip(wanted[start : start + CHUNK], results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    target = result.Targets[0].TargetId
                    found.append((p, ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)))
                else:
                    why[p.name] = "the node has no EURange property"
        for start in range(0, len(found), CHUNK):
            chunk = found[start : start + CHUNK]
            values = await self.client.uaclient.read_attributes([n for _, n in chunk], AttributeIds.Value)
            for (p, _), dv in zip(chunk, values, strict=True):
                eu = dv.Value.Value if dv.Value is not None else None
                if not isinstance(eu, ua.Range) or not eu.High > eu.Low:
                    why[p.name] = f"its EURange is not a range with High > Low ({eu!r})"
                    continue
                db = self.config.deadband_of(p)
                assert db is not None
                out[p.name] = db.value / 100 * (eu.High - eu.Low) * (abs(p.scale) or 1.0)
                log.info("device %s: point %r: %g%% deadband of EURange %g..%g = %g %s, applied by the gateway",
                         self.config.id, p.name, db.value, eu.Low, eu.High, out[p.name], p.event_unit)  # fmt: skip
        for p in wanted:
            if p.name in why:
                log.warning("device %s: point %r (%s): percent deadband ignored, every change is reported: %s",
                            self.config.id, p.name, p.node, why[p.name])  # fmt: skip
        return out

    async def _monitor(self, subscription_id: int, percent: dict[str, float]) -> list[tuple[PointConfig, str]]:
        self.gateway_deadbands = dict(percent)
        items: list[tuple[PointConfig, ua.MonitoredItemCreateRequest]] = []
        for handle, point in enumerate((p for p in self.config.points if p.name in self.nodes), start=1):
            self._handles[handle] = point
            items.append((point, self._item(point, handle, percent)))
        refused: list[tuple[PointConfig, str]] = []
        retry: list[tuple[PointConfig, ua.MonitoredItemCreateRequest]] = []
        for chunk in (items[start : start + CHUNK] for start in range(0, len(items), CHUNK)):
            for point, item, reason in await self._create_items(subscription_id, chunk):
                if reason in FILTER_REFUSED and item.RequestedParameters.Filter is not None:
                    item.RequestedParameters.Filter = None
                    retry.append((point, item))
                    deadband = self.config.deadband_of(point)
                    assert deadband is not None
                    if deadband.type == "absolute":
                        self.gateway_deadbands[point.name] = deadband.value
                    log.info("device %s: point %r: the server cannot apply its deadband (%s); the gateway does",
                             self.config.id, point.name, reason)  # fmt: skip
                else:
                    refused.append((point, reason))
        for point, _, reason in await self._create_items(subscription_id, retry) if retry else []:
            refused.append((point, reason))
        for point, reason in refused:
            self.gateway_deadbands.pop(point.name, None)
            log.warning("device %s: point %r (%s): the server refused to monitor it: %s", self.config.id,
                        point.name, point.node, reason)  # fmt: skip
        return refused

    async def _create_items(
        self, subscription_id: int, chunk: list[tuple[PointConfig, ua.MonitoredItemCreateRequest]]
    ) -> list[tuple[PointConfig, ua.MonitoredItemCreateRequest, str]]:
        """Create one request's items; (point, item, reason) for each the server refused."""
        request = ua.CreateMonitoredItemsParameters()
        request.SubscriptionId = subscription_id
        request.TimestampsToReturn = ua.TimestampsToReturn.Both
        request.ItemsToCreate = [item for _, item in chunk]
        results = await self.client.uaclient.create_monitored_items(request)
        return [(point, item, code_name(res.StatusCode.value))
                for (point, item), res in zip(chunk, results, strict=True) if not res.StatusCode.is_good()]  # fmt: skip

    def _item(self, point: PointConfig, handle: int, percent: dict[str, float]) -> ua.MonitoredItemCreateRequest:
        config = self.config
        sampling = point.sampling_interval if point.sampling_interval is not None else config.sampling_interval
        deadband = config.deadband_of(point)
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=self.nodes[point.name], AttributeId=AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        parameters = ua.MonitoringParameters()
        parameters.ClientHandle = handle
        parameters.SamplingInterval = -1.0 if sampling is None else sampling * 1000  # -1: the publishing interval
        parameters.QueueSize = point.queue_size or config.queue_size
        parameters.DiscardOldest = True
        if deadband is not None and deadband.value > 0 and (deadband.type == "absolute" or point.name in percent):
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            if deadband.type == "absolute":
                # The server compares raw values; the configured deadband is in engineering units.
                flt.DeadbandType = ua.DeadbandType.Absolute
                flt.DeadbandValue = deadband.value / (abs(point.scale) or 1.0)
            else:
                flt.DeadbandType = ua.DeadbandType.Percent
                flt.DeadbandValue = deadband.value
            parameters.Filter = flt
        request.RequestedParameters = parameters
        return request

    def _on_publish(self, result: ua.PublishResult) -> None:
        """Called by asyncua's publish loop for every response: queue it whole, return at once."""
        message = result.NotificationMessage
        if message.NotificationData:
            self._batches.put_nowait(message)
            self._wake.set()

    async def next_batch(self) -> list[Sample]:
        """Wait for the next notifications and map them; raises SessionError once the connection is lost."""
        while True:
            if self._batches.empty():
                if self.lost is not None:
                    raise SessionError(self.lost)
                self._wake.clear()
                await self._wake.wait()
                continue
            samples: list[Sample] = []
            now = datetime.now(UTC)
            handles = self._handles
            while not self._batches.empty():
                for data in self._batches.get_nowait().NotificationData:
                    if isinstance(data, ua.DataChangeNotification):
                        for item in data.MonitoredItems:
                            point = handles.get(item.ClientHandle)
                            if point is not None:
                                samples.append(sample_of(point, item.Value, now))
                    elif isinstance(data, ua.StatusChangeNotification):
                        # BadShutdown (server stopping), BadTimeout (subscription expired), or the
                        # client's own BadShutdown on a lost transport: start over in every case.
                        self._set_lost(f"subscription ended: {code_name(data.Status.value)}")
            if samples:
                return samples

    # ---- poll ----------------------------------------------------------------------------
    async def poll(self) -> list[Sample]:
        """Read every resolved point (in chunks); raises SessionError if the server does not answer."""
        if self.lost is not None:
            raise SessionError(self.lost)
        points = [p for p in self.config.points if p.name in self.nodes]
        samples: list[Sample] = []
        try:
            for start in range(0, len(points), CHUNK):
                chunk = points[start : start + CHUNK]
                values = await self.client.uaclient.read_attributes([self.nodes[p.name] for p in chunk],
                                                                    AttributeIds.Value)  # fmt: skip
                now = datetime.now(UTC)
                samples += [sample_of(p, dv, now) for p, dv in zip(chunk, values, strict=True)]
        except Exception as exc:
            raise SessionError(self.lost or describe(exc, self.config)) from exc
        return samples

    # ---- close ---------------------------------------------------------------------------
    async def close(self) -> None:
        """Disconnect without raising and without waiting long on a dead server."""
        self.client.connection_lost_callback = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), self.config.timeout)

    def server_thumbprint(self) -> str | None:
        """SHA-1 thumbprint of the certificate the server presented on the secure channel, if any."""
        der = getattr(self.client.security_policy, "peer_certificate", None)
        return thumbprint(der) if isinstance(der, bytes) and der else None
