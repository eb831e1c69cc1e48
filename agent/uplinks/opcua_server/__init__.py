"""The OPC UA server uplink: every device's latest values for SCADA, and writes back to devices."""

from __future__ import annotations

from agent.uplinks.api import UplinkFactory, UplinkPlugin
from agent.uplinks.opcua_server.config import OpcUaServerConfig


def _factory() -> UplinkFactory:
    from agent.uplinks.opcua_server.sink import create

    return create


PLUGIN = UplinkPlugin(
    name="opcua",
    config_model=OpcUaServerConfig,
    kind="live",
    factory=_factory,
    summary="An OPC UA server exposing every device's latest values (off by default).",
    title="OPC UA",
    default_on=True,
)
