"""A feed's reads of its own file, on a thread of their own so they never wait behind a commit.

The reader is reopened when the outbox replaced its file; a damaged file found by a read is
handed to the commit thread, which replaces it as it would for damage found on a write.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

from agent.store.outbox import Outbox, OutboxReader, Stored, is_corruption


class ReadBack:
    """Peeks at one feed's file through one reader on one read thread."""

    def __init__(self, name: str, outbox: Callable[[], Outbox], commit_thread: Executor) -> None:
        """``outbox``: the feed's open outbox (it changes when a damaged file is replaced)."""
        self._outbox = outbox
        self._commit_thread = commit_thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edge-agent-read-{name}")
        self._reader: OutboxReader | None = None
        self._generation = -1

    async def peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        """Up to ``limit`` stored events of ``priority`` after ``after_id``, read on the read thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._peek, priority, after_id, limit)

    def _peek(self, priority: int, after_id: int, limit: int) -> list[Stored]:
        for attempt in (1, 2):
            outbox = self._outbox()
            if self._reader is None or self._generation != outbox.generation:
                if self._reader is not None:
                    self._reader.close()
                self._reader, self._generation = OutboxReader(outbox.path), outbox.generation
            try:
                return self._reader.peek(priority, after_id, limit)
            except sqlite3.DatabaseError as exc:
                if attempt == 2:
                    raise
                # Through the commit thread even when it is not corruption: if the writer is
                # replacing the file right now (this reader then sees an I/O error on the moved
                # file), this waits for it to finish.
                self._commit_thread.submit(outbox.recover, exc, self._generation).result()
                if not is_corruption(exc) and outbox.generation == self._generation:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Wait for a read under way, then close the reader."""
        self._thread.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
