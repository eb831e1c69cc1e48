"""The agent as a service: systemd notifications and watchdog, and the HTTP endpoints.

Both read the one status model (:mod:`agent.runtime.status`) and the stall verdict
(:mod:`agent.runtime.liveness`); the metrics are exported at scrape time from a snapshot
built here (see agent/observability/metrics.py), on the HTTP server's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent import __version__
from agent.observability.metrics import Snapshot, disk_space, load_average, memory, temperature_c
from agent.runtime.status import class_name
from agent.runtime.systemd import Notifier, Watchdog

if TYPE_CHECKING:
    from agent.observability.http import HealthServer
    from agent.runtime.agent import Agent
    from agent.ui.server import UiServer

log = logging.getLogger(__name__)

STATUS_INTERVAL = 10.0  # seconds between systemd STATUS= updates (sent only when changed)


class Service:
    """Heartbeat, systemd and HTTP for one agent."""

    def __init__(self, agent: Agent) -> None:
        """Nothing starts until :meth:`start`."""
        self.agent = agent
        self._notifier: Notifier | None = None
        self._watchdog: Watchdog | None = None
        self._http: HealthServer | None = None
        self._ui: UiServer | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_status = ""

    async def start(self) -> None:
        """Before anything else: the heartbeat, the notifier and the HTTP endpoints."""
        self.agent.liveness.beat = time.monotonic()
        self._notifier = Notifier.from_env()
        self._heartbeat = asyncio.get_running_loop().create_task(
            self.agent.liveness.heartbeat(STATUS_INTERVAL, self._send_status), name="heartbeat"
        )
        await self._start_http()
        if self.agent.config.ui.enabled:
            try:
                from agent.ui.server import UiServer  # Starlette and uvicorn: only when the page is on
            except ImportError as exc:
                log.error("ui: enabled, but the ui extra is missing (%s): pip install 'edge-agent[ui]'", exc)
            else:
                self._ui = UiServer(self.agent)
                await self._ui.start()

    def _send_status(self) -> None:
        line = self.agent.status.status_line()
        if self._notifier is not None and line != self._last_status:
            self._notifier.status(line)
            self._last_status = line

    def started(self) -> None:
        """Everything runs: READY=1, and the watchdog pings while every loop progresses."""
        notifier = self._notifier
        if notifier is None:
            return
        notifier.ready(self.agent.status.status_line())
        interval = notifier.watchdog_interval
        if interval is not None:
            self._watchdog = Watchdog(notifier, interval, self.agent.liveness.stalls)
            self._watchdog.start()
            log.info("systemd watchdog: pinging every %.1f s while every loop progresses", interval)

    def reloading(self) -> None:
        """RELOADING=1."""
        if self._notifier is not None:
            self._notifier.reloading()

    def ready(self) -> None:
        """READY=1 again after a reload."""
        if self._notifier is not None:
            self._notifier.ready(self.agent.status.status_line())

    def stopping(self) -> None:
        """STOPPING=1."""
        if self._notifier is not None:
            self._notifier.stopping()

    async def observability_changed(self, old: object) -> None:
        """Restart the HTTP endpoints if their address changed."""
        new = self.agent.config.observability
        before = getattr(old, "observability", None)
        if before is None or (new.listen, new.allow_remote) != (before.listen, before.allow_remote):
            if self._http is not None:
                server, self._http = self._http, None
                await asyncio.to_thread(server.stop)
            await self._start_http()

    async def _start_http(self) -> None:
        listen = self.agent.config.observability.listen
        if listen is None:
            return
        from agent.observability.http import HealthServer, build_registry  # prometheus_client: only when on

        liveness = self.agent.liveness
        server = HealthServer(
            listen, build_registry(self.metrics_snapshot), live=liveness.liveness, ready=liveness.readiness
        )
        try:
            server.start()
        except OSError as exc:
            # Monitoring must not stop data collection: say so loudly and run without it.
            log.error("observability: cannot listen on %s: %s; running without /metrics and /healthz", listen, exc)
            return
        self._http = server
        host, port = server.address
        log.info("observability: http://%s:%d/metrics, /healthz, /readyz", host, port)

    async def stop(self) -> None:
        """Last of all: watchdog, HTTP, heartbeat, notifier."""
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.stop)
            self._watchdog = None
        if self._http is not None:
            server, self._http = self._http, None
            await asyncio.to_thread(server.stop)
        if self._ui is not None:
            await self._ui.stop()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._notifier is not None:
            self._notifier.close()

    def metrics_snapshot(self) -> Snapshot:
        """Everything /metrics exports, read from the scrape thread."""
        agent = self.agent
        status, config = agent.status, agent.config
        stats = status.stats_threadsafe()
        main = status.uplink_figures(agent.uplinks.main)
        total, available = memory()
        load = load_average()
        live, _ = agent.liveness.liveness()
        ready, _ = agent.liveness.readiness()
        now = time.time()
        main_feed = agent.store.main.name
        return Snapshot(
            gateway=config.gateway.id,
            site=config.gateway.site,
            version=__version__,
            produced={key: cell[0] for key, cell in list(agent.pipeline.produced.items())},
            dropped={k[1:]: n for k, n in list(agent.health.dropped_total.items()) if k[0] == main_feed},
            not_accepted=agent.store.not_accepted,
            published=main["published"],
            delivered=status.delivered(),
            buffer_events=(
                {class_name(p): n for p, n in stats.rows_by_priority.items()} if stats is not None else None
            ),
            buffer_bytes=stats.bytes if stats is not None else None,
            buffer_max_bytes=config.buffer.max_bytes,
            buffer_oldest_age=(
                (max(0.0, now - stats.oldest_created) if stats.oldest_created else 0.0) if stats is not None else None
            ),
            disk_free=disk_space(config.buffer.path.parent)[0],
            uplink_connected=main["connected"],
            uplink_reconnects=max(0, main["connects"] - 1),
            uplink_disconnects=main["disconnects"],
            uplink_errors=main["errors"],
            devices=agent.devices.drivers(),
            telemetry=list(agent.devices.telemetry.values()),
            loop_heartbeat_age=max(0.0, time.monotonic() - agent.liveness.beat),
            loop_lag=agent.liveness.lag,
            live=live,
            ready=ready,
            temperature=temperature_c(),
            mem_available=available if total is not None else None,
            load1=load[0] if load else None,
            fleet=agent.fleet_figures(),
            cert_expiry=_cert_expiry(agent),
            cert_renewal_failures=dict(agent.renewer.state.failures) if agent.renewer is not None else {},
            links=agent.devices.links(),
            uplink_commands={
                (name, *key): n
                for name, runner in list(agent.uplinks.durable.items())
                for key, n in list(runner.uplink.status.commands.items())
            },
        )


def _cert_expiry(agent: Agent) -> float | None:
    """Seconds until the client certificate expires, when the agent renews it."""
    state = agent.renewer.state if agent.renewer is not None else None
    if state is None or state.not_after is None:
        return None
    return (state.not_after - datetime.now(UTC)).total_seconds()
