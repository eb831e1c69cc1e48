"""Running the configured uplinks: one task per durable uplink over its own feed, live sinks
started beside them, each restarted alone when its settings change (like Telegraf's
``RunningOutput``: the core owns the buffer and the counters, the plugin only delivers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from agent.config.model import AgentConfigBase, BufferConfig
from agent.errors import ConfigError
from agent.store.feed import Feed
from agent.store.outbox import Outbox
from agent.uplinks.api import (
    DurableUplink,
    Identity,
    Inbound,
    LiveSink,
    Reports,
    UplinkContext,
    UplinkPlugin,
    UplinkSettings,
)
from agent.uplinks.registry import load_uplinks

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT = 1.0  # seconds an uplink gets to say it goes offline
SINK_STOP_TIMEOUT = 2.0


def feed_path(buffer: BufferConfig, plugin: UplinkPlugin) -> Path:
    """The outbox file of a durable uplink: the main buffer file, or ``<stem>.<name><suffix>`` beside it."""
    path = buffer.path
    return path if plugin.owns_buffer_file else path.with_name(f"{path.stem}.{plugin.name}{path.suffix}")


class DurableRunner:
    """One durable uplink: the plugin's instance, its feed and its task."""

    def __init__(self, plugin: UplinkPlugin, settings: UplinkSettings, context: UplinkContext) -> None:
        """Build the instance (nothing runs until :meth:`start`)."""
        self.plugin, self.settings, self.context = plugin, settings, context
        self.uplink: DurableUplink = _build(plugin, settings, context)  # type: ignore[assignment]
        self.feed: Feed | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The uplink's key under ``uplink:``."""
        return self.plugin.name

    def start(self, feed: Feed) -> None:
        """Deliver from ``feed`` until stopped."""
        self.feed = feed
        self.task = asyncio.get_running_loop().create_task(self.uplink.run(feed), name=f"uplink-{self.name}")

    async def stop(self) -> None:
        """Let the uplink say goodbye, then cancel it."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.uplink.goodbye(), GOODBYE_TIMEOUT)
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def replace(self, settings: UplinkSettings) -> None:
        """New settings: a new instance on the same feed and status (the counters carry over)."""
        feed = self.feed
        await self.stop()
        self.settings = settings
        self.uplink = _build(self.plugin, settings, self.context)  # type: ignore[assignment]
        if feed is not None:
            self.start(feed)


class Uplinks:
    """Every configured uplink, durable and live."""

    def __init__(
        self,
        config: AgentConfigBase,
        inbound: Inbound,
        reports: Reports | None = None,
        identity: Identity | None = None,
    ) -> None:
        """Build an instance of each active uplink (plugins are imported now, connections later).

        ``reports``: what the fleet channel publishes, when it is on; ``identity``: the client
        certificate the main uplink connects with, when the core manages it (fleet.identity).
        """
        self._inbound = inbound
        self._reports = reports
        self._identity = identity
        self._gateway = config.gateway.id
        self._state_dir = config.buffer.path.parent
        self._control_root = config.fleet.root if config.fleet.enabled else None
        self.durable: dict[str, DurableRunner] = {}
        self.live: dict[str, LiveSink] = {}  # started ones
        self._live_settings: dict[str, UplinkSettings] = {}
        plugins = load_uplinks()
        for name, settings in _durable_first(config, plugins):
            plugin = plugins[name]
            if plugin.kind == "durable":
                self.durable[name] = DurableRunner(plugin, settings, self._context(plugin))
            else:
                self._live_settings[name] = settings
        if not self.durable:
            raise ConfigError(["uplink: no durable uplink is configured, so no event could be delivered"])

    def _context(self, plugin: UplinkPlugin) -> UplinkContext:
        title = plugin.title or plugin.name
        identity = self._identity if plugin.owns_buffer_file else None  # the main uplink's
        return UplinkContext(
            plugin.name, title, self._gateway, self._inbound, self._state_dir, self._control_root, self._reports,
            identity=identity,
        )  # fmt: skip

    @property
    def main(self) -> DurableRunner:
        """The first durable uplink: its file is the main buffer, its figures the top-level ones."""
        return next(iter(self.durable.values()))

    def outboxes(self, buffer: BufferConfig) -> dict[str, Callable[[], Outbox]]:
        """Per durable uplink, how to open its outbox file (the main one first)."""

        def opener(path: Path) -> Callable[[], Outbox]:
            return lambda: Outbox(path, buffer.max_bytes, media_max_bytes=buffer.media_quota)

        return {name: opener(feed_path(buffer, runner.plugin)) for name, runner in self.durable.items()}

    def start_durable(self, feeds: dict[str, Feed]) -> None:
        """Start delivering, each from its own feed."""
        for name, runner in self.durable.items():
            runner.start(feeds[name])

    async def start_live(self) -> None:
        """Start every live sink; one that cannot start is logged and left out, the rest run."""
        plugins = load_uplinks()
        for name, settings in self._live_settings.items():
            plugin = plugins[name]
            sink: LiveSink = _build(plugin, settings, self._context(plugin))  # type: ignore[assignment]
            try:
                await sink.start()
            except (OSError, ValueError) as exc:
                log.error("%s not started (%s); the other uplinks are not affected", plugin.title or name, exc)
                continue
            self.live[name] = sink
            log.info("%s", sink.describe())

    async def stop_live(self) -> None:
        """Stop every live sink."""
        sinks, self.live = self.live, {}
        for sink in sinks.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sink.stop(), SINK_STOP_TIMEOUT)

    async def stop(self) -> None:
        """Stop everything (durable uplinks say goodbye first)."""
        await asyncio.gather(*(runner.stop() for runner in self.durable.values()))
        await self.stop_live()

    @staticmethod
    def check_reload(old: AgentConfigBase, new: AgentConfigBase) -> None:
        """Refuse, before anything changes, a reload that adds or removes a durable uplink."""
        plugins = load_uplinks()
        before = {name for name, _ in _durable_first(old, plugins) if plugins[name].kind == "durable"}
        after = {name for name, _ in _durable_first(new, plugins) if plugins[name].kind == "durable"}
        if before != after:
            changed = ", ".join(f"uplink.{name}" for name in sorted(before ^ after))
            raise ConfigError([f"{changed}: starting or stopping a durable uplink needs a restart; nothing applied"])

    async def reload(self, old: AgentConfigBase, new: AgentConfigBase) -> list[str]:
        """Restart each uplink whose settings changed (check :meth:`check_reload` first)."""
        changes = []
        active = dict(_durable_first(new, load_uplinks()))
        for name, runner in self.durable.items():
            if active[name] != runner.settings:
                changes.append(f"uplink.{name}")
                await runner.replace(active[name])
        live = {name: s for name, s in active.items() if name not in self.durable}
        if live != self._live_settings:
            changes += [f"uplink.{n}" for n in sorted(set(live) | set(self._live_settings))
                        if live.get(n) != self._live_settings.get(n)]  # fmt: skip
            await self.stop_live()
            self._live_settings = live
            await self.start_live()
        return changes


def _durable_first(config: AgentConfigBase, plugins: dict[str, UplinkPlugin]) -> list[tuple[str, UplinkSettings]]:
    """Active uplinks with an installed plugin: the one owning the buffer file first, then by name."""
    found = [(name, s) for name, s in config.uplink.active().items() if name in plugins]
    return sorted(found, key=lambda item: (not plugins[item[0]].owns_buffer_file, item[0]))


def _build(plugin: UplinkPlugin, settings: UplinkSettings, context: UplinkContext) -> DurableUplink | LiveSink:
    return plugin.build(settings, context)
