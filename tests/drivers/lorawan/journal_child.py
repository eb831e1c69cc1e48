"""Run by test_lorawan_journal.py as its own process, to be killed with SIGKILL in the middle of a fold.

``python -m tests.drivers.lorawan.journal_child FOLDER POINT``: records round 1 (flushed), starts a
fold whose thread stops for good at POINT (``_install``: before the new snapshot is in place;
``_drop_old_log``: after, with the old log still there), records round 2 on the event loop while
that thread waits (flushed), and waits to be killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

from drivers.lorawan.journal import Journal

DEVICES = 50
KEYS = {1: 70, 2: 10}  # round 1 wraps each device's ring of 64 keys; round 2 replaces 10 of them


def eui(n: int) -> str:
    return f"70b3d5fffe{n:06x}"


def key(round_: int, device: int, i: int) -> str:
    return f"{round_}/{eui(device)}/{i}"


def record(journal: Journal, round_: int) -> None:
    for device in range(DEVICES):
        state = journal.state(eui(device))
        for i in range(KEYS[round_]):
            digest = state.remember(key(round_, device, i))
            state.f_cnt = round_ * 1000 + i
            journal.record(eui(device), state, digest)
    journal.flush()  # in the OS from here on: a kill -9 keeps it


async def main(folder: Path, point: str) -> None:
    journal = Journal(folder)
    journal.load()
    stop = threading.Event()

    def held(*_args: Any) -> None:
        os.write(1, b"FOLDING\n")  # one write: print() from two threads can interleave "FOLDINGR2\n\n"
        stop.wait()  # killed here

    setattr(journal, point, held)
    record(journal, 1)
    os.write(1, b"R1\n")
    journal.fold()
    record(journal, 2)  # on the loop, while the fold's thread waits
    os.write(1, b"R2\n")
    await asyncio.sleep(60)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
