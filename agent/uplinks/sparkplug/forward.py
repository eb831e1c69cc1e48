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
from dataclasses import dataclass, field

from agent.uplinks.sparkplug.metrics import Value

MAX_METRICS = 500
PAYLOADS_PER_SECOND = 10
QUEUE_CAP = 20_000  # backlog metrics held in memory; the rest wait in the buffer file


@dataclass(slots=True)
class Chunk:
    """Historical values of one device from one row (the row is acked with its last chunk)."""

    device: str
    values: list[Value]
    row_id: int | None


@dataclass
class Forward:
    """The session's unconfirmed rows and its queue of historical values."""

    keepalive: float
    history: deque[Chunk] = field(default_factory=deque)
    queued: int = 0  # metrics in ``history``
    unconfirmed: deque[tuple[float, list[int]]] = field(default_factory=deque)
    next_at: float = 0.0

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
        if not values:
            self.history.append(Chunk(device, [], row_id))
            return
        for start in range(0, len(values), MAX_METRICS):
            part = values[start : start + MAX_METRICS]
            last = start + MAX_METRICS >= len(values)
            self.history.append(Chunk(device, part, row_id if last else None))
            self.queued += len(part)

    def due(self, now: float) -> bool:
        """Whether a historical payload may go now."""
        return bool(self.history) and now >= self.next_at

    def take(self, now: float) -> tuple[str, list[Value], list[int]]:
        """The next historical payload: one device's queued values, up to MAX_METRICS, and their rows."""
        first = self.history[0]
        device, values, ids = first.device, list[Value](), list[int]()
        while self.history and self.history[0].device == device:
            chunk = self.history[0]
            if values and len(values) + len(chunk.values) > MAX_METRICS:
                break
            self.history.popleft()
            values += chunk.values
            self.queued -= len(chunk.values)
            if chunk.row_id is not None:
                ids.append(chunk.row_id)
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
        if self.history:
            times.append(self.next_at - now)
        if self.unconfirmed:
            times.append(self.unconfirmed[0][0] + self.keepalive - now)
        return max(0.0, min(times))
