"""LoRaWAN parking detectors and sensors, read from the network server's MQTT integration (ChirpStack v4, TTS v3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.devices.api import DeviceConfig, Driver, DriverPlugin, ToolMain
from drivers.lorawan.config import LorawanConfig, differing_key


def _driver() -> type[Driver]:
    from drivers.lorawan.driver import LorawanDriver

    return LorawanDriver


def _tools() -> dict[str, ToolMain]:
    from drivers.lorawan import tools

    return {"scan": tools.scan_main, "simulate": tools.simulate_main}


def _check(devices: list[tuple[int, DeviceConfig]]) -> list[str]:
    """Each DevEUI once; devices sharing a broker and application agree on its connection settings.

    Also tells the connections which DevEUIs the loaded config has (drivers/lorawan/connection.py).
    """
    from drivers.lorawan import connection

    problems: list[str] = []
    configured: dict[str, set[str]] = {}
    first: dict[str, tuple[int, LorawanConfig]] = {}
    euis: dict[str, int] = {}
    looked: dict[Path, str | None] = {}
    for index, device in devices:
        assert isinstance(device, LorawanConfig)
        if device.dev_eui in euis:
            problems.append(f"devices[{index}].dev_eui: {device.dev_eui} is also devices[{euis[device.dev_eui]}]; "
                            "each DevEUI is one device")  # fmt: skip
        euis.setdefault(device.dev_eui, index)
        key = device.connection_key()
        if device.enabled:
            configured.setdefault(key, set()).add(device.dev_eui)
        if key in first:
            other_index, other = first[key]
            differs = differing_key(device.network_server, other.network_server)
            if differs is not None:
                problems.append(f"devices[{index}].network_server.{differs}: differs from devices[{other_index}] "
                                f"({other.id}); devices of one broker and application share one connection and "
                                "its settings")  # fmt: skip
        first.setdefault(key, (index, device))
        problems += _secrets(index, device, looked)
    connection.CONFIGURED.clear()
    connection.CONFIGURED.update({key: frozenset(euis) for key, euis in configured.items()})
    return problems


def _secrets(index: int, device: LorawanConfig, looked: dict[Path, str | None]) -> list[str]:
    """A password or private key file group or others may read is refused (it would be a warning elsewhere:
    the network server's API key opens every device of the application)."""
    from agent.config.model import open_permissions

    server = device.network_server
    out = []
    key_file = server.tls.key_file if server.tls else None
    for key, path in (("password_file", server.password_file), ("tls.key_file", key_file)):
        if path is None:
            continue
        if path not in looked:  # 10,000 devices name one file
            looked[path] = open_permissions(path)
        if looked[path] is not None:
            out.append(f"devices[{index}].network_server.{key}: {looked[path]}")
    return out


async def _doctor(devices: list[DeviceConfig], timeout: float) -> list[tuple[str, str, str, str | None]]:
    from drivers.lorawan import doctor

    return await doctor.check(devices, timeout)


def _links() -> dict[str, dict[str, Any]]:
    from drivers.lorawan.connection import POOL

    return POOL.states()


PLUGIN = DriverPlugin(
    name="lorawan",
    config_model=LorawanConfig,
    factory=_driver,
    summary="LoRaWAN parking detectors and sensors through ChirpStack v4 or The Things Stack v3 (MQTT)",
    tools=_tools,
    check_devices=_check,
    links=_links,
    doctor=_doctor,
)
