#!/usr/bin/env python3
"""Technician page benchmark: what the page adds to the agent's memory, and what a first load costs.

Two real agents (``python -m agent run``), one with ``ui.enabled: false`` and one with it on, each
with 20 virtual meters and no broker (the uplink retries; nothing here depends on it). Prints:

- RSS of each agent after a settle time, and the difference (the page idle);
- RSS of the page's agent while 5 clients hold the live event stream (server-sent events);
- first load: the requests the page makes before its first live update, their bytes and gzipped bytes,
  and whether any names another host;
- API latency: p50/p99 of ``/api/status`` over 200 requests.

    .venv/bin/python bench/ui.py                 # about 40 s
    .venv/bin/python bench/ui.py --stream 300    # the issue's 5 minutes of 5 streams

This prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"X-Edge-Agent": "1"}
PASSWORD = "bench-password-1234"  # noqa: S105 - the benchmark's own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(folder: Path, ui: bool, port: int) -> subprocess.Popen[bytes]:
    devices = "".join(f"  - {{id: meter-{i}, driver: virtual, kind: meter, interval: 1s}}\n" for i in range(20))
    config = folder / "site.yaml"
    config.write_text(
        "gateway: {id: gw-bench}\n"
        "uplink: {mqtt: {host: 127.0.0.1, port: 1, reconnect_min: 1s, reconnect_max: 5s}}\n"
        f"buffer: {{path: {folder / 'buffer.db'}}}\n"
        f'ui: {{enabled: {str(ui).lower()}, listen: "127.0.0.1:{port}"}}\n'
        f"devices:\n{devices}"
    )
    log = (folder / "agent.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)], stdout=log, stderr=log, cwd=ROOT)


def token(folder: Path) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"#setup=([A-Za-z0-9_-]+)", (folder / "agent.log").read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.1)
    raise SystemExit("bench/ui.py: the page's agent logged no setup token")


def first_load(base: str) -> None:
    total = zipped = 0
    names = ["/", "/app.js", "/app.css"]
    for name in names:
        body = httpx2.get(base + name, timeout=10).content
        total += len(body)
        zipped += len(gzip.compress(body, 9))
        external = re.findall(rb"https?://", body)
        print(f"  {name:<10} {len(body):>6} B  {len(gzip.compress(body, 9)):>5} B gz  other hosts: {len(external)}")
    print(f"  first load: {len(names)} files + /api/session + /api/events: {total} B, {zipped} B gzipped")


def api_times(port: int, cookie: str) -> list[float]:
    """200 requests on one kept-alive connection, as a browser makes them."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(200):
        started = time.perf_counter()
        connection.request("GET", "/api/status", headers={"Cookie": cookie})
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        times.append(time.perf_counter() - started)
    connection.close()
    return sorted(times)


def stream(base: str, cookies: httpx2.Cookies, stop: threading.Event, counts: list[int], i: int) -> None:
    with httpx2.Client(base_url=base, cookies=cookies, timeout=30) as c, c.stream("GET", "/api/events") as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                counts[i] += 1
            if stop.is_set():
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before the idle RSS is read")
    parser.add_argument("--stream", type=float, default=20.0, help="seconds of 5 live streams")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off_dir, on_dir = Path(tmp, "off"), Path(tmp, "on")
        off_dir.mkdir()
        on_dir.mkdir()
        port = free_port()
        off = start(off_dir, False, free_port())
        on = start(on_dir, True, port)
        base = f"http://127.0.0.1:{port}"
        try:
            setup = token(on_dir)
            time.sleep(args.settle)
            idle_off, idle_on = rss_mib(off.pid), rss_mib(on.pid)
            print(f"RSS idle: page off {idle_off:.1f} MiB, page on {idle_on:.1f} MiB: +{idle_on - idle_off:.1f} MiB")
            first_load(base)
            with httpx2.Client(base_url=base, headers=HEADERS, timeout=10) as c:
                c.post("/api/setup", json={"token": setup}).raise_for_status()
                c.post("/api/password", json={"password": PASSWORD}).raise_for_status()
                cookies = c.cookies
                times = api_times(port, "; ".join(f"{k}={v}" for k, v in cookies.items()))
                print(f"/api/status: p50 {times[100] * 1000:.1f} ms, p99 {times[197] * 1000:.1f} ms (200 requests)")
            stop, counts = threading.Event(), [0] * 5
            threads = [threading.Thread(target=stream, args=(base, cookies, stop, counts, i)) for i in range(5)]
            for t in threads:
                t.start()
            time.sleep(args.stream)
            streaming_on, streaming_off = rss_mib(on.pid), rss_mib(off.pid)
            stop.set()
            for t in threads:
                t.join(10)
            rate = sum(counts) / 5 / args.stream
            print(
                f"RSS with 5 streams for {args.stream:g} s: page on {streaming_on:.1f} MiB, page off "
                f"{streaming_off:.1f} MiB: +{streaming_on - streaming_off:.1f} MiB; {rate:.1f} updates/s per stream"
            )
        finally:
            for proc in (off, on):
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
