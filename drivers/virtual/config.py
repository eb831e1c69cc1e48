"""Config keys of the ``virtual`` driver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.devices.api import DeviceConfig


class VirtualConfig(DeviceConfig):
    """A simulated device. ``kind`` chooses the signal and the event type it emits."""

    driver: Literal["virtual"] = Field(description="Simulated device.")
    kind: Literal["meter", "parking", "crosswalk"] = Field(
        description="meter: city.meter.reading; parking: city.parking.occupancy; crosswalk: city.crosswalk.presence."
    )
    seed: int | None = Field(default=None, description="Random seed, for repeatable signals.")
    burst: int = Field(
        default=1,
        ge=1,
        le=10000,
        description="Events per interval (benchmarks use it to reach high rates).",
    )
    fail_every: int = Field(
        default=0,
        ge=0,
        description="Simulate a device fault: every Nth poll fails (0 = never). For tests.",
    )
    bay: str = Field(default="A1", description="Parking bay id (kind: parking).")
    area: str = Field(default="north", description="Waiting area id (kind: crosswalk).")
