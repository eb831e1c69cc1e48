"""Crash-test helper: append batches to an Outbox forever, printing each committed last seq.

Run by tests/store/test_buffer.py, which SIGKILLs it at a random moment. Like the agent, it
resumes from the stored seq, so across kills a device's seqs must stay gapless.

Usage: python buffer_crash_child.py DB_PATH
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.store.outbox import Outbox, Record

BATCH = 5


def main() -> None:
    with Outbox(Path(sys.argv[1]), max_bytes=1 << 30) as box:
        seq = box.last_seqs().get("dev", 0)
        while True:
            batch = [
                Record("dev", "reading", n % 3, n, "site/dev", b"%d" % n * 20, time.time())
                for n in range(seq + 1, seq + 1 + BATCH)
            ]
            box.append(batch)
            seq += BATCH
            # Printed only after append() returned, i.e. after COMMIT.
            print(seq, flush=True)


if __name__ == "__main__":
    main()
