"""The edge node's side of one session: topics, the seq counter, BIRTHs, DATA and DEATHs.

Every message but NDEATH takes the next ``seq`` (0-255, wrapping); NBIRTH starts it at 0. All
publishing happens on the event loop without an await in between, so a rebirth is never
interleaved with DATA.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from agent.uplinks.sparkplug.client import Connection
from agent.uplinks.sparkplug.metrics import NODE, Value
from agent.uplinks.sparkplug.model import Device, Model
from agent.uplinks.sparkplug.payloads import metrics_payload, node_birth, node_death, now_ms

log = logging.getLogger(__name__)
NAMESPACE = "spBv1.0"


class Topics:
    """The topics of one edge node."""

    def __init__(self, group: str, node: str) -> None:
        """``group``/``node``: the Sparkplug ids (validated: no ``/ + #``)."""
        self.group, self.node = group, node
        base = f"{NAMESPACE}/{group}"
        self.nbirth, self.ndeath = f"{base}/NBIRTH/{node}", f"{base}/NDEATH/{node}"
        self.ndata, self.ncmd = f"{base}/NDATA/{node}", f"{base}/NCMD/{node}"
        self.dcmd_filter = f"{base}/DCMD/{node}/+"
        self._base = base

    def device(self, kind: str, device: str) -> str:
        """``spBv1.0/{group}/{kind}/{node}/{device}`` (DBIRTH, DDATA, DDEATH, DCMD)."""
        return f"{self._base}/{kind}/{self.node}/{device}"

    @staticmethod
    def state(host: str) -> str:
        """The primary host's STATE topic (Sparkplug 3.0: no group)."""
        return f"{NAMESPACE}/STATE/{host}"


class Session:
    """BIRTH, DATA and DEATH on one connection, with the session's seq."""

    def __init__(self, conn: Connection, topics: Topics, model: Model, bdseq: int, *, aliases: bool) -> None:
        """Nothing is sent until :meth:`birth_all`."""
        self.conn, self.topics, self.model, self.bdseq = conn, topics, model, bdseq
        self.aliases = aliases
        self.seq = -1
        self.born = False  # NBIRTH sent
        self.messages = 0

    def _seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _send(self, topic: str, payload: bytes) -> None:
        self.conn.publish(topic, payload, qos=0)
        self.messages += 1

    def birth_all(self) -> None:
        """NBIRTH (seq 0, the session's bdSeq) and a DBIRTH for every device online with metrics."""
        self.seq = -1
        node = self.model.node
        now = now_ms()
        # A metric not heard of yet goes null as of this birth; on a copy, so the placeholder keeps
        # time 0 and any reading, however old, still becomes the current value.
        metrics = [(v if v.timestamp else replace(v, timestamp=now), self._alias(node, v.name))
                   for v in node.current.values()]  # fmt: skip
        self._send(self.topics.nbirth, node_birth(self.bdseq, self._seq(), metrics))
        node.born = self.born = True
        for device in self.model.devices.values():
            device.born = False
            if device.online and device.current:  # a device known offline waits to be online again
                self.dbirth(device)

    def death(self) -> tuple[str, bytes]:
        """The NDEATH topic and payload (the will, and what precedes an intentional disconnect)."""
        return self.topics.ndeath, node_death(self.bdseq)

    def dbirth(self, device: Device, *, fresh: bool = False) -> None:
        """DBIRTH with every metric's current value (or is_null); ``fresh``: new aliases first."""
        if self.aliases and (fresh or set(device.aliases) != set(device.current)):
            self.model.realias(device)
        metrics = [(v, self._alias(device, v.name)) for v in device.current.values()]
        self._send(self.topics.device("DBIRTH", device.id), metrics_payload(self._seq(), metrics, birth=True))
        device.born = True

    def ddeath(self, device: Device) -> None:
        """DDEATH: the device went offline."""
        if device.born:
            self._send(self.topics.device("DDEATH", device.id), metrics_payload(self._seq(), (), birth=False))
            device.born = False

    def ddata(self, device: Device, values: Iterable[Value], *, historical: bool = False) -> None:
        """DDATA (NDATA for the node's own metrics) of these values (aliases only, when on); births
        the device first if it is not born."""
        if device.id == NODE:
            topic = self.topics.ndata
        else:
            topic = self.topics.device("DDATA", device.id)
            if not device.born:
                self.dbirth(device)
        metrics = [(v, self._alias(device, v.name)) for v in values]
        if metrics:
            self._send(topic, metrics_payload(self._seq(), metrics, birth=False, historical=historical))

    def _alias(self, device: Device, name: str) -> int | None:
        return device.aliases.get(name) if self.aliases else None
