"""Interop with an independent host: peer/host.js, on Eclipse Tahu's codec (sparkplug-payload 1.0.3)
and npm's mqtt client, against our edge node (a real edge-agent) on one Mosquitto.

The host publishes STATE, decodes all traffic with Tahu's decoder, resolves aliases from the
BIRTHs, sends Rebirth and a DCMD write, and prints what it saw. What it saw is compared with what
the simulated Modbus unit served, across a broker kill and restart and the host going offline and
back: every value decoded is one the unit served, each value served while the host could not see
it still reaches it, bdSeq steps once per new MQTT session, and seq runs unbroken after each NBIRTH.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from drivers.modbus.config import PointConfig
from tests.conftest import AgentProcess, Mosquitto, wait_for, write_config
from tests.sparkplug.node_peer import NodeScript
from tests.sparkplug.world import POINTS, ModbusUnit

GROUP, NODE, HOST = "plant", "gw-test", "interop-host"
SETPOINT, POWER = (PointConfig.model_validate(p) for p in POINTS)


@dataclass
class Interop:
    broker: Mosquitto
    unit: ModbusUnit
    agent: AgentProcess
    host: NodeScript

    def messages(self, kind: str, device: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.host.seen("message") if m["kind"] == kind and (device is None or m["device"] == device)]

    def edge_said(self) -> list[dict[str, Any]]:
        """What the edge node published (the host also hears its own commands)."""
        return [m for m in self.host.seen("message") if m["kind"] not in ("NCMD", "DCMD")]

    def saw(self, name: str, value: float) -> bool:
        return any(x["name"] == name and x["value"] is not None and abs(x["value"] - value) < 1e-6
                   for m in self.edge_said() for x in m["metrics"])  # fmt: skip

    def serve(self, power: float) -> None:
        """The unit's power reading from now on (its signals do not move on their own: period 3600 s)."""
        self.unit.loop.call_soon_threadsafe(self.unit.unit.set, POWER, power)

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        """wait_for, naming on timeout what the agent logged and the host saw last."""
        try:
            wait_for(predicate, timeout, what)
        except AssertionError as e:
            seen = [f"{m['kind']} {m['device']} seq={m.get('seq')}" for m in self.host.seen("message")[-8:]]
            raise AssertionError(f"{e}\nagent log:\n{self.agent.output()[-2500:]}\nhost saw last: {seen}") from None

    def command(self, **cmd: Any) -> None:
        self.host.send(json.dumps({"group": GROUP, "node": NODE, **cmd}))


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interop]:
    workdir = tmp_path_factory.mktemp("spb-interop")
    broker = Mosquitto(workdir)
    # No persistence: after the kill the host's old online STATE is gone, so the edge births only
    # once the host is back and subscribed (the host then sees every BIRTH it must resolve aliases by).
    broker.conf.write_text(broker.conf.read_text().replace("persistence true", "persistence false"))
    broker.start()
    unit = ModbusUnit()
    unit.unit.set(SETPOINT, 20.0)
    unit.unit.set(POWER, 0.5)
    site = write_config(workdir / "site.yaml", port=broker.port, devices=(
        f"  - {{id: pump-1, driver: modbus, host: 127.0.0.1, port: {unit.port}, interval: 100ms, timeout: 300ms,"
        f" points: {json.dumps(POINTS)}}}\n"))  # fmt: skip
    block = (f"  sparkplug: {{enabled: true, group_id: {GROUP}, servers: [{{host: 127.0.0.1, port: {broker.port}}}],"
             f" primary_host_id: {HOST}, keepalive: 2s, reconnect_min: 100ms, reconnect_max: 300ms,"
             " writable: [{device: pump-1, point: setpoint}]}\n")  # fmt: skip
    site.write_text(site.read_text().replace("buffer:", block + "buffer:", 1))
    host = NodeScript("host.js", f"mqtt://127.0.0.1:{broker.port}", HOST)
    agent = AgentProcess(site, workdir / "agent.log").start()
    try:
        yield Interop(broker, unit, agent, host)
    finally:
        agent.kill()
        host.stop()
        unit.close()
        broker.stop()
    assert not host.garbage, f"the host printed lines that are not JSON: {host.garbage[:3]}"


def bdseq(message: dict[str, Any]) -> int:
    return int(next(x["value"] for x in message["metrics"] if x["name"] == "bdSeq"))


