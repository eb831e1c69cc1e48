"""The shared connection against a real Mosquitto: a QoS 1 uplink is acknowledged only once handled."""

from __future__ import annotations

import asyncio

import pytest

from drivers.lorawan import connection as connections
from drivers.lorawan.config import NetworkServer
from drivers.lorawan.connection import Connection
from drivers.lorawan.messages import Message
from drivers.lorawan.simulator import DEFAULT_APPLICATION, Scenario, parse_devices, publish
from tests.conftest import Mosquitto

APP = DEFAULT_APPLICATION["chirpstack"]


def _connection(port: int) -> Connection:
    server = NetworkServer(type="chirpstack", broker=f"127.0.0.1:{port}")
    return Connection(server, APP, "edge-agent-lorawan-test", f"chirpstack:127.0.0.1:{port}/{APP}", grace=5.0)


async def _until(predicate: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_an_uplink_not_handled_before_a_stop_comes_again_and_a_handled_one_does_not(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = Scenario("chirpstack", APP, parse_devices("nwave-nps405:3"), uplinks=1, gateways=1, seed=3,
                        round_=0, join=False, faults=False)  # fmt: skip
    first, second, stranger = (s.dev_eui for s in scenario.ledger)
    # Two are configured (as the config's load tells the connections): the second's messages wait for it,
    # the third's count as unconfigured at once (and do not end the second's wait).
    monkeypatch.setitem(connections.CONFIGURED, f"chirpstack:127.0.0.1:{broker.port}/{APP}", frozenset({first, second}))

    async def run() -> tuple[list[Message], list[Message]]:
        connection = _connection(broker.port)
        await connection.open()  # the session exists from now on
        got: list[Message] = []
        connection.register(first, got.append)
        await asyncio.to_thread(publish, scenario, "127.0.0.1", broker.port, 0)
        await _until(lambda: len(got) == 2 and stranger in connection.unknown)  # first's uplink and status
        assert connection._waiting_count == 2  # the second's, still waiting
        for message in got:
            connection.ack(message)  # handled: its events would be in the buffer
        await asyncio.sleep(0.2)  # the acknowledgements reach the broker
        connection.close()  # the agent stops; the second device's messages were never handled
        again = _connection(broker.port)
        await again.open()
        redelivered: list[Message] = []
        again.register(first, redelivered.append)
        again.register(second, redelivered.append)
        await _until(lambda: len(redelivered) >= 2)
        await asyncio.sleep(0.3)  # nothing more comes
        again.close()
        return got, redelivered

    got, redelivered = asyncio.run(run())
    assert {m.dev_eui for m in got} == {first}
    assert sorted(type(m).__name__ for m in redelivered) == ["Status", "Uplink"]
    assert {m.dev_eui for m in redelivered} == {second}  # the stranger's were acknowledged as unconfigured


def test_no_more_than_max_in_hand_messages_are_taken_from_the_broker_until_handled(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "MAX_IN_HAND", 5)
    scenario = Scenario("chirpstack", APP, parse_devices("nwave-nps405:1"), uplinks=20, gateways=1, seed=4,
                        round_=0, join=False, faults=False)  # fmt: skip
    total = len(scenario.messages())
    assert total > 10

    async def run() -> tuple[int, int, int]:
        connection = _connection(broker.port)
        await connection.open()
        got: list[Message] = []
        connection.register(scenario.ledger[0].dev_eui, got.append)
        await asyncio.to_thread(publish, scenario, "127.0.0.1", broker.port, 0)
        await _until(lambda: len(got) == 5)
        await asyncio.sleep(0.3)  # more would come now if paho's thread kept reading
        held = len(got)
        handled = 0
        while handled < total:  # handle what came; room for as many more
            await _until(lambda done=handled: len(got) > done)  # type: ignore[misc]
            for message in got[handled:]:
                connection.ack(message)
            handled = len(got)
        peak = connection.in_hand_peak
        connection.close()
        return held, handled, peak

    held, handled, peak = asyncio.run(run())
    assert held == 5  # the rest waited in the broker
    assert handled == total and peak == 5


def test_doctor_says_when_no_uplink_came_to_check_qos_by(broker: Mosquitto) -> None:
    from drivers.lorawan import doctor
    from drivers.lorawan.config import LorawanConfig

    server = {"type": "chirpstack", "broker": f"127.0.0.1:{broker.port}"}
    device = LorawanConfig.model_validate({"id": "bay-1", "driver": "lorawan", "dev_eui": "70b3d5fffe000001",
                                           "codec": "nwave-nps405", "bay": "P1", "application": APP,
                                           "network_server": server})  # fmt: skip
    [(target, verdict, finding, fix)] = asyncio.run(doctor.check([device], 0.3))
    assert target == f"lorawan chirpstack:127.0.0.1:{broker.port}/{APP} (1 device)"
    assert (verdict, fix) == ("ok", None)
    assert finding == (
        "connected; in 0.3 s 0 message(s), 0 configured device(s) heard; no uplink heard within 0.3 s: QoS not checked"
    )
