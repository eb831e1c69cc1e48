"""What a BIRTH holds and when a bdSeq is used, on the edge node's own parts: the model's newest
known values and device status, a dead device's history held back, and bdSeq against a real
Mosquitto (a refused attempt sends no CONNECT, so it uses none)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.uplinks.mqtt.errors import ConnectionLost
from agent.uplinks.sparkplug.bdseq import BdSeq
from agent.uplinks.sparkplug.client import Connection
from agent.uplinks.sparkplug.config import SparkplugConfig
from agent.uplinks.sparkplug.forward import Forward
from agent.uplinks.sparkplug.metrics import DOUBLE, Value
from agent.uplinks.sparkplug.model import Model
from agent.uplinks.sparkplug.payloads import node_death
from agent.uplinks.sparkplug.proto import new_payload
from tests.conftest import Mosquitto, free_port

TS = 1_772_352_000_000


def reading(value: float, ts: int, name: str = "voltage") -> list[Value]:
    return [Value(name, value, DOUBLE, "V", "good", ts, name)]


def test_a_buffered_reading_newer_than_the_known_one_becomes_current_an_older_one_never() -> None:
    model = Model()
    meter = model.device("meter-1")
    model.learn(meter, reading(230.0, TS + 1000))  # live, from the last session
    model.learn(meter, reading(229.0, TS), historical=True)  # the backlog starts before it
    assert meter.current["voltage"].value == 230.0
    model.learn(meter, reading(231.5, TS + 2000), historical=True)  # read while the node waited
    assert meter.current["voltage"].value == 231.5, "the newest reading is the BIRTH's current value"
    model.learn(meter, reading(228.0, TS + 500))  # live always wins (the clock may have stepped back)
    assert meter.current["voltage"].value == 228.0
    _typed, new = model.learn(meter, reading(5.0, TS, "frequency"), historical=True)
    assert new and meter.current["frequency"].value == 5.0, "a metric first seen in the backlog is born with it"


def test_a_health_reading_older_than_a_birth_still_fills_the_null_node_metric() -> None:
    model = Model()
    placeholder = model.node.current["Gateway/uptime_s"]
    assert placeholder.value is None and placeholder.timestamp == 0
    model.learn(model.node, reading(12.0, TS, "Gateway/uptime_s"), historical=True)
    assert model.node.current["Gateway/uptime_s"].value == 12.0


def test_the_newest_status_decides_whatever_order_it_arrives_in() -> None:
    model = Model()
    pump = model.device("pump-1")
    model.status(pump, False, TS + 1000)
    model.status(pump, True, TS)  # an older online, read later (another priority class)
    model.learn(pump, reading(1.0, TS + 500), historical=True)  # a reading from before the outage
    assert not pump.online
    model.status(pump, True, TS + 2000)
    assert pump.online


def test_a_dead_devices_history_waits_for_its_birth() -> None:
    model = Model()
    forward = Forward(keepalive=5.0)
    forward.ready = lambda device: model.device(device).born
    forward.add("pump-1", reading(1.0, TS), row_id=7)
    assert not forward.due(100.0) and forward.next_wake(100.0) == 1.0, "no busy loop on held history"
    model.device("pump-1").born = True
    assert forward.due(100.0) and forward.next_wake(100.0) == 0.0
    assert forward.take(100.0)[2] == [7]


def _sparkplug(port: int) -> SparkplugConfig:
    return SparkplugConfig.model_validate({"enabled": True, "servers": [{"host": "127.0.0.1", "port": port}],
                                           "keepalive": "2s"})  # fmt: skip


async def _attempt(cfg: SparkplugConfig, bdseq: BdSeq) -> Connection:
    server = cfg.servers[0]
    conn = Connection(cfg, server, "spb-test-bdseq", ("spBv1.0/g/NDEATH/n", lambda: node_death(bdseq.next())))
    await conn.open()
    return conn


def test_bdseq_is_used_only_by_a_connect_that_is_sent(tmp_path: Path) -> None:
    bdseq = BdSeq(tmp_path / "sparkplug.bdseq")
    closed = free_port()  # nothing listens: the TCP connect is refused, no CONNECT is written
    for _ in range(3):
        with pytest.raises(ConnectionLost, match="cannot connect"):
            asyncio.run(_attempt(_sparkplug(closed), bdseq))
    assert not bdseq.path.exists(), "refused attempts used a bdSeq"
    broker = Mosquitto(tmp_path)
    broker.start()
    try:

        async def twice() -> list[int]:
            seen = []
            for _ in range(2):
                conn = await _attempt(_sparkplug(broker.port), bdseq)
                assert conn.up and conn.will_payload is not None
                will = new_payload()
                will.ParseFromString(conn.will_payload)
                seen.append(next(m.long_value for m in will.metrics if m.name == "bdSeq"))
                await conn.close()
            return seen

        assert asyncio.run(twice()) == [0, 1], "one bdSeq per CONNECT, carried in its will"
        assert BdSeq(bdseq.path).next() == 2, "kept on disk: a restart goes on from the last one used"
    finally:
        broker.stop()
