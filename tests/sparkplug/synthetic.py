"""A hand-written Sparkplug session that keeps every rule, and the broken copies of it that the
harness test feeds the checks: each must fail exactly the assertions its fault breaks.

The stream is built as the proxy would record it (packets with their order, time and
connection), so the checks read it exactly as they read a live session.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from tests.sparkplug.packets import Packet, Will
from tests.sparkplug.session import NAMESPACE, Session
from tests.sparkplug.spb import BOOLEAN, DOUBLE, INT32, INT64, Payload

GROUP, NODE, HOST = "Plant1", "gw-1", "scada"
SERVERS = ("A", "B")


class Stream:
    """Packets of one recording, appended in order with a clock that advances 10 ms a packet."""

    def __init__(self) -> None:
        self.packets: list[Packet] = []
        self.now = time.time() - 60
        self.conn = 0
        self.server = ""
        self.seq = 0
        self.version = 4

    def _add(self, **kw: Any) -> Packet:
        self.now += 0.01
        p = Packet(n=len(self.packets), at=self.now, server=self.server, conn=self.conn, version=self.version, **kw)
        self.packets.append(p)
        return p

    def connect(self, server: str, bdseq: int) -> None:
        self.conn += 1
        self.server = server
        will = Will(f"{NAMESPACE}/{GROUP}/NDEATH/{NODE}", 1, False, death(bdseq))
        self._add(up=True, kind="CONNECT", clean=True, will=will, client_id=NODE)
        self._add(up=False, kind="CONNACK")
        self._add(up=True, kind="SUBSCRIBE", subscriptions=(
            (f"{NAMESPACE}/{GROUP}/NCMD/{NODE}", 1), (f"{NAMESPACE}/{GROUP}/DCMD/{NODE}/+", 1),
            (f"{NAMESPACE}/STATE/{HOST}", 1)))  # fmt: skip

    def state(self, online: bool, ts: int) -> None:
        payload = json.dumps({"online": online, "timestamp": ts}).encode()
        self._add(up=False, kind="PUBLISH", topic=f"{NAMESPACE}/STATE/{HOST}", qos=1, payload=payload)

    def command(self, topic_kind: str, metrics: list[dict[str, Any]]) -> None:
        payload = build(metrics, self.now, seq=None)
        self._add(up=False, kind="PUBLISH", topic=f"{NAMESPACE}/{GROUP}/{topic_kind}/{NODE}", payload=payload)

    def publish(self, kind: str, device: str = "", metrics: list[dict[str, Any]] | None = None, **flags: Any) -> None:
        topic = f"{NAMESPACE}/{GROUP}/{kind}/{NODE}" + (f"/{device}" if device else "")
        if kind == "NBIRTH":
            self.seq = 0
        seq = None if kind == "NDEATH" else self.seq
        if kind != "NDEATH":
            self.seq = (self.seq + 1) % 256
        self._add(up=True, kind="PUBLISH", topic=topic, payload=build(metrics or [], self.now, seq),
                  qos=flags.get("qos", 0), retain=flags.get("retain", False))  # fmt: skip

    def leave(self, reason: int = 0) -> None:
        self._add(up=True, kind="DISCONNECT", reason=reason)
        self._add(up=True, kind="CLOSE")


def build(metrics: list[dict[str, Any]], at: float, seq: int | None) -> bytes:
    p = Payload()
    p.timestamp = int(at * 1000)
    if seq is not None:
        p.seq = seq
    for spec in metrics:
        m = p.metrics.add()
        for key, value in spec.items():
            if key == "quality":
                m.properties.keys.append("Quality")
                prop = m.properties.values.add()
                prop.type = INT32
                prop.int_value = value
            else:
                setattr(m, key, value)
        if "timestamp" not in spec:
            m.timestamp = int(at * 1000)
    return bytes(p.SerializeToString())


def death(bdseq: int) -> bytes:
    return build([{"name": "bdSeq", "datatype": INT64, "long_value": bdseq}], time.time(), None)


def nbirth(bdseq: int, rebirth_alias: int | None = None) -> list[dict[str, Any]]:
    rebirth: dict[str, Any] = {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": False}
    if rebirth_alias is not None:
        rebirth["alias"] = rebirth_alias
    return [{"name": "bdSeq", "datatype": INT64, "long_value": bdseq}, rebirth,
            {"name": "uptime", "alias": 1, "datatype": DOUBLE, "double_value": 5.0, "quality": 500}]  # fmt: skip


def dbirth(device: str) -> list[dict[str, Any]]:
    base = 10 if device == "d1" else 20
    return [{"name": "voltage_l1", "alias": base, "datatype": DOUBLE, "double_value": 230.1},
            {"name": "current_l1", "alias": base + 1, "datatype": DOUBLE, "is_null": True, "quality": 0}]  # fmt: skip


def data(alias: int, value: float) -> list[dict[str, Any]]:
    return [{"alias": alias, "double_value": value}]


def good(**faults: bool) -> Session:
    """The well-behaved session; each keyword turns on one fault (see BROKEN)."""
    s = Stream()
    s.version = 5 if faults.get("mqtt5") else 4
    leave_reason = 0 if faults.get("no_will_reason") else (4 if s.version == 5 else 0)
    s.connect("A", 0)
    s.state(True, 1000)
    s.publish("NBIRTH", metrics=nbirth(0, 99 if faults.get("aliased_rebirth") else None),
              retain=bool(faults.get("retained_nbirth")))  # fmt: skip
    if faults.get("data_before_dbirth"):
        s.publish("DDATA", "d1", data(10, 230.5))
    born_at = s.now
    first = dbirth("d1")
    if faults.get("birth_null_known"):  # the value read before the birth comes right after it instead
        first[0] = {"name": "voltage_l1", "alias": 10, "datatype": DOUBLE, "is_null": True}
    s.publish("DBIRTH", "d1", first)
    s.publish("DBIRTH", "d2", dbirth("d2"))
    s.publish("NDATA", metrics=data(1, 6.0))
    s.publish("DDATA", "d1", [{"alias": 10, "double_value": 230.2, "timestamp": int(born_at * 1000) - 500}])
    s.command("NCMD", [{"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": True}])
    s.publish("NBIRTH", metrics=nbirth(0))
    s.publish("DBIRTH", "d1", dbirth("d1"))
    s.publish("DBIRTH", "d2", dbirth("d2"))
    s.publish("DDATA", "d2", data(20, 229.0))
    s.publish("DDEATH", "d2")
    s.publish("DDATA", "d1", data(10, 230.3))
    s.state(False, 500)  # older than the online: to be ignored
    if faults.get("seq_skip"):
        s.seq += 1
    s.publish("DDATA", "d1", data(10, 230.4))
    s.state(False, 2000)
    s.publish("NDEATH", metrics=[{"name": "bdSeq", "datatype": INT64, "long_value": 0}])
    s.leave(leave_reason)
    s.connect("B", 1)
    s.state(True, 1000)  # the retained online STATE, older than the offline seen on A: not yet online
    s.state(True, 3000)
    s.publish("NBIRTH", metrics=nbirth(7 if faults.get("bdseq_mismatch") else 1))
    s.publish("DBIRTH", "d1", dbirth("d1"))
    if faults.get("dead_device_reborn"):  # d2 went offline on A and is born on B as if it were back
        s.publish("DBIRTH", "d2", dbirth("d2"))
    for i in range(300):  # past 255, so the seq wraps
        s.publish("DDATA", "d1", data(10, 230 + i / 100))
    s.publish("NDEATH", metrics=[{"name": "bdSeq", "datatype": INT64, "long_value": 1}])
    s.leave(leave_reason)
    return Session(GROUP, NODE, s.packets, [], primary_host=HOST, servers=SERVERS, offline_devices=("d2",))


BDSEQ_IDS = {"message-flow-edge-node-birth-publish-nbirth-payload-bdSeq", "payloads-nbirth-bdseq-repeat",
             "topics-nbirth-bdseq-matching", "payloads-ndeath-bdseq"}  # fmt: skip

BROKEN: dict[str, set[str]] = {
    "seq_skip": {"topics-ddata-seq-num"},
    "bdseq_mismatch": BDSEQ_IDS,
    "retained_nbirth": {
        "message-flow-edge-node-birth-publish-nbirth-retained",
        "payloads-nbirth-retain",
        "topics-nbirth-mqtt",
    },
    "aliased_rebirth": {"operational-behavior-data-commands-rebirth-name-aliases"},
    "data_before_dbirth": {"payloads-ddata-order"},
    "birth_null_known": {"operational-behavior-data-publish-dbirth-values"},
    "dead_device_reborn": {"operational-behavior-device-ddeath"},
}
"""Each fault, and the assertions (one rule, stated under several ids where the spec repeats it) it breaks."""


def with_packets(s: Session, change: Callable[[list[Packet]], list[Packet]]) -> Session:
    return dataclasses.replace(s, packets=change(list(s.packets)))
