"""The page's server: uvicorn (h11) on the agent's own event loop, started and stopped with the agent.

uvicorn's ``serve()`` would take SIGINT and SIGTERM for itself; here the agent keeps them (its
shutdown commits queued events and says goodbye upstream), and stops the page as it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from agent.fleet.logring import LogRing
from agent.ui.app import build_app
from agent.ui.bind import Bind, BindError, resolve
from agent.ui.site_routes import site_routes
from agent.ui.siteapply import SiteEditor
from agent.ui.state import UiState, state_dir
from agent.ui.values import UiValues
from agent.ui.view import StatusView
from agent.ui.zones import zone_routes
from agent.uplinks.api import Command

if TYPE_CHECKING:
    from agent.config.model import AgentConfigBase
    from agent.fleet.diagnostics import FleetDiagnostics
    from agent.runtime.agent import Agent

log = logging.getLogger("agent.ui")
setup_log = logging.getLogger("agent.ui.setup")

START_TIMEOUT = 5.0
STOP_TIMEOUT = 1  # of the agent's shutdown budget: open event streams are cut after it


def keep_setup_out_of_rings() -> None:
    """The setup link goes to the journal only: the fleet's in-memory log ring (what a diagnostics
    bundle carries off the gateway) drops it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogRing) and _not_setup not in handler.filters:
            handler.addFilter(_not_setup)


def _not_setup(record: logging.LogRecord) -> bool:
    return record.name != setup_log.name


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the agent's stay in place."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _AgentSource:
    """What the page reads of one agent."""

    def __init__(self, agent: Agent, values: UiValues) -> None:
        self.view = StatusView(agent, values)
        self._agent = agent
        self._diagnostics: FleetDiagnostics | None = None

    async def snapshot(self) -> dict[str, object]:
        return await self.view.snapshot()

    def previews(self, device: str) -> list[dict[str, Any]] | None:
        return self.view.previews(device)

    def site_config(self) -> AgentConfigBase:
        return self._agent.config

    async def bundle(self) -> Path:
        # Made at the first download: from then on the recent log lines are kept in memory.
        if self._diagnostics is None:
            from agent.fleet.diagnostics import FleetDiagnostics  # the doctor's checks: at the first download

            self._diagnostics = FleetDiagnostics(self._agent)
        reply = await self._diagnostics.diagnostics(Command("diagnostics", {}, "ui"))
        if reply.status != "ok" or reply.data is None:
            raise RuntimeError(reply.error or reply.status)
        return self._diagnostics.store.folder / f"{reply.data['bundle']}.tar.gz"


def _listening_socket(bind: Bind) -> socket.socket:
    """The page's socket, bound here: uvicorn would end the whole process (SystemExit) on a busy port."""
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on accepted sockets only when it is IPPROTO_TCP, and
    # without it every answer on a kept-alive connection waited 40 ms (Nagle against delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((bind.host, bind.port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:  # uvicorn's way to say it could not start: never the agent's end
        log.error("ui: the page's server stopped at start")
    finally:
        sock.close()


class UiServer:
    """The technician page of one agent."""

    def __init__(self, agent: Agent) -> None:
        """Feeds the agent's readings to the page from now on (``agent.latest``)."""
        self.agent = agent
        self.values = UiValues(agent.latest)
        agent.latest = self.values
        self._server: QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.bind: Bind | None = None

    async def start(self) -> None:
        """Listen; on failure, log why and run without the page (data collection comes first)."""
        config = self.agent.config
        try:
            bind = resolve(config.ui)
        except BindError as exc:
            log.error("ui: %s; running without the page", exc)
            return
        state = UiState(state_dir(config))
        ssl: dict[str, str] = {}
        if bind.tls:
            from agent.ui.tls import ensure_certificate  # cryptography (7 MB): only off loopback

            cert, key = await asyncio.to_thread(ensure_certificate, state.folder, bind.host, config.gateway.id)
            ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        hosts = {bind.authority}
        if not bind.tls:
            hosts.add(f"localhost:{bind.port}")
        origin = bind.url.rstrip("/")
        editor = SiteEditor(self.agent)  # one, so page parts' changes queue on one lock
        parts = [partial(site_routes, editor), partial(zone_routes, self.agent, editor=editor)]
        app = build_app(_AgentSource(self.agent, self.values), state, hosts=hosts, origin=origin, tls=bind.tls,
                        parts=parts, devices=lambda: list(self.agent.config.devices))  # fmt: skip
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start lines speak of Ctrl+C
        server = QuietServer(
            uvicorn.Config(
                app, host=bind.host, port=bind.port, http="h11", ws="none", lifespan="off",
                log_config=None, access_log=False, server_header=False, timeout_graceful_shutdown=STOP_TIMEOUT,
                **ssl,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        try:
            sock = _listening_socket(bind)
        except OSError as exc:
            log.error(
                "ui.listen: cannot listen on %s: %s; running without the page", bind.authority, exc.strerror or exc
            )
            return
        task = asyncio.get_running_loop().create_task(_serve(server, sock), name="ui")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not server.started and not task.done() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if not server.started:
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, STOP_TIMEOUT)
            sock.close()
            log.error("ui: the page did not start on %s; running without it", bind.authority)
            return
        self._server, self._task, self.bind = server, task, bind
        extra = ""
        if bind.tls:
            from agent.ui.tls import fingerprint

            extra = f" (certificate SHA-256 {fingerprint(Path(ssl['ssl_certfile']))})"
        log.info("ui: technician page on %s%s", bind.url, extra)
        if not state.has_password() and not state.token_pending():
            token = await asyncio.to_thread(state.issue_token)
            keep_setup_out_of_rings()
            # The one place a secret is logged: it is good once, for 10 minutes, and only until a
            # password exists; `edge-agent ui token` prints a new one.
            setup_log.warning("ui: first start, no password yet: open %s#setup=%s within 10 minutes", bind.url, token)

    async def stop(self) -> None:
        """Stop listening and end open event streams."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT + 0.5)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
