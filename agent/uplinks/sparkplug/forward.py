"""Store-and-forward: which buffered rows count as delivered, and the paced historical backlog.

Sparkplug DATA is QoS 0, so no PUBACK says a row arrived. A row counts as delivered once it was
written to a connection (taken only while the primary host, if any, is online) that was still up
one keepalive later: a broker that lost the link would have closed it by then. Rows written to a
connection that dropped sooner stay buffered and come again as backlog on the next one.

The backlog (rows accepted while no session took them) goes out after the BIRTHs as DDATA of
``is_historical`` metrics with their original timestamps, at most :data:`MAX_METRICS` metrics a
payload and :data:`PAYLOADS_PER_SECOND` payloads a second, so live changes keep flowing beside it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.uplinks.sparkplug.metrics import Value, compact_meter
from agent.uplinks.sparkplug.model import Model

MAX_METRICS = 500
PAYLOADS_PER_SECOND = 10
# Backlog metrics read ahead into memory (about 50 bytes each); the rest wait in the buffer file.
# Live rows come through the feed's live lane, never behind the backlog, so this only needs to keep
# the paced drain fed: 20 s of it at MAX_METRICS x PAYLOADS_PER_SECOND.
QUEUE_CAP = 100_000


@dataclass(slots=True)
class Chunk:
    """Historical values of one device from one row, kept compact (names shared, values in a
    tuple); the row is acked with its last chunk."""

    names: tuple[str, ...]
    values: tuple[Any, ...]
    qualities: tuple[str, ...] | None  # None: all good
    timestamp: int
    row_id: int | None

    def expand(self) -> list[Value]:
        """The values again (datatype and unit are filled in from the BIRTH by the caller)."""
        quality = self.qualities or ("good",) * len(self.names)
        return [Value(n, v, 0, None, q, self.timestamp) for n, v, q in zip(self.names, self.values, quality,
                                                                          strict=True)]  # fmt: skip


@dataclass
class Forward:
    """The session's unconfirmed rows and its queue of historical values."""

    keepalive: float
    # Per device, in the order its rows came; devices take turns, one payload each.
    history: dict[str, deque[Chunk]] = field(default_factory=dict)
    queued: int = 0  # metrics in ``history``
    unconfirmed: deque[tuple[float, list[int]]] = field(default_factory=deque)
    next_at: float = 0.0
    # Whether a device's history may go now: only while it is born (a device known offline keeps
    # its history, unacknowledged, until its next DBIRTH; DATA of an unborn device is not allowed).
    ready: Callable[[str], bool] = field(default=lambda _device: True)  # set by the uplink
    _names: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)  # one copy of each name list

    def reset(self) -> None:
        """A new connection: nothing written on the old one counts, nothing queued is kept."""
        self.history.clear()
        self.unconfirmed.clear()
        self.queued = 0
        self.next_at = 0.0

    def room(self) -> bool:
        """Whether more backlog may be read into memory."""
        return self.queued < QUEUE_CAP

    def add(self, device: str, values: list[Value], row_id: int) -> None:
        """Queue one backlog row's values, split so no payload exceeds MAX_METRICS."""
        queue = self.history.setdefault(device, deque())
        if not values:
            queue.append(Chunk((), (), None, 0, row_id))
            return
        for start in range(0, len(values), MAX_METRICS):
            part = values[start : start + MAX_METRICS]
            last = start + MAX_METRICS >= len(values)
            names = tuple(v.name for v in part)
            names = self._names.setdefault(names, names)
            qualities = tuple(v.quality for v in part)
            chunk = Chunk(names, tuple(v.value for v in part), None if all(q == "good" for q in qualities)
                          else qualities, part[0].timestamp, row_id if last else None)  # fmt: skip
            queue.append(chunk)
            self.queued += len(part)

    def add_compact(self, device: str, row: tuple[int, tuple[str, ...], tuple[Any, ...], tuple[str, ...]],
                    row_id: int) -> None:  # fmt: skip
        """Queue one backlog row already in compact form: (timestamp, names, values, qualities)."""
        ts, names, values, qualities = row
        if len(names) > MAX_METRICS:
            self.add(device, [Value(n, v, 0, None, q, ts) for n, v, q in zip(names, values, qualities, strict=True)],
                     row_id)  # fmt: skip
            return
        names = self._names.setdefault(names, names)
        good = all(q == "good" for q in qualities)
        self.history.setdefault(device, deque()).append(Chunk(names, values, None if good else qualities, ts, row_id))
        self.queued += len(names)

    def due(self, now: float) -> bool:
        """Whether a historical payload may go now."""
        return now >= self.next_at and self._next_device() is not None

    def _next_device(self) -> str | None:
        return next((d for d in self.history if self.ready(d)), None)

    def take(self, now: float) -> tuple[str, list[Value], list[int]]:
        """The next historical payload: one device's queued values, up to MAX_METRICS, and their rows."""
        device = self._next_device()
        if device is None:
            raise LookupError("no device's history may go now (check due() first)")
        queue = self.history.pop(device)
        values, ids = list[Value](), list[int]()
        while queue:
            chunk = queue[0]
            if values and len(values) + len(chunk.values) > MAX_METRICS:
                break
            queue.popleft()
            values += chunk.expand()
            self.queued -= len(chunk.values)
            if chunk.row_id is not None:
                ids.append(chunk.row_id)
        if queue:
            self.history[device] = queue  # to the back: the next device's turn
        self.next_at = now + 1.0 / PAYLOADS_PER_SECOND
        return device, values, ids

    def sent(self, ids: list[int], now: float) -> None:
        """These rows were written to the connection now."""
        if ids:
            if self.unconfirmed and self.unconfirmed[-1][0] == now:
                self.unconfirmed[-1][1].extend(ids)
            else:
                self.unconfirmed.append((now, list(ids)))

    def confirmed(self, now: float) -> list[int]:
        """Rows written at least a keepalive ago on this (still open) connection: delivered."""
        ids: list[int] = []
        while self.unconfirmed and now - self.unconfirmed[0][0] >= self.keepalive:
            ids += self.unconfirmed.popleft()[1]
        return ids

    def next_wake(self, now: float) -> float:
        """Seconds until a historical payload or a confirmation is due (at most one)."""
        times = [1.0]
        if self._next_device() is not None:
            times.append(self.next_at - now)
        if self.unconfirmed:
            times.append(self.unconfirmed[0][0] + self.keepalive - now)
        return max(0.0, min(times))


def queue_backlog(model: Model, forward: Forward, payload: bytes, row_id: int) -> bool:
    """A backlog meter reading of a born device whose metrics are all known, queued without the
    general path's objects (the read-ahead of a long backlog is mostly these); False: not one."""
    compact = compact_meter(payload)
    if compact is None:
        return False
    device_id, ts, names, values, qualities = compact
    device = model.devices.get(device_id)
    if device is None or not device.born or not all(n in device.current for n in names):
        return False
    if not all(v is None or isinstance(v, bool | int | float | str) for v in values):
        return False  # the general path makes such a value null with bad quality
    forward.add_compact(device_id, (ts, names, values, qualities), row_id)
    return True
