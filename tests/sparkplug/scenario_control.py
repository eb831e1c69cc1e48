"""The control: Eclipse Tahu's own edge node (``sparkplug-client`` 3.2.4, peer/control_edge.js)
through the same proxy, recorder and checks as ours, with the events its library supports:
births and data, a DCMD write, Rebirth, a DDEATH and a stop. It has no primary host and one
server, so the PrimaryHost and MultipleBroker checks find no evidence in it."""

from __future__ import annotations

from pathlib import Path

from tests.sparkplug.node_peer import NodeScript
from tests.sparkplug.scenario import _is
from tests.sparkplug.session import NAMESPACE, Session
from tests.sparkplug.spb import BOOLEAN, DOUBLE
from tests.sparkplug.world import Host, servers

GROUP, NODE = "plant", "tahu-edge"


def record_control(workdir: Path) -> Session:
    with servers(workdir, ("A",)) as world:
        host = Host(world.brokers["A"].port, "scada")
        edge = NodeScript("control_edge.js", f"mqtt://127.0.0.1:{world.proxies['A'].port}", GROUP, NODE)
        try:
            world.wait_packet("the control's DDATA", _is("DDATA", "A"), 20)
            world.wait_packet("the control's NDATA", _is("NDATA", "A"))
            host.command(
                f"{NAMESPACE}/{GROUP}/DCMD/{NODE}/d1", [{"alias": 11, "datatype": DOUBLE, "double_value": 21.5}]
            )
            edge.wait("written")
            last = world.packets()[-1].n
            host.command(f"{NAMESPACE}/{GROUP}/NCMD/{NODE}",
                         [{"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": True}])  # fmt: skip
            world.wait_packet("the control's rebirth", _is("NBIRTH", "A", last))
            world.wait_packet("DDATA after the rebirth", _is("DDATA", "A", last))
            edge.send("ddeath")
            world.wait_packet("the control's DDEATH", _is("DDEATH", "A"))
            edge.send("stop")
            world.wait_packet("the control's close", lambda p: p.kind == "CLOSE")
            assert edge.proc.wait(10) == 0, edge.stderr()
        finally:
            edge.stop()
            host.close()
        return Session(GROUP, NODE, world.packets(), world.snapshot(), servers=("A",), offline_devices=("d1",))
