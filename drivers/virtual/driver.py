"""Realistic simulated signals: the demo's and tests' field devices."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from agent.contract.data import crosswalk_presence, measurement, meter_reading, parking_occupancy
from agent.contract.events import CROSSWALK_PRESENCE, METER_READING, PARKING_OCCUPANCY, Reading
from agent.devices.api import Driver, DriverContext
from agent.errors import DriverReadError
from drivers.virtual.config import VirtualConfig


class VirtualDriver(Driver):
    """Emits a signal per ``kind``; state evolves from poll to poll like the real thing."""

    config: VirtualConfig

    def __init__(self, config: VirtualConfig, context: DriverContext) -> None:
        """Seed the signal; no I/O."""
        super().__init__(config, context)
        self._rng = random.Random(config.seed)
        self._polls = 0
        self._energy_kwh = round(self._rng.uniform(1000, 50000), 3)
        self._occupied = False
        self._since = datetime.now(UTC)
        self._window_max = 0

    async def read(self) -> list[Reading]:
        """Produce ``burst`` readings of this device's kind."""
        self._polls += 1
        if self.config.fail_every and self._polls % self.config.fail_every == 0:
            raise DriverReadError("simulated timeout (fail_every)")
        make = {"meter": self._meter, "parking": self._parking, "crosswalk": self._crosswalk}[self.config.kind]
        return [make() for _ in range(self.config.burst)]

    def _meter(self) -> Reading:
        # A three-phase feeder: power wanders around a daily-ish mean, energy integrates it.
        power_kw = max(0.0, self._rng.gauss(42.0, 3.5))
        self._energy_kwh += power_kw * self.config.interval / 3600.0
        voltage = self._rng.gauss(230.0, 1.2)
        data = meter_reading(
            [
                measurement("active_energy", round(self._energy_kwh, 4), "kWh"),
                measurement("active_power", round(power_kw, 3), "kW"),
                measurement("voltage", round(voltage, 1), "V"),
                measurement("frequency", round(self._rng.gauss(50.0, 0.02), 3), "Hz"),
            ]
        )
        return Reading(METER_READING, data)

    def _parking(self) -> Reading:
        # Cars stay a while: flip with a small probability per poll.
        if self._rng.random() < 0.15:
            self._occupied = not self._occupied
            self._since = datetime.now(UTC)
        data = parking_occupancy(self.config.bay, self._occupied, round(self._rng.uniform(0.85, 0.99), 2), self._since)
        return Reading(PARKING_OCCUPANCY, data)

    def _crosswalk(self) -> Reading:
        count = max(0, int(self._rng.gauss(2.0, 1.6)))
        self._window_max = max(self._window_max, count)
        data = crosswalk_presence(self.config.area, count, self._window_max)
        if self._polls % 10 == 0:
            self._window_max = 0
        return Reading(CROSSWALK_PRESENCE, data)
