"""The OPC UA driver: subscriptions (or polling), reconnection, health reporting.

``start()`` connects once so that an unreachable server, a refused login or a rejected
certificate is a startup error with a clear message. ``stream()`` then owns the connection:
when it is lost (server restarted, network cut: the client's watchdog probes every
``watchdog``), it reports a failed poll, reconnects with jittered exponential backoff
(``reconnect_min`` .. ``reconnect_max``), each failed attempt being a failed poll too, so the
runtime marks the device offline after ``offline_after`` of them, and re-creates the
subscription on the new session; the server's initial values then bring every point up to
date and the device back online.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from agent.contract.events import Reading
from agent.devices.api import Driver, DriverContext, next_slot
from agent.errors import DriverStartupError, DriverWriteError, WriteFailure
from agent.protocols.opcua_certs import AppCertificate, ensure_certificate
from drivers.opcua.certs import UserIdentity, load_user_identity
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.mapping import EventMapper, Sample
from drivers.opcua.session import Credentials, Session, SessionError
from drivers.opcua.uanames import UaError

log = logging.getLogger(__name__)


def quiet_library_logs() -> None:
    """Keep asyncua's own logging out of the agent's unless the agent runs at DEBUG.

    asyncua logs every publish response at INFO (formatting a 1,000-item response costs more
    than decoding it) and a traceback at ERROR for every lost connection; this driver says
    the same in one actionable line.
    """
    library = logging.getLogger("asyncua")
    if library.level == logging.NOTSET and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        library.setLevel(logging.CRITICAL)


async def load_credentials(config: OpcUaConfig) -> Credentials:
    """The password (registered as a secret for the log redactor) and the application certificate.

    Raises:
        DriverStartupError: the password file or the certificate folder cannot be used.
    """
    try:
        password = config.read_password()
    except OSError as exc:
        raise DriverStartupError(f"cannot read password_file {config.password_file}: {exc.strerror}") from exc
    if password:
        from agent.observability.logs import add_secret

        add_secret(password)
    cert: AppCertificate | None = None
    if config.cert_dir is not None:
        try:
            cert = await asyncio.to_thread(ensure_certificate, config.cert_dir, application_uri=config.application_uri)
        except ValueError as exc:
            raise DriverStartupError(str(exc)) from exc
        verb = "created" if cert.created else "using"
        (log.warning if cert.created else log.info)(
            "OPC UA application certificate %s: %s, SHA-1 thumbprint %s, application URI %s; trust it on the server",
            verb, cert.cert_path, cert.thumbprint, cert.application_uri,
        )  # fmt: skip
    user: UserIdentity | None = None
    if config.user_certificate is not None and config.user_private_key is not None:
        try:
            user = await asyncio.to_thread(load_user_identity, config.user_certificate, config.user_private_key)
        except (OSError, ValueError) as exc:
            raise DriverStartupError(str(exc)) from exc
        log.info("OPC UA certificate login with %s, SHA-1 thumbprint %s", config.user_certificate, user.thumbprint)
    return Credentials(password, cert, user)


class OpcUaDriver(Driver):
    """One OPC UA server (a PLC); its points are monitored items of one subscription."""

    config: OpcUaConfig

    def __init__(self, config: OpcUaConfig, context: DriverContext) -> None:
        """Prepare the event mapping; no I/O."""
        super().__init__(config, context)
        self.mapper = EventMapper(config)
        self.session: Session | None = None
        self._credentials: Credentials | None = None
        self._last_failure: str | None = None
        self._reported: dict[str, tuple[Any, str]] = {}  # points under a gateway deadband: last (value, quality)
        self.stats = {"connects": 0, "losses": 0, "batches": 0, "samples": 0, "deadband_dropped": 0}

    async def start(self) -> None:
        """Load credentials and connect once. Raises DriverStartupError with the reason."""
        quiet_library_logs()
        self._credentials = await load_credentials(self.config)
        try:
            self.session = await self._connect()
        except SessionError as exc:
            raise DriverStartupError(str(exc)) from exc

    async def stop(self) -> None:
        """Close the session (never raises)."""
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    async def write(self, point: str, value: Any) -> None:
        """Write an engineering value to ``point`` on the PLC, in the variable's own data type.

        Raises:
            DriverWriteError: unknown or unresolved point, not connected, or the server refused.
        """
        from asyncua import ua

        session = self.session
        spec = next((p for p in self.config.points if p.name == point), None)
        if spec is None:
            raise DriverWriteError(f"device {self.config.id} has no point {point!r}", "not_writable")
        if session is None or session.lost is not None or point not in session.nodes:
            reason = session.unresolved.get(point, session.lost) if session is not None else "not connected"
            raise DriverWriteError(f"point {point!r} cannot be written now: {reason or 'not connected'}", "unavailable")
        raw: Any = value
        if isinstance(value, int | float) and not isinstance(value, bool) and (spec.scale, spec.offset) != (1.0, 0.0):
            raw = (float(value) - spec.offset) / spec.scale
        node = session.client.get_node(session.nodes[point])
        try:
            variant_type = await node.read_data_type_as_variant_type()
            if variant_type not in (ua.VariantType.Float, ua.VariantType.Double, ua.VariantType.Boolean,
                                    ua.VariantType.String) and isinstance(raw, float):  # fmt: skip
                raw = round(raw)  # an integer variable: the PLC takes whole units
            await node.write_value(ua.DataValue(ua.Variant(raw, variant_type)))
        except (UaError, OSError, TimeoutError, ValueError, TypeError) as exc:
            # A UaStatusCodeError underneath is the PLC's own answer: uplinks may pass it on.
            kind: WriteFailure = (
                "timeout" if isinstance(exc, TimeoutError)
                else "unavailable" if isinstance(exc, OSError)
                else "bad_value" if isinstance(exc, ValueError | TypeError)
                else "device_error"
            )  # fmt: skip
            raise DriverWriteError(f"the server refused {point} = {value!r}: {exc}", kind) from exc
        log.info("device %s: wrote %s = %r (%s)", self.config.id, point, value, spec.node)

    async def _connect(self) -> Session:
        assert self._credentials is not None, "start() first"
        session = Session(self.config, self._credentials)
        await session.open()
        self.stats["connects"] += 1
        if self.config.security_policy != "None" and self.config.server_certificate is None:
            log.info("device %s: server certificate not pinned; the server presented SHA-1 thumbprint %s",
                     self.config.id, session.server_thumbprint())  # fmt: skip
        if self._last_failure is not None:
            log.info("device %s: connected again to %s", self.config.id, self.config.endpoint)
            self._last_failure = None
        return session

    def _failed(self, reason: str) -> None:
        self.context.poll_failed(reason)
        if reason != self._last_failure:  # one line per new reason, not one per attempt
            log.warning("device %s: %s", self.config.id, reason)
            self._last_failure = reason

    async def _reconnect(self) -> Session:
        delay = self.config.reconnect_min
        while True:
            await asyncio.sleep(random.uniform(delay / 2, delay))
            try:
                return await self._connect()
            except SessionError as exc:
                self._failed(str(exc))
            delay = min(delay * 2, self.config.reconnect_max)

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Yield the events of each publish (or poll) until cancelled; reconnect on loss."""
        while True:
            if self.session is None:
                self.session = await self._reconnect()
            session = self.session
            try:
                batches = self._subscribed(session) if self.config.mode == "subscribe" else self._polled(session)
                async for readings in batches:
                    yield readings
            except SessionError as exc:
                self.stats["losses"] += 1
                self._failed(str(exc))
                self.session = None
                await session.close()

    async def _subscribed(self, session: Session) -> AsyncIterator[list[Reading]]:
        initial = await session.subscribe()
        self.context.poll_ok()
        # A new monitored item reports its first value whatever the deadband (Part 4, 7.22.2): so here.
        self._reported.clear()
        if initial:
            yield self.mapper.readings(initial)
        deadbands = session.gateway_deadbands
        while True:
            samples = await session.next_batch()
            self.context.poll_ok()
            if deadbands:
                samples = [s for s in samples if s.point.name not in deadbands
                           or self._changed(s, deadbands[s.point.name])]  # fmt: skip
            readings = self._readings(samples)
            if readings:
                yield readings

    async def _polled(self, session: Session) -> AsyncIterator[list[Reading]]:
        interval = self.config.interval
        next_at = time.monotonic()
        while True:
            started = time.monotonic()
            samples = await session.poll()
            self.context.observe_poll(time.monotonic() - started)
            self.context.poll_ok()
            samples = [s for s in samples if self._changed(s, self._poll_deadband(s))] + session.unresolved_samples()
            readings = self._readings(samples)
            if readings:
                yield readings
            next_at = await next_slot(next_at, interval)

    def _readings(self, samples: list[Sample]) -> list[Reading]:
        self.stats["batches"] += 1
        self.stats["samples"] += len(samples)
        return self.mapper.readings(samples)

    def _poll_deadband(self, sample: Sample) -> float | None:
        deadband = self.config.deadband_of(sample.point)
        return deadband.value if deadband is not None else None

    def _changed(self, sample: Sample, deadband: float | None) -> bool:
        """Whether ``sample`` leaves the deadband around the point's last reported value.

        The gateway's own deadband (engineering units): poll mode's absolute one, and in subscribe
        mode the ones the server may not apply (see ``Session.gateway_deadbands``). A change of
        quality, or a first value, always passes.
        """
        last = self._reported.get(sample.point.name)
        self._reported[sample.point.name] = (sample.value, sample.quality)
        if deadband is None or last is None or last[1] != sample.quality:
            return True
        if isinstance(sample.value, int | float) and isinstance(last[0], int | float):
            if abs(sample.value - last[0]) > deadband:
                return True
            self._reported[sample.point.name] = last  # measure the next change from what was reported
            self.stats["deadband_dropped"] += 1
            return False
        return bool(sample.value != last[0])
