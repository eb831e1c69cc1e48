"""OPC UA client (asyncua): PLCs and SCADA servers, subscriptions or polling, with security and logins."""

from __future__ import annotations

from agent.devices.api import Driver, DriverPlugin, ToolMain
from drivers.opcua.config import OpcUaConfig


def _driver() -> type[Driver]:
    from drivers.opcua.driver import OpcUaDriver

    return OpcUaDriver


def _tools() -> dict[str, ToolMain]:
    from drivers.opcua import tools

    return {"browse": tools.browse_main, "simulate": tools.simulate_main}


PLUGIN = DriverPlugin(
    name="opcua",
    config_model=OpcUaConfig,
    factory=_driver,
    summary="OPC UA servers (PLCs, SCADA): subscriptions or polling, Basic256Sha256/Aes128 security, logins",
    tools=_tools,
)
