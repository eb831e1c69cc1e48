"""Simulated devices for demos, tests and benchmarks: meters, parking bays, crosswalk sensors."""

from __future__ import annotations

from agent.devices.api import Driver, DriverPlugin
from drivers.virtual.config import VirtualConfig


def _driver() -> type[Driver]:
    from drivers.virtual.driver import VirtualDriver

    return VirtualDriver


PLUGIN = DriverPlugin(
    name="virtual",
    config_model=VirtualConfig,
    factory=_driver,
    summary="Simulated meter, parking bay or crosswalk sensor with realistic signals",
)
