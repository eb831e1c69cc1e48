"""The lorawan driver's keys: every mistake named by its key, and the shared connection's settings agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.model import parse_config
from agent.errors import ConfigError
from drivers.lorawan.config import LorawanConfig

SITE = "gateway: {id: gw-1}\nuplink: {mqtt: {host: 127.0.0.1}}\ndevices:\n"
APP = "2d7c1f0a-4b8e-4f3a-9c1d-5e6f7a8b9c0d"
NS = "network_server: {type: chirpstack, broker: 'ns.example:1883'}"


def _device(id_: str = "a", eui: str = "70B3D50000000001", extra: str = "codec: nwave-nps405, bay: b1",
            ns: str = NS, app: str = APP) -> str:  # fmt: skip
    return f"  - {{id: {id_}, driver: lorawan, {ns}, application: '{app}', dev_eui: '{eui}', {extra}}}\n"


def _problems(devices: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(SITE + devices, Path("/site/site.yaml"))
    return err.value.problems


def test_a_device_loads_with_its_defaults() -> None:
    config = parse_config(SITE + _device(eui="70-B3-D5-00-00-00-00-01"), Path("/site/site.yaml"))
    [device] = config.devices
    assert isinstance(device, LorawanConfig)
    assert device.dev_eui == "70b3d50000000001"  # any case, separators allowed; kept lowercase
    assert (device.interval, device.offline_after, device.health_interval) == (3600.0, 2, 3600.0)
    assert (device.network_server.host, device.network_server.port) == ("ns.example", 1883)
    assert device.network_server.state_dir == Path("/site/var/lorawan")
    assert device.client_id().startswith("edge-agent-lorawan-")  # fixed: the broker keeps the session


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (_device(eui="70B3D5zz00000001"),
         "devices[0].dev_eui: '70B3D5zz00000001' is not a DevEUI: 16 hex digits (any case, - or : between bytes "
         "allowed)"),
        (_device(extra="codec: nwave-nps450, bay: b1"),
         "devices[0].codec: unknown codec 'nwave-nps450'; did you mean nwave-nps405, nwave-nps310?"),
        (_device(extra="codec: nwave-nps405"), "devices[0].bay: codec nwave-nps405 is a parking detector: give the "
                                               "bay it watches"),
        (_device(extra="codec: milesight-em300-th, bay: b1"),
         "devices[0].bay: codec milesight-em300-th is a sensor, not a parking detector: remove bay"),
        (_device(app=APP.upper()),
         f"devices[0].application: '{APP.upper()}' is not a lowercase UUID (ChirpStack's topics are case-sensitive:"
         " write it in lowercase)"),
        (_device(app="70b3d57ed0000001"),
         "devices[0].application: '70b3d57ed0000001' is not a lowercase UUID (ChirpStack names an application by "
         "its id, a UUID; not the JoinEUI)"),
        (_device(app="parking", ns="network_server: {type: tts, broker: 'eu1.cloud.thethings.network:8883'}"),
         "devices[0].application: 'parking': The Things Stack wants application@tenant (lowercase, e.g. "
         "parking@ttn)"),
        (_device() + _device(id_="b", eui="70:b3:d5:00:00:00:00:01", extra="codec: bosch-tps110, bay: b2"),
         "devices[1].dev_eui: 70b3d50000000001 is also devices[0]; each DevEUI is one device"),
        (_device() + _device(id_="b", eui="70B3D50000000002", extra="codec: bosch-tps110, bay: b2",
                             ns="network_server: {type: chirpstack, broker: 'ns.example:1883', username: other}"),
         "devices[1].network_server.username: differs from devices[0] (a); devices of one broker and application "
         "share one connection and its settings"),
        (_device(ns="network_server: {type: chirpstack, broker: 'ns.example:99999'}"),
         "devices[0].network_server.broker: Value error, 'ns.example:99999': give host or host:port (port 1..65535)"),
    ],
)  # fmt: skip
def test_each_mistake_is_named_by_its_key(devices: str, expected: str) -> None:
    problems = _problems(devices)
    assert len(problems) == 1, problems
    assert problems[0].split(": ", 1)[1].replace("Value error, ", "") == expected.replace("Value error, ", "")


def test_another_application_on_the_same_broker_may_differ() -> None:
    other = "3e8d2f1b-5c9f-4a4b-8d2e-6f7a8b9c0d1e"
    config = parse_config(SITE + _device() + _device(id_="b", eui="70B3D50000000002", app=other,
                          ns="network_server: {type: chirpstack, broker: 'ns.example:1883', username: other}"),
                          Path("/site/site.yaml"))  # fmt: skip
    first, second = config.devices
    assert isinstance(first, LorawanConfig) and isinstance(second, LorawanConfig)
    assert first.connection_key() != second.connection_key()
    assert first.client_id() != second.client_id()
