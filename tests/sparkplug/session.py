"""A recorded Sparkplug session: the proxy's packets and the recorder's messages, with what the
checks derive from them (the edge node's publishes decoded, its connections, its seq chain)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tests.sparkplug.packets import Packet
from tests.sparkplug.recorder import Message
from tests.sparkplug.spb import decode

NAMESPACE = "spBv1.0"
EDGE_KINDS = ("NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD")
DATA = ("NDATA", "DDATA")
BIRTHS = ("NBIRTH", "DBIRTH")
# s: a message the edge had written before a STATE or command reached it may pass the proxy just
# after that STATE or command went the other way; only later ones count as the edge's reaction
IN_FLIGHT = 0.02


@dataclass(frozen=True)
class EdgeMessage:
    """A Sparkplug message the edge node published (seen by the proxy on its way to the broker)."""

    n: int
    at: float
    server: str
    conn: int
    kind: str  # NBIRTH, DDATA, ... ("" for a topic outside the namespace's edge forms)
    group: str
    node: str
    device: str
    topic: str
    qos: int
    retain: bool
    raw: bytes
    payload: Any  # decoded Payload, or None when the bytes are not one

    @property
    def seq(self) -> int | None:
        return int(self.payload.seq) if self.payload is not None and self.payload.HasField("seq") else None


def split_topic(topic: str) -> tuple[str, str, str, str]:
    """(kind, group, node, device) of a ``spBv1.0/group/KIND/node[/device]`` topic; kind "" otherwise."""
    parts = topic.split("/")
    if len(parts) in (4, 5) and parts[0] == NAMESPACE and parts[2] in EDGE_KINDS:
        return parts[2], parts[1], parts[3], parts[4] if len(parts) == 5 else ""
    return "", "", "", ""


def state_of(raw: bytes) -> tuple[bool, int] | None:
    """(online, timestamp) of a Sparkplug 3.0 STATE payload, or None if it is not the spec's JSON."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    online, ts = doc.get("online"), doc.get("timestamp")
    if not isinstance(online, bool) or not isinstance(ts, int) or isinstance(ts, bool):
        return None
    return online, ts


@dataclass
class Session:
    """What one edge node did through the proxies, plus what the scenario knows it did to it.

    ``servers`` is the edge's server list in order (proxy labels); ``offline_devices`` the devices
    the scenario took offline; ``marks`` scenario moments (wall-clock seconds) the checks use,
    e.g. ``stale_offline`` when an offline STATE older than the online one was published.
    """

    group: str
    node: str
    packets: list[Packet]
    messages: list[Message]
    primary_host: str | None = None
    servers: tuple[str, ...] = ()
    aliases: bool = True
    offline_devices: tuple[str, ...] = ()
    marks: dict[str, float] = field(default_factory=dict)

    @cached_property
    def edge(self) -> list[EdgeMessage]:
        out: list[EdgeMessage] = []
        for p in self.packets:
            if p.up and p.kind == "PUBLISH" and p.topic.startswith(NAMESPACE + "/"):
                kind, group, node, device = split_topic(p.topic)
                out.append(EdgeMessage(p.n, p.at, p.server, p.conn, kind, group, node, device, p.topic, p.qos,
                                       p.retain, p.payload, decode(p.payload)))  # fmt: skip
        return out

    def of(self, *kinds: str) -> list[EdgeMessage]:
        return [m for m in self.edge if m.kind in kinds]

    @cached_property
    def conns(self) -> dict[int, list[Packet]]:
        out: dict[int, list[Packet]] = {}
        for p in self.packets:
            out.setdefault(p.conn, []).append(p)
        return out

    def connect_of(self, conn: int) -> Packet | None:
        return next((p for p in self.conns.get(conn, []) if p.kind == "CONNECT" and p.up), None)

    def connects(self) -> list[Packet]:
        return [p for p in self.packets if p.kind == "CONNECT" and p.up]

    def received(self, conn: int) -> list[Packet]:
        """PUBLISH packets the broker handed the edge on ``conn`` (STATE, commands)."""
        return [p for p in self.conns.get(conn, []) if p.kind == "PUBLISH" and not p.up]

    def will_bdseq(self, conn: int) -> int | None:
        connect = self.connect_of(conn)
        if connect is None or connect.will is None:
            return None
        return bdseq_of(decode(connect.will.payload))

    @cached_property
    def expected_seq(self) -> dict[int, int]:
        """For each edge message but NDEATH (by ``n``): the seq the spec's chain asks of it.

        NBIRTH starts the chain at 0; every later message of the connection is one more, 255 -> 0.
        """
        out: dict[int, int] = {}
        last: dict[int, int] = {}
        for m in self.edge:
            if m.kind in ("NDEATH", ""):
                continue
            want = 0 if m.kind == "NBIRTH" or m.conn not in last else (last[m.conn] + 1) % 256
            out[m.n] = want
            last[m.conn] = m.seq if m.seq is not None else want
        return out

    def births_before(self, m: EdgeMessage) -> list[EdgeMessage]:
        """The NBIRTH and DBIRTHs in force when ``m`` was sent (same connection, since its last NBIRTH)."""
        out: list[EdgeMessage] = []
        for b in self.edge:
            if b.n >= m.n:
                break
            if b.conn != m.conn:
                continue
            if b.kind == "NBIRTH":
                out = [b]
            elif b.kind == "DBIRTH":
                out.append(b)
        return out

    def alias_names(self, m: EdgeMessage) -> dict[int, str]:
        """alias -> name from the births in force for ``m``."""
        names: dict[int, str] = {}
        for b in self.births_before(m):
            for metric in b.payload.metrics if b.payload is not None else ():
                if metric.HasField("alias"):
                    names[int(metric.alias)] = metric.name
        return names


def bdseq_of(payload: Any) -> int | None:
    if payload is None:
        return None
    for metric in payload.metrics:
        if metric.name == "bdSeq":
            return int(metric.long_value)
    return None


def metrics(messages: Iterable[EdgeMessage]) -> Iterable[tuple[EdgeMessage, Any]]:
    for m in messages:
        if m.payload is not None:
            for metric in m.payload.metrics:
                yield m, metric
