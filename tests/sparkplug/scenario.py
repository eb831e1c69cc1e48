"""One recorded session of OUR edge node (a real ``edge-agent`` process with the Sparkplug uplink and
simulated devices) that gives every TCK-lite check its evidence, in the TCK's order of events:

wait for the primary host -> births and data -> a DCMD write -> Rebirth -> a device offline ->
a stale offline STATE (ignored) -> a valid one (NDEATH, next server) -> the host's old online
STATE there (ignored: older than the offline) -> a new online (births) -> an intentional stop.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProcess, write_config
from tests.sparkplug.packets import Packet
from tests.sparkplug.session import NAMESPACE, Session, split_topic
from tests.sparkplug.spb import BOOLEAN, DOUBLE, decode
from tests.sparkplug.world import ABSENT, POINTS, Host, ModbusUnit, servers

GROUP, NODE, HOST = "plant", "gw-test", "scada"
SERVERS = ("A", "B")
QUIET = 0.3  # s: a window in which the edge must NOT do something (birth, leave); the check reads the order


def _site(path: Path, *, json_port: int, proxies: list[int], modbus_port: int, extra: str = "") -> Path:
    devices = (
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms}\n"
        f"  - {{id: pump-1, driver: modbus, host: 127.0.0.1, port: {modbus_port}, interval: 200ms, timeout: 300ms,"
        f" points: {json.dumps([*POINTS, ABSENT])}}}\n"
    )
    write_config(path, port=json_port, devices=devices)
    servers_yaml = ", ".join(f"{{host: 127.0.0.1, port: {p}}}" for p in proxies)
    block = (f"  sparkplug: {{enabled: true, group_id: {GROUP}, servers: [{servers_yaml}], keepalive: 2s,"
             " reconnect_min: 100ms, reconnect_max: 300ms,"
             f" writable: [{{device: pump-1, point: setpoint}}]{extra}}}\n")  # fmt: skip
    path.write_text(path.read_text().replace("buffer:", block + "buffer:", 1))
    return path


def _is(kind: str, server: str, after: int = -1, device: str = "") -> Callable[[Packet], bool]:
    def pred(p: Packet) -> bool:
        if not (p.up and p.kind == "PUBLISH" and p.server == server and p.n > after):
            return False
        k, _, _, d = split_topic(p.topic)
        return k == kind and (not device or d == device)

    return pred


def record_ours(workdir: Path) -> Session:
    """Run the scenario above and return what the proxies and recorders saw."""
    modbus = ModbusUnit()
    with servers(workdir, SERVERS) as world:
        a, b = Host(world.brokers["A"].port, HOST), Host(world.brokers["B"].port, HOST)
        agent: AgentProcess | None = None
        marks: dict[str, float] = {}
        try:
            a.state(True, int(time.time() * 1000), host_id="another-host")  # wait-id: not ours
            site = _site(workdir / "site.yaml", json_port=world.brokers["A"].port,
                         proxies=[world.proxies[n].port for n in SERVERS], modbus_port=modbus.port,
                         extra=f", primary_host_id: {HOST}")  # fmt: skip
            agent = AgentProcess(site, workdir / "agent.log").start()
            state_topic = f"{NAMESPACE}/STATE/{HOST}"
            world.wait_packet("the edge to subscribe to its host's STATE", lambda p: p.kind == "SUBSCRIBE" and any(
                f == state_topic for f, _ in p.subscriptions), 20)  # fmt: skip
            time.sleep(QUIET)  # no BIRTH may come before the host is online
            t1 = int(time.time() * 1000)
            for h in (a, b):
                h.state(True, t1)
            world.wait_packet("DBIRTH of pump-1 on A", _is("DBIRTH", "A", device="pump-1"))
            world.wait_packet("DBIRTH of meter-1 on A", _is("DBIRTH", "A", device="meter-1"))
            world.wait_packet("DDATA on A", _is("DDATA", "A"))
            _write_setpoint(world.packets(), a)
            world.wait_packet("the DDATA after the write", lambda p: p.up and p.kind == "PUBLISH" and "DDATA" in p.topic
                              and "pump-1" in p.topic and _carries(p, 21.5))  # fmt: skip
            last = world.packets()[-1].n
            a.command(f"{NAMESPACE}/{GROUP}/NCMD/{NODE}",
                      [{"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": True}])  # fmt: skip
            world.wait_packet("the NBIRTH of the rebirth", _is("NBIRTH", "A", last))
            world.wait_packet("DDATA after the rebirth", _is("DDATA", "A", last))
            last = world.packets()[-1].n
            marks["offline:pump-1"] = time.time()
            modbus.stop()
            world.wait_packet("DDEATH of pump-1", _is("DDEATH", "A", last, "pump-1"))
            a.state(False, t1 - 5000, retain=False)  # older than the online: to be ignored
            time.sleep(QUIET)
            t2 = int(time.time() * 1000)
            a.state(False, t2)
            world.wait_packet("a CONNECT to B", lambda p: p.kind == "CONNECT" and p.server == "B")
            time.sleep(QUIET)  # B still holds the online STATE of t1 < t2: no BIRTH yet
            b.state(True, int(time.time() * 1000))
            world.wait_packet("DBIRTH on B", _is("DBIRTH", "B", device="meter-1"))
            world.wait_packet("DDATA on B", _is("DDATA", "B"))
            marks["stop"] = time.time()
            agent.signal(signal.SIGTERM)
            agent.wait(15)
            world.wait_packet("the close on B", lambda p: p.kind == "CLOSE" and p.server == "B")
        finally:
            if agent is not None:
                agent.kill()
            a.close()
            b.close()
            modbus.close()
        return Session(GROUP, NODE, world.packets(), world.snapshot(), primary_host=HOST, servers=SERVERS,
                       offline_devices=("pump-1",), marks=marks)  # fmt: skip


def record_ours_mqtt5(workdir: Path) -> Session:
    """A short MQTT 5.0 session (one server, no primary host): CONNECT, births, an intentional stop."""
    modbus = ModbusUnit()
    with servers(workdir, ("A",)) as world:
        site = _site(workdir / "site.yaml", json_port=world.brokers["A"].port, proxies=[world.proxies["A"].port],
                     modbus_port=modbus.port, extra=', protocol: "5"')  # fmt: skip
        agent = AgentProcess(site, workdir / "agent.log").start()
        try:
            world.wait_packet("DDATA", _is("DDATA", "A"), 20)
            agent.signal(signal.SIGTERM)
            agent.wait(15)
            world.wait_packet("the close", lambda p: p.kind == "CLOSE")
        finally:
            agent.kill()
            modbus.close()
        return Session(GROUP, NODE, world.packets(), world.snapshot(), servers=("A",))


def _carries(p: Packet, value: float) -> bool:
    payload = decode(p.payload)
    return payload is not None and any(abs(m.double_value - value) < 1e-6 for m in payload.metrics)


def _write_setpoint(packets: list[Packet], host: Host) -> None:
    """DCMD setpoint=21.5 to pump-1, by the alias its last DBIRTH gave (aliases in, names out)."""
    birth = [p for p in packets if p.up and p.kind == "PUBLISH" and p.topic.endswith("/DBIRTH/" + NODE + "/pump-1")][-1]
    payload = decode(birth.payload)
    assert payload is not None, "pump-1's DBIRTH is not a Sparkplug payload"
    metric = next(m for m in payload.metrics if m.name == "setpoint")
    host.command(f"{NAMESPACE}/{GROUP}/DCMD/{NODE}/pump-1",
                 [{"alias": metric.alias, "datatype": DOUBLE, "double_value": 21.5}])  # fmt: skip
