"""What the store's tests share: a one-feed store, a reading, and a state machine's store on a loop of its own."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis.stateful import RuleBasedStateMachine

from agent.contract.events import Reading
from agent.store.event_store import EventStore
from agent.store.outbox import Outbox


def make_store(path: Path, max_bytes: int = 1 << 30, feed: str = "mqtt") -> EventStore:
    return EventStore({feed: lambda: Outbox(path, max_bytes)}, gateway="gw-1")


def reading(n: int) -> Reading:
    measurement = {"quantity": "x", "value": n, "unit": "", "quality": "good"}
    return Reading("city.meter.reading", {"measurements": [measurement]})


class StoreOnLoop(RuleBasedStateMachine):
    """A state machine's store, in a folder and on an event loop of its own; ``reopen_store`` closes
    and opens it again on the same file."""

    feed = "mqtt"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        self.loop = asyncio.new_event_loop()
        self.store = self._open()

    def _open(self) -> EventStore:
        store = make_store(self.tmp / "b.db", feed=self.feed)
        self.loop.run_until_complete(store.open())
        return store

    def reopen_store(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.store = self._open()

    def teardown(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()
