"""The window in flight: messages awaiting a PUBACK, those whose PUBACK went missing, and PUBACKs.

Every message sent and not yet deleted from the buffer counts against ``max_inflight``: in
flight, missing (a later PUBACK overtook its own), or acknowledged with its rows not deleted
yet (:class:`~agent.uplinks.mqtt.acks.Acks`). That sum is what a crash now would send again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from agent.uplinks.api import UplinkStatus
from agent.uplinks.mqtt.acks import Acks
from agent.uplinks.mqtt.link import Link

# A message whose PUBACK a later one overtook gets this long for a late PUBACK; then (or once
# half the window is missing) the uplink reconnects to send it again.
RESEND_AFTER = 2.0


@dataclass(slots=True)
class _Sent:
    ids: list[int]  # buffer rows the message carries
    at: float  # monotonic time it was handed to paho
    n: int  # its place in this connection's publish order


class Window:
    """The messages of one connection that await an answer, and what their PUBACKs do."""

    def __init__(
        self,
        *,
        in_order: bool,
        link: Link,
        acks: Acks,
        status: UplinkStatus,
        wake: asyncio.Event,
        refused: Callable[[int, Any], None],
    ) -> None:
        """``in_order``: PUBACKs come in publish order (QoS 1), so an overtaken one is missing.

        ``wake`` is set when the window frees room; ``refused(events, reason)`` reports a
        message the broker answered but did not take.
        """
        self._in_order = in_order
        self._link = link
        self._acks = acks
        self._status = status
        self._wake = wake
        self._refused = refused
        self.inflight: OrderedDict[int, _Sent] = OrderedDict()  # mid -> message, in publish order
        self.missing: dict[int, _Sent] = {}
        self._missing_since: float | None = None
        self._sent = 0  # messages published on this connection

    def add(self, mid: int, ids: list[int]) -> None:
        """Message ``mid``, carrying rows ``ids``, was handed to paho."""
        self._sent += 1
        self.inflight[mid] = _Sent(ids, time.monotonic(), self._sent)

    def clear(self) -> None:
        """The connection ended: its messages go again from the buffer on the next one."""
        self.inflight.clear()
        self.missing.clear()
        self._missing_since = None
        self._sent = 0

    def oldest(self) -> float | None:
        """When the oldest message still awaiting its PUBACK was sent."""
        return next(iter(self.inflight.values())).at if self.inflight else None

    def unconfirmed(self) -> int:
        """Messages that a crash now would send again: the window's occupancy."""
        return len(self.inflight) + len(self.missing) + self._acks.messages()

    def resend_due(self, now: float, window: int) -> bool:
        since = self._missing_since
        return since is not None and (now - since >= RESEND_AFTER or 2 * len(self.missing) >= window)

    def on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        """paho's callback for a PUBACK (or PUBCOMP): the message leaves the window."""
        if getattr(reason, "is_failure", False):
            # MQTT 5: the broker answered but did not take the message (not authorised,
            # quota exceeded, bad topic). Not delivered: the rows stay in the buffer and
            # go again on the next connection; never deleted as if the IOC had them.
            refused = self.inflight.pop(mid, None)
            if refused is None:
                refused = self._late(mid)
            if refused is not None:
                self._refused(len(refused.ids), reason)
            if not self.inflight:
                self._wake.set()
            return
        sent = self.inflight.pop(mid, None)
        if sent is not None:
            link = self._link
            link.sample_rtt(link.last_inbound - sent.at)
            if self._in_order and self.inflight:
                self._pass_over(sent.n)
        else:
            sent = self._late(mid)  # its PUBACK came late after all
            if sent is None:
                return  # a status message
        self._acks.delivered(sent.ids)
        self._status.acked += len(sent.ids)
        if not self.inflight:
            self._wake.set()

    def _late(self, mid: int) -> _Sent | None:
        """Take message ``mid`` out of the missing ones, if it is there."""
        sent = self.missing.pop(mid, None)
        if sent is not None and not self.missing:
            self._missing_since = None
        return sent

    def _pass_over(self, n: int) -> None:
        """Messages published before message ``n`` and still unacknowledged lost their PUBACK.

        A broker sends QoS 1 PUBACKs in the order the PUBLISHes came (MQTT 3.1.1 4.6, MQTT 5
        4.6), and nothing on a TCP connection reorders them: a PUBACK that a later one
        overtook is not coming. Such messages leave the in-flight list (they no longer count as
        awaiting an answer) but keep their place in the window until they are sent again.
        """
        inflight = self.inflight
        moved = False
        while inflight:
            mid, first = next(iter(inflight.items()))
            if first.n > n:
                break
            inflight.popitem(last=False)
            self.missing[mid] = first
            moved = True
        if moved:
            if self._missing_since is None:
                self._missing_since = self._link.last_inbound
            self._wake.set()
