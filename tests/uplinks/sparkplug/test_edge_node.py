"""The Sparkplug edge node in a real agent process against a real Mosquitto: session, aliases,
rebirth, DCMD writes through a simulated Modbus device, store-and-forward across a broker
outage, bdSeq across restarts, and the primary host's STATE gating the BIRTHs.

One broker, one Modbus simulator and one agent serve the module; the tests run in order (the
outage and the restart come last).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.uplinks.sparkplug.proto import new_payload
from drivers.modbus.config import PointConfig
from drivers.modbus.simulator import SimulatedUnit, Simulator
from tests.conftest import AgentProcess, Mosquitto, free_port, wait_for
from tests.uplinks.sparkplug.helpers import GROUP, NODE, Recorder, site

POINTS = [
    {"name": "setpoint", "table": "holding", "address": 30, "type": "int16", "scale": 0.1, "offset": -40,
     "quantity": "temperature", "unit": "degC", "writable": True},
    {"name": "power", "table": "holding", "address": 10, "type": "int16", "scale": 0.001, "quantity": "active_power",
     "unit": "kW"},
]  # fmt: skip
DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms}\n"
    "  - {id: bay-1, driver: virtual, kind: parking, interval: 200ms, bay: P-07}\n"
    "  - {id: flaky-1, driver: virtual, kind: crosswalk, interval: 100ms, fail_every: 6, offline_after: 1,"
    " area: crossing-n}\n"
    "  - {id: pump-1, driver: modbus, host: 127.0.0.1, port: %d, interval: 200ms, timeout: 300ms, points: %s}\n"
)
WRITABLE = "writable: [{device: pump-1, point: setpoint}, {device: pump-1, point: power}]"
DOUBLE, BOOLEAN, INT64 = 10, 11, 4


class ModbusThread:
    """A simulated Modbus TCP unit served from its own thread and event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.unit = SimulatedUnit(1, [PointConfig.model_validate(p) for p in POINTS])
        self.loop = asyncio.new_event_loop()
        self.sim = Simulator([self.unit], period=3600)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.serve_tcp("127.0.0.1", self.port), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class World:
    dir: Path
    broker: Mosquitto
    rec: Recorder
    modbus: ModbusThread
    config: Path
    agent: AgentProcess
    metrics_port: int


def queueing_broker(workdir: Path) -> Mosquitto:
    """Mosquitto keeping QoS 0 messages for the recorder's persistent session while it reconnects."""
    broker = Mosquitto(workdir)
    broker.conf.write_text(broker.conf.read_text() + "queue_qos0_messages true\n")
    broker.start()
    return broker


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("sparkplug")
    broker = queueing_broker(workdir)
    modbus = ModbusThread()
    rec = Recorder(broker.port)
    devices = DEVICES % (modbus.port, orjson.dumps(POINTS).decode())
    config = site(workdir / "site.yaml", port=broker.port, devices=devices, sparkplug=WRITABLE)
    metrics_port = free_port()
    observed = f"observability: {{listen: '127.0.0.1:{metrics_port}'}}\ndevices:\n"
    config.write_text(config.read_text().replace("devices:\n", observed, 1))
    agent = AgentProcess(config, workdir / "agent.log").start()
    try:
        yield World(workdir, broker, rec, modbus, config, agent, metrics_port)
    finally:
        agent.kill()
        rec.close()
        broker.stop()
        modbus.close()


def node_msgs(rec: Recorder, kind: str, node: str = NODE) -> list[Any]:
    return [m for m in rec.of(kind) if m.topic.split("/")[3] == node]


def births_seen(w: World) -> None:
    """The agent's session is up (the first test also waits for every device's DBIRTH)."""
    w.rec.wait("DDATA", "meter-1", timeout=15)


