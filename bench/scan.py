#!/usr/bin/env python3
"""Scan benchmark: ``edge-agent scan modbus`` over units 1-247 at 9600 baud on a pseudo-terminal.

Real parts: ``edge-agent simulate modbus`` (pymodbus, strict, an SDM630 as one unit) on a pty
pair, and the CLI's scan as its own process, timed from start to exit. Prints the wall time of
the full sweep (port opened once, every absent unit waited for), the time to the hit with
``--first``, and the matched profile. Figures are printed, never asserted (issue 18: <= 15 s).

    .venv/bin/python bench/scan.py             # unit 200 served; about 15 s
    .venv/bin/python bench/scan.py --unit 247  # the last unit
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    return time.monotonic() - start, done


def main() -> int:
    """Serve one unit on a pty, scan 1-247 at 9600 8N1, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", type=int, default=200, help="the unit the simulator serves (1-247)")
    args = parser.parse_args()
    agent = [sys.executable, "-m", "agent"]
    meter = subprocess.Popen([*agent, "simulate", "modbus", "--profile", "eastron-sdm630", "--rtu", "--units",
                              str(args.unit)], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert meter.stdout is not None
        client = meter.stdout.readline().rsplit("serial.port: ", 1)[1].strip()
        scan = [*agent, "scan", "modbus", "--port", client, "--baud", "9600", "--parity", "N", "--units", "1-247"]
        full, done = _timed(scan)
        first, found = _timed([*scan, "--first"])
    finally:
        meter.terminate()
        meter.wait(5)
    rows = [r.split() for r in done.stdout.splitlines() if r[:4].strip().isdigit()]
    progress = sum(1 for line in done.stderr.splitlines() if line.startswith("scan "))
    print(f"scan modbus, units 1-247 at 9600 8N1 on a pty, unit {args.unit} served (exit {done.returncode}):")
    print(f"  full sweep:       {full:6.2f} s wall (process start to exit), {progress} progress lines")
    print(f"  --first:          {first:6.2f} s wall (exit {found.returncode})")
    print(f"  per absent unit:  {1000 * full / 247:6.1f} ms (whole sweep / 247)")
    print(f"  found:            {', '.join(f'unit {r[0]} = {r[3]}' for r in rows) or 'nothing'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
