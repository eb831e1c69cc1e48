"""``edge-agent doctor`` for LoRaWAN devices: each network server connection, listened to for a while.

Starting the driver would be wrong twice over: its devices report hourly, and its fixed client id
would take the running agent's session (and the uplinks queued in it). The doctor connects with a
client id of its own and a clean session, listens for the check's seconds, and reports what came:
uplinks at QoS 0 from ChirpStack (lost while the agent is down), messages that are not JSON,
configured devices heard, unconfigured DevEUIs.
"""

from __future__ import annotations

import asyncio
import secrets

from agent.devices.api import DeviceConfig
from agent.errors import DriverStartupError
from drivers.lorawan.config import LorawanConfig
from drivers.lorawan.connection import Connection

Row = tuple[str, str, str, str | None]


async def check(devices: list[DeviceConfig], timeout: float) -> list[Row]:
    """One row per connection of ``devices`` (LoRaWAN configs)."""
    groups: dict[str, list[LorawanConfig]] = {}
    for device in devices:
        assert isinstance(device, LorawanConfig)
        groups.setdefault(device.connection_key(), []).append(device)
    return list(await asyncio.gather(*(_connection(key, group, timeout) for key, group in groups.items())))


async def _connection(key: str, devices: list[LorawanConfig], timeout: float) -> Row:
    first = devices[0]
    target = f"lorawan {key} ({len(devices)} device{'s' if len(devices) != 1 else ''})"
    connection = Connection(first.network_server, first.application, f"edge-agent-doctor-{secrets.token_hex(4)}",
                            key, grace=0.0)  # fmt: skip
    connection.persistent = False  # never leave a session behind on the broker
    try:
        await asyncio.wait_for(connection.open(), timeout)
    except (DriverStartupError, TimeoutError) as exc:
        connection.close()
        why = str(exc) or f"no answer within {timeout:g} s"
        return target, "FAIL", why, "check network_server: broker, tls, username, password_file"
    try:
        await asyncio.sleep(timeout)
    finally:
        connection.close()
    counts = connection.counts
    configured = {d.dev_eui for d in devices}
    heard = len(configured & set(connection.unknown))  # nothing claims a DevEUI here: all land there
    others = len(set(connection.unknown) - configured)
    finding = (f"connected; in {timeout:g} s {counts['messages']} message(s), {heard} configured device(s) heard"
               + (f", {others} unconfigured DevEUI(s) (edge-agent scan lorawan)" if others else ""))  # fmt: skip
    if counts["bad_messages"]:
        return (target, "warn", f"{finding}; {counts['bad_messages']} message(s) not understood (see the log)",
                "ChirpStack: set json=true in [integration.mqtt]")  # fmt: skip
    if counts["qos0_uplinks"]:
        return (target, "warn", f"{finding}; uplinks arrive at QoS 0: those sent while the agent is down are lost",
                "set qos=1 in ChirpStack's [integration.mqtt]")  # fmt: skip
    if first.network_server.type == "chirpstack" and not counts["unknown_uplinks"]:  # every uplink lands there
        return target, "ok", f"{finding}; no uplink heard within {timeout:g} s: QoS not checked", None
    return target, "ok", finding, None
