"""What the page shows, read from the agent's status model: devices, values, faults, buffer, uplinks."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.observability.metrics import disk_space
from agent.ui.faults import explain
from agent.ui.preview import preview
from agent.ui.values import UiValues

if TYPE_CHECKING:
    from agent.runtime.agent import Agent

BUFFER_REFRESH = 1.0  # seconds between buffer figures asked of the commit thread


class StatusView:
    """One agent's figures as the page's JSON."""

    def __init__(self, agent: Agent, values: UiValues) -> None:
        """Reads only: the agent's status model, device set, uplinks and the values sink."""
        self._agent = agent
        self.values = values
        self._refreshed = 0.0

    async def snapshot(self) -> dict[str, Any]:
        """The whole page's data."""
        agent = self._agent
        status = agent.status
        if time.monotonic() - self._refreshed >= BUFFER_REFRESH and status.running:
            self._refreshed = time.monotonic()
            await status.refresh()
        stats = status.cached()
        self.values.forget({cfg.id for cfg in agent.config.devices})
        statuses = agent.devices.statuses()
        reasons = agent.devices.reasons()
        devices = []
        for cfg in agent.config.devices:
            state = statuses.get(cfg.id, "starting" if cfg.enabled else "disabled")
            reason = reasons.get(cfg.id)
            devices.append(
                {
                    "id": cfg.id,
                    "driver": cfg.driver,
                    "status": state,
                    "fault": explain(reason) if state not in ("online", "disabled") else None,
                    "points": self.values.points(cfg.id),
                }
            )
        free, total = disk_space(agent.config.buffer.path.parent)
        return {
            "gateway": agent.config.gateway.id,
            "site": agent.config.gateway.site,
            "version": __version__,
            "uptime_s": round(time.time() - status.started),
            "devices": devices,
            "buffer": {
                "events": stats.rows if stats is not None else None,
                "bytes": stats.bytes if stats is not None else None,
                "max_bytes": agent.config.buffer.max_bytes,
                "oldest_age_s": (
                    round(max(0.0, time.time() - stats.oldest_created), 1)
                    if stats is not None and stats.oldest_created
                    else None
                ),
            },
            "disk": {"free_bytes": free, "total_bytes": total},
            "uplinks": [
                {
                    "name": name,
                    "connected": runner.uplink.status.connected,
                    "last_error": runner.uplink.status.last_error,
                    "published": runner.uplink.status.published,
                }
                for name, runner in agent.uplinks.durable.items()
            ],
            "clock": status.clock(),
        }

    def previews(self, device: str) -> list[dict[str, Any]] | None:
        """The CloudEvent each of a device's latest readings becomes, with its verdict; None: no such device."""
        if device not in {cfg.id for cfg in self._agent.config.devices}:
            return None
        gateway = self._agent.config.gateway.id
        latest = self.values.latest_events(device)
        return [preview(gateway, device, kind, data, moment) for kind, (data, moment) in sorted(latest.items())]
