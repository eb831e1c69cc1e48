"""Modbus TCP, RTU (RS-485) and RTU-over-TCP: meters, I/O modules, detectors; with device profiles."""

from __future__ import annotations

from pathlib import Path

from agent.devices.api import DeviceConfig, Driver, DriverPlugin, ToolMain
from agent.devices.bus_tools import BusTools
from drivers.modbus.config import ModbusConfig


def _driver() -> type[Driver]:
    from drivers.modbus.driver import ModbusDriver

    return ModbusDriver


def _tools() -> dict[str, ToolMain]:
    from drivers.modbus import tools

    return {"profiles": tools.profiles_main, "scan": tools.scan_main, "read": tools.read_main,
            "simulate": tools.simulate_main}  # fmt: skip


def _add_hit(text: str, hit: object, site: Path) -> tuple[str, str]:
    from drivers.modbus.hit import propose

    return propose(text, hit, site)


def _bus_tools() -> BusTools:
    from drivers.modbus.page_tools import ModbusBusTools

    return ModbusBusTools()


def _check(devices: list[tuple[int, DeviceConfig]]) -> list[str]:
    """Devices on one RS-485 port agree on its line settings and do not share a unit id."""
    problems: list[str] = []
    first: dict[str, tuple[int, ModbusConfig]] = {}
    units: dict[tuple[str, int], int] = {}
    for index, device in devices:
        assert isinstance(device, ModbusConfig)
        key = device.bus_key()
        if (key, device.unit) in units:
            problems.append(f"devices[{index}].unit: unit {device.unit} on {key.split(':', 1)[1]} is also "
                            f"devices[{units[key, device.unit]}]; each unit on one bus needs its own id")  # fmt: skip
        units.setdefault((key, device.unit), index)
        if device.serial is None:
            continue
        if key in first and first[key][1].serial != device.serial:
            other_index, other = first[key]
            problems.append(f"devices[{index}].serial: {device.serial.port} is also used by devices[{other_index}] "
                            f"({other.id}) with other line settings; one RS-485 bus has one baudrate, parity and "
                            f"stop bits")  # fmt: skip
        first.setdefault(key, (index, device))
    return problems


PLUGIN = DriverPlugin(
    name="modbus",
    config_model=ModbusConfig,
    factory=_driver,
    summary="Modbus TCP / RTU / RTU-over-TCP meters and I/O modules, with device profiles",
    tools=_tools,
    global_verbs=("profiles",),
    check_devices=_check,
    add_hit=_add_hit,
    bus_tools=_bus_tools,
)
