"""OPC UA test parts: a simulated PLC on its own event loop thread, and a recording DriverContext."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from drivers.opcua.simulator import SimulatedPlc
from tests.conftest import Recorder  # noqa: F401 - re-exported for the OPC UA tests


class ThreadedPlc:
    """A SimulatedPlc served from a background thread, so it outlives each test's asyncio.run.

    Module-scoped fixtures use it: an asyncua server takes seconds to build its address space.
    """

    def __init__(self, plc: SimulatedPlc) -> None:
        self.plc = plc
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="opcua-plc", daemon=True)
        self.thread.start()
        self.call(plc.start())

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def acall(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """The same, awaitable from a test's own event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.call(self.plc.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
