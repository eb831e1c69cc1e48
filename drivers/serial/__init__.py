"""Sensors that stream frames on a serial port: text lines (regex) or binary frames (struct, checksum)."""

from __future__ import annotations

from agent.devices.api import Driver, DriverPlugin, ToolMain
from drivers.serial.config import SerialConfig


def _driver() -> type[Driver]:
    from drivers.serial.driver import SerialDriver

    return SerialDriver


def simulate_main(argv: list[str]) -> int:
    """``edge-agent simulate serial ...``: a sensor writing frames to a pty or a port."""
    # Imported on use: ``edge-agent`` lists every driver's tools on each start.
    from drivers.serial.simulator import main

    return main(argv)


def _tools() -> dict[str, ToolMain]:
    return {"simulate": simulate_main}


PLUGIN = DriverPlugin(
    name="serial",
    config_model=SerialConfig,
    factory=_driver,
    summary="Sensors streaming line (regex) or binary (struct + checksum) frames on a serial port",
    tools=_tools,
)