def test_session_establishment_births_before_data(world: World) -> None:
    world.rec.wait("DBIRTH", "pump-1", timeout=15)
    births_seen(world)
    msgs = [m for m in world.rec.messages if m.topic.split("/")[3] == NODE]
    assert msgs[0].kind == "NBIRTH", [m.topic for m in msgs[:3]]
    nbirth = msgs[0]
    assert nbirth.payload.seq == 0 and not nbirth.retain and nbirth.qos == 0
    metrics = nbirth.metrics()
    assert metrics["bdSeq"].datatype == INT64 and metrics["bdSeq"].long_value == 0  # the first session of this state
    health = metrics["Gateway/devices/total"]  # the gateway's health as node metrics, aliased
    assert health.datatype == INT64 and health.HasField("alias") and metrics["Gateway/uptime_s"].datatype == DOUBLE
    rebirth = metrics["Node Control/Rebirth"]
    assert (rebirth.datatype, rebirth.boolean_value, rebirth.HasField("alias")) == (BOOLEAN, False, False)
    for device in ("meter-1", "bay-1", "pump-1"):
        first = next(m for m in msgs if m.device == device)
        assert first.kind == "DBIRTH", f"{device}: {first.kind} before its DBIRTH"
    dbirth = world.rec.of("DBIRTH", "meter-1")[0].metrics()
    assert {"voltage", "active_power", "frequency"} <= set(dbirth)
    voltage = dbirth["voltage"]
    assert voltage.datatype == DOUBLE and voltage.HasField("alias") and voltage.timestamp > 1.7e12
    assert dict(zip(voltage.properties.keys, [v.string_value for v in voltage.properties.values], strict=True)) \
        == {"engUnit": "V"}  # fmt: skip
    bay = world.rec.of("DBIRTH", "bay-1")[0].metrics()
    assert bay["bay/P-07/occupied"].datatype == BOOLEAN and bay["bay/P-07/confidence"].datatype == DOUBLE
    # Every BIRTH of the latest round (a late device births the node again): aliases unique across the node.
    last = max(i for i, m in enumerate(msgs) if m.kind == "NBIRTH")
    births = list(itertools.takewhile(lambda m: m.kind in ("NBIRTH", "DBIRTH"), msgs[last:]))
    assert {"meter-1", "bay-1", "pump-1"} <= {m.device for m in births}, "every DBIRTH right after the NBIRTH"
    aliases = [m.alias for b in births for m in b.payload.metrics if m.HasField("alias")]
    assert len(aliases) == len(set(aliases)) >= 19, "aliases are unique across the node"
    # seq runs 0..n over every message of the session, NBIRTH first.
    starts = [i for i, m in enumerate(msgs) if m.kind == "NBIRTH"] + [len(msgs)]
    for begin, end in itertools.pairwise(starts):  # a late device births the node again: seq from 0
        seqs = [m.payload.seq for m in msgs[begin:end] if m.kind != "NDEATH"]
        assert seqs == [i % 256 for i in range(len(seqs))]
    assert all(m.qos == 0 and not m.retain for m in msgs)


def test_ddata_carries_aliases_only(world: World) -> None:
    births_seen(world)
    birth = {m.alias: m for m in world.rec.of("DBIRTH", "meter-1")[-1].payload.metrics}
    data = wait_for(lambda: [d for d in world.rec.of("DDATA", "meter-1") if not d.payload.metrics[0].is_historical],
                    5, "a live DDATA")[-1]  # fmt: skip
    for m in data.payload.metrics:
        assert not m.HasField("name") and not m.HasField("datatype"), m
        assert m.alias in birth and m.WhichOneof("value") == "double_value"
        assert not m.is_historical


