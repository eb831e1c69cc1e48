"""The OPC UA server uplink: every device's latest values for SCADA, and writes back to devices."""

from __future__ import annotations

from agent.uplinks.api import UplinkPlugin
from agent.uplinks.opcua_server.config import OpcUaServerConfig

PLUGIN = UplinkPlugin(
    name="opcua",
    config_model=OpcUaServerConfig,
    kind="live",
    factory="agent.uplinks.opcua_server.sink:create",
    summary="An OPC UA server exposing every device's latest values (off by default).",
    title="OPC UA",
    default_on=True,
)
