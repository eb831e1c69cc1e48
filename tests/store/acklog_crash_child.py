"""Crash-test helper: log acknowledgements of an outbox's rows, then wait to be SIGKILLed.

Run by tests/store/test_acklog.py. Appends ROWS rows, logs the first ACKED of them as delivered
(Outbox.ack_later: the ack log, not yet applied to the file), prints "logged" and sleeps.

Usage: python acklog_crash_child.py DB_PATH ROWS ACKED
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.store.outbox import Outbox, Record


def main() -> None:
    path, rows, acked = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    box = Outbox(path, max_bytes=1 << 30)
    result = box.append([Record("dev", "reading", 1, n, "", b"%d" % n * 20, time.time()) for n in range(1, rows + 1)])
    box.ack_later(list(range(result.first_id, result.first_id + acked)))
    print("logged", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