def commands_counted(w: World) -> dict[tuple[str, str, str], float]:
    """edge_agent_uplink_commands_total of the Sparkplug uplink, from the agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(s.labels["kind"], s.labels["outcome"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "edge_agent_uplink_commands_total" and s.labels["uplink"] == "sparkplug"}  # fmt: skip


def ask_rebirth(world: World) -> None:
    """NCMD Node Control/Rebirth = true; returns once the NBIRTH it causes arrived."""
    before = len(node_msgs(world.rec, "NBIRTH"))
    cmd = new_payload()
    cmd.timestamp = int(time.time() * 1000)
    metric = cmd.metrics.add()
    metric.name, metric.datatype, metric.boolean_value = "Node Control/Rebirth", BOOLEAN, True
    world.rec.publish(f"spBv1.0/{GROUP}/NCMD/{NODE}", cmd.SerializeToString())
    wait_for(lambda: len(node_msgs(world.rec, "NBIRTH")) > before, 5, "the NBIRTH of the rebirth")


def test_rebirth_on_ncmd(world: World) -> None:
    births_seen(world)
    bdseq = node_msgs(world.rec, "NBIRTH")[-1].metrics()["bdSeq"].long_value
    asked = commands_counted(world).get(("ncmd", "accepted", "rebirth"), 0)
    ask_rebirth(world)
    assert commands_counted(world)[("ncmd", "accepted", "rebirth")] == asked + 1
    reborn = node_msgs(world.rec, "NBIRTH")[-1]
    assert reborn.payload.seq == 0 and reborn.metrics()["bdSeq"].long_value == bdseq, "same bdSeq on a rebirth"
    world.rec.wait("DBIRTH", "pump-1", count=2)
    after = world.rec.messages[world.rec.messages.index(reborn) :]
    kinds = [m.kind for m in after[:4]]
    assert kinds == ["NBIRTH", "DBIRTH", "DBIRTH", "DBIRTH"], kinds


def test_a_device_offline_gets_ddeath_and_back_online_dbirth(world: World) -> None:
    births_seen(world)
    death = world.rec.wait("DDEATH", "flaky-1", timeout=5)[0]
    assert death.qos == 0 and not death.retain and not death.payload.metrics
    wait_for(lambda: [m for m in world.rec.of("DBIRTH", "flaky-1") if m.at > death.at], 5, "the DBIRTH once back")
    with world.rec.lock:
        after = [m for m in world.rec.messages if m.device == "flaky-1" and m.at >= death.at]
    reborn = next(i for i, m in enumerate(after) if m.kind == "DBIRTH")
    assert all(m.kind != "DDATA" for m in after[:reborn]), "no DDATA of a dead device"
    count = after[reborn].metrics()["area/crossing-n/count"]
    assert count.datatype == INT64 and count.HasField("alias")


def dcmd(world: World, device: str, alias: int, datatype: int, **value: Any) -> None:
    cmd = new_payload()
    cmd.timestamp = int(time.time() * 1000)
    metric = cmd.metrics.add()
    metric.alias, metric.datatype = alias, datatype
    for key, v in value.items():
        setattr(metric, key, v)
    world.rec.publish(f"spBv1.0/{GROUP}/DCMD/{NODE}/{device}", cmd.SerializeToString())


def test_dcmd_writes_a_writable_point_and_refuses_a_read_only_one(world: World) -> None:
    births_seen(world)
    counted = commands_counted(world)
    birth = world.rec.of("DBIRTH", "pump-1")[-1].metrics()
    setpoint, power = birth["setpoint"].alias, birth["power"].alias
    world.rec.clear()
    dcmd(world, "pump-1", setpoint, DOUBLE, double_value=21.5)
    wait_for(lambda: (6, 30, [615]) in world.modbus.unit.writes, 5, "the Modbus write of 21.5")

    def shows(alias: int, value: float) -> bool:
        return any(m.alias == alias and abs(m.double_value - value) < 1e-6
                   for d in world.rec.of("DDATA", "pump-1") for m in d.payload.metrics)  # fmt: skip

    wait_for(lambda: shows(setpoint, 21.5), 5, "the next DDATA carrying the written value")
    writes = len(world.modbus.unit.writes)
    world.rec.clear()
    dcmd(world, "pump-1", power, DOUBLE, double_value=3.0)  # listed in writable, read-only on the device
    dcmd(world, "pump-1", setpoint, BOOLEAN, boolean_value=True)  # wrong datatype
    dcmd(world, "pump-1", 99999, DOUBLE, double_value=1.0)  # unknown alias
    world.rec.publish(f"spBv1.0/{GROUP}/DCMD/{NODE}/pump-1", b"\xff\xff not protobuf")

    def logged() -> bool:
        out = world.agent.output()
        return out.count("Sparkplug DCMD refused") >= 3 and "undecodable DCMD" in out

    wait_for(logged, 5, "three refusals and the bad payload logged")
    log = world.agent.output()
    assert "device pump-1, metric power, value 3.0" in log and "not writable" in log
    assert "metric setpoint, value None: wrong datatype (the metric is Double)" in log
    assert "metric alias 99999" in log
    assert "ignored an undecodable DCMD" in log
    # Refusals are answered with the current value of the metric they named.
    wait_for(lambda: any(m.alias == power for d in world.rec.of("DDATA", "pump-1") for m in d.payload.metrics), 5,
             "the read-only point's value republished")  # fmt: skip
    assert len(world.modbus.unit.writes) == writes, "nothing refused reached the device"
    assert world.agent.proc is not None and world.agent.proc.poll() is None, "the session goes on"
    # Each refusal counted on /metrics by its reason, the write that went through as accepted.
    now = commands_counted(world)
    grew = {key: n - counted.get(key, 0) for key, n in now.items() if n != counted.get(key, 0)}
    assert grew == {("dcmd", "accepted", ""): 1, ("dcmd", "refused", "not_writable"): 1,
                    ("dcmd", "refused", "wrong_datatype"): 1, ("dcmd", "refused", "unknown_metric"): 1,
                    ("dcmd", "refused", "undecodable"): 1}, grew  # fmt: skip


def test_a_dcmd_the_device_refuses_is_logged_counted_and_answered_with_the_current_value(world: World) -> None:
    births_seen(world)
    ask_rebirth(world)  # an earlier test cleared the recorder: the DBIRTH gives the setpoint's alias
    setpoint = world.rec.wait("DBIRTH", "pump-1")[-1].metrics()["setpoint"].alias
    counted = commands_counted(world)
    writes = len(world.modbus.unit.writes)
    world.modbus.unit.faults.refuse_writes = 4  # server device failure: the unit stores nothing
    try:
        world.rec.clear()
        dcmd(world, "pump-1", setpoint, DOUBLE, double_value=-12.5)
        wait_for(lambda: "metric setpoint, value -12.5" in world.agent.output(), 5, "the device's refusal logged")
        line = next(x for x in world.agent.output().splitlines() if "metric setpoint, value -12.5" in x)
        assert "Sparkplug DCMD refused: group plant, node gw-test, device pump-1" in line, line
        assert "exception 4" in line, line  # the device's own answer, in the log line
        wait_for(lambda: any(m.alias == setpoint for d in world.rec.of("DDATA", "pump-1") for m in d.payload.metrics),
                 5, "the setpoint's current value republished")  # fmt: skip
        assert len(world.modbus.unit.writes) == writes, "the unit stored nothing"
        now = commands_counted(world)
        grew = {key: n - counted.get(key, 0) for key, n in now.items() if n != counted.get(key, 0)}
        assert grew == {("dcmd", "refused", "device_error"): 1}, grew
        assert world.agent.proc is not None and world.agent.proc.poll() is None, "the session goes on"
    finally:
        world.modbus.unit.faults.refuse_writes = None


def test_a_reload_that_adds_a_point_births_the_device_again_with_fresh_aliases(world: World) -> None:
    births_seen(world)
    ask_rebirth(world)
    old = {m.name: m.alias for m in world.rec.wait("DBIRTH", "pump-1")[-1].payload.metrics}
    points = [*POINTS, {"name": "power_raw", "table": "holding", "address": 10, "type": "uint16",
                        "quantity": "counter"}]  # fmt: skip
    text = world.config.read_text()
    world.config.write_text(text.replace(orjson.dumps(POINTS).decode(), orjson.dumps(points).decode()))
    mark = time.monotonic()
    world.agent.signal(signal.SIGHUP)

    def reborn() -> list[Any]:
        return [m for m in world.rec.of("DBIRTH", "pump-1") if m.at > mark and "power_raw" in m.metrics()]

    birth = wait_for(reborn, 10, "pump-1 born again with the new point")[0]
    with world.rec.lock:
        msgs = [m for m in world.rec.messages if m.at > mark and m.topic.split("/")[3] == NODE]
    nbirth = max(i for i, m in enumerate(msgs) if m.kind == "NBIRTH" and m.at <= birth.at)
    births = list(itertools.takewhile(lambda m: m.kind in ("NBIRTH", "DBIRTH"), msgs[nbirth:]))
    assert birth in births, "the whole node is born again: every DBIRTH right after an NBIRTH"
    new = {m.name: m.alias for m in birth.payload.metrics}
    assert set(new) == {"setpoint", "power", "power_raw"}
    assert not set(new.values()) & set(old.values()), "fresh aliases for the changed device"
    aliases = [m.alias for b in births for m in b.payload.metrics if m.HasField("alias")]
    assert len(aliases) == len(set(aliases)), "unique across the node"


def metric_times(rec: Recorder, device: str, alias: int) -> tuple[list[int], list[int]]:
    """(live, historical) timestamps of one aliased metric in the recorded DDATA."""
    live, hist = [], []
    for d in rec.of("DDATA", device):
        for m in d.payload.metrics:
            if m.alias == alias:
                (hist if m.is_historical else live).append(m.timestamp)
    return live, hist


def test_store_and_forward_across_a_broker_outage(world: World) -> None:
    births_seen(world)
    world.rec.wait("DDATA", "meter-1", count=5)
    time.sleep(0.5)
    world.broker.stop()
    down_at = int(time.time() * 1000)
    time.sleep(2)
    world.broker.start()
    up_at = int(time.time() * 1000)
    wait_for(lambda: any(m.payload.timestamp > down_at for m in node_msgs(world.rec, "NBIRTH")), 15,
             "an NBIRTH after the outage")  # fmt: skip
    nbirth = next(m for m in node_msgs(world.rec, "NBIRTH") if m.payload.timestamp > down_at)
    birth = wait_for(lambda: [m for m in world.rec.of("DBIRTH", "meter-1") if m.at >= nbirth.at], 5,
                     "meter-1's DBIRTH after the NBIRTH")[0]  # fmt: skip
    voltage = birth.metrics()["voltage"].alias
    wait_for(lambda: any(m.is_historical for d in world.rec.of("DDATA", "meter-1") if d.at >= nbirth.at
                         for m in d.payload.metrics), 10, "historical DDATA")  # fmt: skip
    after = [m for m in world.rec.messages if m.at >= nbirth.at and m.topic.split("/")[3] == NODE]
    first_hist = next(i for i, m in enumerate(after) if m.kind == "DDATA" and m.payload.metrics[0].is_historical)
    assert all(m.kind != "DDATA" or not m.payload.metrics[0].is_historical for m in after[:first_hist])
    assert after[0].kind == "NBIRTH" and {m.device for m in after[:first_hist] if m.kind == "DBIRTH"} >= {"meter-1"}
    # Live data keeps flowing during the drain: within 2 s of the NBIRTH.
    first_live = next(m for m in after if m.kind == "DDATA" and m.device == "meter-1"
                      and not m.payload.metrics[0].is_historical)  # fmt: skip
    assert first_live.at - nbirth.at < 2.0
    assert all(len(m.payload.metrics) <= 500 for m in after if m.kind == "DDATA")

    # Nothing lost: the voltage readings (every 200 ms) leave no gap across the outage.
    def gaps() -> list[int]:
        live, hist = metric_times(world.rec, "meter-1", voltage)
        stamps = sorted(set(live) | set(hist))
        window = [t for t in stamps if down_at - 1000 <= t <= up_at + 1000]
        return [b - a for a, b in itertools.pairwise(window)]

    def covered() -> bool:
        live = metric_times(world.rec, "meter-1", voltage)[0]
        return bool(gaps()) and max(gaps()) < 1000 and max(live) > up_at

    wait_for(covered, 5, "the readings of the outage, historical, and live ones after it")
    live, hist = metric_times(world.rec, "meter-1", voltage)
    assert min(hist) >= down_at - 4000 and max(hist) <= up_at + 1000, (down_at, up_at, hist)
    assert min(live) < down_at and max(live) > up_at


def test_bdseq_will_and_restart(world: World) -> None:
    births_seen(world)
    last = node_msgs(world.rec, "NBIRTH")[-1].metrics()["bdSeq"].long_value
    killed = time.monotonic()
    world.agent.signal(signal.SIGKILL)
    world.agent.wait(5)
    death = wait_for(lambda: [m for m in node_msgs(world.rec, "NDEATH") if m.at > killed], 10, "the NDEATH will")[0]
    assert death.metrics()["bdSeq"].long_value == last and not death.payload.HasField("seq")
    assert death.qos == 1 and not death.retain
    mark = time.monotonic()
    world.agent = AgentProcess(world.config, world.dir / "agent-2.log").start()
    wait_for(lambda: [m for m in node_msgs(world.rec, "NBIRTH") if m.at > mark], 15, "the NBIRTH after the restart")
    reborn = next(m for m in node_msgs(world.rec, "NBIRTH") if m.at > mark)
    assert reborn.metrics()["bdSeq"].long_value == (last + 1) % 256, "a restart never reuses the bdSeq"
    state = world.dir / "sparkplug.bdseq"
    assert state.stat().st_mode & 0o777 == 0o600
    # A clean stop says NDEATH itself (a clean disconnect sends no will).
    deaths = len(node_msgs(world.rec, "NDEATH"))
    world.agent.signal(signal.SIGTERM)
    world.agent.wait(10)
    wait_for(lambda: len(node_msgs(world.rec, "NDEATH")) > deaths, 5, "NDEATH on a clean stop")
    assert node_msgs(world.rec, "NDEATH")[-1].metrics()["bdSeq"].long_value == (last + 1) % 256


def state(online: bool, stamp: int) -> bytes:
    return orjson.dumps({"online": online, "timestamp": stamp})


def test_primary_host_state_gates_births(world: World, tmp_path: Path) -> None:
    node = "gw-b"
    config = site(tmp_path / "site.yaml", port=world.broker.port, devices="  - {id: meter-9, driver: virtual, kind: "
                  "meter, interval: 200ms}\n", sparkplug=f"edge_node_id: {node}, primary_host_id: scada")  # fmt: skip
    topic = "spBv1.0/STATE/scada"
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        wait_for(lambda: "waiting for primary host scada" in agent.output(), 10, "the edge node to wait")
        world.rec.publish(topic, b"online", retain=True)  # not the spec's JSON: never taken as online
        time.sleep(0.5)
        assert not node_msgs(world.rec, "NBIRTH", node)
        assert "not the spec's JSON" in agent.output()
        t0 = int(time.time() * 1000)
        world.rec.publish(topic, state(True, t0), retain=True)
        nbirth = wait_for(lambda: node_msgs(world.rec, "NBIRTH", node), 5, "the NBIRTH once the host is online")[0]
        bdseq = nbirth.metrics()["bdSeq"].long_value
        world.rec.publish(topic, state(False, t0 + 1), retain=True)
        death = wait_for(lambda: node_msgs(world.rec, "NDEATH", node), 5, "NDEATH when the host goes offline")[0]
        assert death.metrics()["bdSeq"].long_value == bdseq
        wait_for(lambda: agent.output().count("waiting for primary host scada") >= 2, 10, "a new session waiting")
        world.rec.publish(topic, state(True, t0 - 5), retain=True)  # older than the last seen: ignored
        time.sleep(0.5)
        assert len(node_msgs(world.rec, "NBIRTH", node)) == 1
        world.rec.publish(topic, state(True, t0 + 2), retain=True)
        again = wait_for(lambda: node_msgs(world.rec, "NBIRTH", node)[1:], 5, "the NBIRTH of the next session")[0]
        assert again.metrics()["bdSeq"].long_value == (bdseq + 1) % 256
    finally:
        world.rec.publish(topic, b"", retain=True)
        agent.kill()
