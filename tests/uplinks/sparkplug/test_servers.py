"""Two MQTT servers and a primary host: the edge node is born only where the host is online,
walks to the next server when it is offline there, and is never connected to both."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import AgentProcess, Mosquitto
from tests.uplinks.sparkplug.helpers import Recorder, site

STATE = "spBv1.0/STATE/scada"


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = Mosquitto(tmp_path / "a"), Mosquitto(tmp_path / "b")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def state(online: bool, stamp: int) -> bytes:
    return orjson.dumps({"online": online, "timestamp": stamp})


def test_the_node_walks_to_the_server_where_the_primary_host_is_online(
    brokers: tuple[Mosquitto, Mosquitto], tmp_path: Path
) -> None:
    a, b = brokers
    rec_a, rec_b = Recorder(a.port), Recorder(b.port)
    t0 = int(time.time() * 1000)
    rec_a.publish(STATE, state(False, t0), retain=True)  # the host is offline on the first server
    rec_b.publish(STATE, state(True, t0), retain=True)
    servers = f"servers: [{{host: 127.0.0.1, port: {a.port}}}, {{host: 127.0.0.1, port: {b.port}}}]"
    config = site(tmp_path / "site.yaml", port=a.port, devices="  - {id: meter-1, driver: virtual, kind: meter, "
                  "interval: 200ms}\n", sparkplug=f"primary_host_id: scada, {servers}")  # fmt: skip
    # site() names the first server; the list above replaces it.
    config.write_text(config.read_text().replace(f"servers: [{{host: 127.0.0.1, port: {a.port}}}], ", "", 1))
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        nbirth = rec_b.wait("NBIRTH", timeout=15)[0]
        assert not rec_a.of("NBIRTH"), "never born where the host is offline"
        rec_b.wait("DDATA", "meter-1")
        # The host goes offline on B: NDEATH there, then the next server (A), where it comes online.
        rec_b.publish(STATE, state(False, t0 + 1), retain=True)
        death = rec_b.wait("NDEATH", timeout=5)[0]
        assert death.metrics()["bdSeq"].long_value == nbirth.metrics()["bdSeq"].long_value
        rec_a.publish(STATE, state(True, t0 + 2), retain=True)
        rec_a.wait("NBIRTH", timeout=10)
        rec_a.wait("DDATA", "meter-1")
        assert len(rec_b.of("NBIRTH")) == 1
        late = [m for m in rec_b.of("DDATA") if m.at > death.at]
        assert not late, "no DATA on the server it left"
    finally:
        agent.kill()
        for rec in (rec_a, rec_b):
            rec.publish(STATE, b"", retain=True)
            rec.close()
