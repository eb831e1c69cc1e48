"""What the Modbus tests share: running a test body, reading measurements, one simulated TCP unit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from drivers.modbus.config import ModbusConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.pty import PtyPair
from drivers.modbus.simulator import SimulatedUnit, Simulator
from tests.conftest import Recorder, free_port


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def measurements(readings: list[Any] | None) -> dict[str, dict[str, Any]]:
    assert readings, "the poll produced no events"
    meter = [r for r in readings if r.type == "city.meter.reading"]
    return {m["point"]: m for m in meter[0].data["measurements"]} if meter else {}


@asynccontextmanager
async def tcp_unit(
    make_config: Callable[[int], ModbusConfig], *, start: bool = True
) -> AsyncIterator[tuple[ModbusDriver, SimulatedUnit, Simulator]]:
    """Unit 1 simulated on a free loopback port and a driver for it (started unless told not to)."""
    port = free_port()
    config = make_config(port)
    unit = SimulatedUnit(1, config.points)
    sim = Simulator([unit], period=3600)
    await sim.serve_tcp("127.0.0.1", port)
    driver = ModbusDriver(config, Recorder())
    try:
        if start:
            await driver.start()
        yield driver, unit, sim
    finally:
        await driver.stop()
        await sim.stop()


@asynccontextmanager
async def rtu_unit(
    make_config: Callable[[str], ModbusConfig],
) -> AsyncIterator[tuple[ModbusDriver, SimulatedUnit, Recorder]]:
    """Unit 1 simulated at 19200 baud on a pseudo-terminal and a started driver for it."""
    line = PtyPair()
    config = make_config(line.client)
    unit = SimulatedUnit(1, config.points)
    sim = Simulator([unit], period=3600)
    await sim.serve_serial(line.device, baudrate=19200)
    ctx = Recorder()
    driver = ModbusDriver(config, ctx)
    try:
        await driver.start()
        yield driver, unit, ctx
    finally:
        await driver.stop()
        await sim.stop()
        line.close()