def test_host_decodes_births_and_resolves_aliases_in_data(interop: Interop) -> None:
    interop.wait(lambda: interop.saw("power", 0.5) and interop.messages("DDATA", "pump-1"), 20, "pump-1's first data")
    interop.serve(1.5)
    interop.wait(lambda: interop.saw("power", 1.5), 5, "the host to decode power 1.5")
    birth = interop.messages("DBIRTH", "pump-1")[0]
    assert {x["name"]: x["value"] for x in birth["metrics"]} == {"setpoint": 20.0, "power": 0.5}
    for data in interop.messages("DDATA"):
        assert all(x["name"] in ("setpoint", "power") and x["alias"] is not None for x in data["metrics"]), data


def test_host_writes_with_dcmd_and_sees_the_value_come_back(interop: Interop) -> None:
    interop.command(cmd="write", device="pump-1", metric="setpoint", value=22.5)
    interop.wait(lambda: (6, 30, [625]) in interop.unit.unit.writes, 5, "the Modbus write of 22.5 (raw 625)")
    interop.wait(lambda: interop.saw("setpoint", 22.5), 5, "the host to decode setpoint 22.5")


def test_host_rebirth_brings_every_birth_again_with_the_same_bdseq(interop: Interop) -> None:
    before = len(interop.messages("NBIRTH"))
    interop.command(cmd="rebirth")

    def reborn() -> bool:
        return len(interop.messages("NBIRTH")) > before and len(interop.messages("DBIRTH", "pump-1")) > before

    interop.wait(reborn, 5, "the rebirth")
    first, reborn = interop.messages("NBIRTH")[0], interop.messages("NBIRTH")[-1]
    assert bdseq(reborn) == bdseq(first) and reborn["seq"] == 0
    assert {x["name"]: x["value"] for x in interop.messages("DBIRTH", "pump-1")[-1]["metrics"]} == {
        "setpoint": 22.5, "power": 1.5}  # fmt: skip


def test_broker_kill_and_restart_a_new_session_with_the_next_bdseq(interop: Interop) -> None:
    last = bdseq(interop.messages("NBIRTH")[-1])
    refused = interop.agent.output().count("Connection refused")
    interop.broker.stop(signal.SIGKILL)
    interop.serve(2.5)  # served while no broker: must still reach the host
    # the outage lasts until the edge has tried to reconnect and been refused at least once
    interop.wait(lambda: interop.agent.output().count("Connection refused") > refused, 10, "a refused reconnect")
    interop.broker.start()
    interop.wait(lambda: any(bdseq(m) > last for m in interop.messages("NBIRTH")), 15, "the NBIRTH after the restart")
    interop.wait(lambda: interop.saw("power", 2.5), 5, "power 2.5, served during the outage")


def test_host_offline_and_back(interop: Interop) -> None:
    last = bdseq(interop.messages("NBIRTH")[-1])
    interop.host.send(json.dumps({"cmd": "offline"}))
    interop.host.wait("disconnected")
    interop.serve(3.5)  # served while the host was away
    interop.host.send(json.dumps({"cmd": "online"}))
    interop.wait(lambda: any(bdseq(m) > last for m in interop.messages("NBIRTH")), 15,
             "the edge's new session once the host is back")  # fmt: skip
    interop.wait(lambda: interop.saw("power", 3.5), 5, "power 3.5, served while the host was offline")


def test_everything_the_host_decoded_is_what_the_unit_served(interop: Interop) -> None:
    served = {"power": {0.5, 1.5, 2.5, 3.5}, "setpoint": {20.0, 22.5}}
    for m in interop.edge_said():
        if m["device"] != "pump-1":
            continue
        for x in m["metrics"]:
            assert x["value"] is not None and round(x["value"], 6) in served[x["name"]], (m["kind"], x)
    # seq: 0 at each NBIRTH, then one more per message (NDEATH aside), as the host saw them
    seqs: list[int] = []
    for m in interop.edge_said():
        if m["kind"] == "NBIRTH":
            seqs = [0]
            assert m["seq"] == 0, m
        elif m["kind"] != "NDEATH" and seqs:
            assert m["seq"] == (seqs[-1] + 1) % 256, (m["kind"], m["seq"], seqs[-3:])
            seqs.append(m["seq"])


# topics-nbirth-bdseq-increment: "increment by one on every new MQTT CONNECT packet"; the attempts
# refused while the broker was down sent none, so they use no value.
def test_bdseq_steps_by_one_per_new_mqtt_session(interop: Interop) -> None:
    nbirths = [bdseq(m) for m in interop.messages("NBIRTH")]
    first = nbirths[0]
    assert nbirths == [first, first, first + 1, first + 2], f"NBIRTH bdSeqs as the host saw them: {nbirths}"
