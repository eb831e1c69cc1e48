"""The OPC UA server as a live sink of the uplink seam."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from agent.uplinks.api import UplinkContext
from agent.uplinks.opcua_server.config import OpcUaServerConfig
from agent.uplinks.opcua_server.server import OpcUaServer


class OpcUaSink:
    """Starts and stops the server; each reading goes straight to :meth:`OpcUaServer.update`."""

    def __init__(self, settings: OpcUaServerConfig, context: UplinkContext) -> None:
        """Writes from clients reach the devices through the core's inbound channel."""
        self.settings = settings
        self.server = OpcUaServer(
            settings, on_write=partial(context.inbound.write, origin=context.title), name=context.gateway
        )

    async def start(self) -> None:
        """Listen (OSError: port busy; ValueError: certificates or users)."""
        await self.server.start()

    def update(self, device: str, event_type: str, data: dict[str, Any], time: datetime) -> None:
        """The latest value of a device's points (coalesced until the next publish interval)."""
        self.server.update(device, event_type, data, time)

    async def stop(self) -> None:
        """Stop listening; never raises."""
        await self.server.stop()

    def describe(self) -> str:
        """Where it listens and which certificate it shows."""
        return f"OPC UA server on {self.settings.listen} (certificate thumbprint {self.server.thumbprint or 'none'})"


def create(settings: OpcUaServerConfig, context: UplinkContext) -> OpcUaSink:
    """The plugin's factory."""
    return OpcUaSink(settings, context)
