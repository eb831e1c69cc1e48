#!/usr/bin/env python3
"""Technician page benchmark: what the page costs the agent, and how fast a reading reaches the screen.

Two real agents (``python -m agent run``), one with ``ui.enabled: false`` and one with it on, each
with 20 virtual meters polled every second and no broker (the uplink retries; nothing here
depends on it). The page-off agent is the baseline: "added" means page-on minus page-off,
measured at the same moment. Phases, and what each prints:

1. idle (``--idle`` s after ``--settle`` s): RSS of each agent, and their CPU (% of one core);
2. first load: the static files' bytes and gzipped bytes;
3. 5 clients hold the live event stream (server-sent events) for ``--minutes``: RSS of both
   agents sampled every ``--every`` s from /proc (added RSS at the end and its peak; the slope of
   the added RSS over the second half of the run, a leak check), CPU of each agent, updates per
   second per client;
4. still under the 5 streams: p50/p99 of each JSON route the page uses (``/api/status``,
   ``/api/preview/<device>``, ``/api/session``), ``--requests`` each on a kept-alive connection;
5. still under the 5 streams: poll-to-screen latency in Debian's chromium (bench/ui_browser.py):
   from a reading's own time to the paint of its value, over ``--changes`` successive values,
   and the requests the page made before its first value.

6. the page's scan of units 1-247 at 9600 8N1 and the commissioning walkthrough's machine time
   in chromium on a phone (bench/ui_walk.py).

``--parts`` picks some of: ``page`` (phases 1-5), ``scan``, ``walk``; all by default.
A final table gives figure, target, measured and pass. It exits non-zero only when it could not
measure; a figure over its target is printed, not raised.

    .venv/bin/python bench/ui.py             # the issue's 5 minutes: about 7 min in all
    .venv/bin/python bench/ui.py --quick     # every phase, shorter: about 60 s, then scan and walk: 30 s
    .venv/bin/python bench/ui.py --parts walk  # the walkthrough alone
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2

# bench/ is sys.path[0] when this file is run.
import ui_walk
from ui_browser import latency
from ui_proc import CpuWindow, RssSampler, percentile, rss_kib, slope_per_minute

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"X-Edge-Agent": "1"}
PASSWORD = "bench-password-1234"  # noqa: S105 - the benchmark's own
COOKIE = "ea_session"
CLIENTS = 5
WATCHED = ("meter-0", "active_energy")  # rises at every reading, so each shown value names one reading
WATCHED_INTERVAL = "1030ms"
LEAK_RUN = 120  # seconds of streams below which the RSS slope gets no verdict
Row = tuple[str, str, str, bool | None]  # figure, target, measured, pass (None: no target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(folder: Path, ui: bool, port: int) -> subprocess.Popen[bytes]:
    # The watched meter polls every 1.03 s: its readings drift across the stream's 0.5 s tick, so the
    # latency samples that tick's whole phase instead of the one a 1 s poll would lock it to.
    interval = {0: WATCHED_INTERVAL}
    devices = "".join(
        f"  - {{id: meter-{i}, driver: virtual, kind: meter, interval: {interval.get(i, '1s')}}}\n" for i in range(20)
    )
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


def first_load(base: str) -> tuple[int, int, int]:
    """Static files: (count, bytes, gzipped bytes), and none may name another host."""
    total = zipped = 0
    names = ["/", "/app.js", "/app.css"]
    for name in names:
        body = httpx2.get(base + name, timeout=10).content
        total += len(body)
        zipped += len(gzip.compress(body, 9))
        external = re.findall(rb"https?://", body)
        print(f"  {name:<10} {len(body):>6} B  {len(gzip.compress(body, 9)):>5} B gz  other hosts: {len(external)}")
    return len(names), total, zipped


def api_times(port: int, cookie: str, path: str, count: int) -> list[float]:
    """Seconds per request on one kept-alive connection, as a browser makes them."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", path, headers={"Cookie": cookie})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}")
        times.append(time.perf_counter() - started)
    connection.close()
    return times


def stream(base: str, cookies: httpx2.Cookies, stop: threading.Event, counts: list[int], i: int,
           received: list[tuple[float, float]]) -> None:  # fmt: skip
    """One live stream; client 0 also notes when each new value of the watched point arrived."""
    with httpx2.Client(base_url=base, cookies=cookies, timeout=30) as c, c.stream("GET", "/api/events") as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                counts[i] += 1
                if i == 0:
                    arrived = time.time()
                    value = watched_value(json.loads(line[6:]))
                    if value is not None and (not received or received[-1][0] != value):
                        received.append((value, arrived))
            if stop.is_set():
                return


def watched_value(snapshot: dict[str, Any]) -> float | None:
    for device in snapshot["devices"]:
        if device["id"] == WATCHED[0]:
            for point in device["points"]:
                if point["name"] == WATCHED[1]:
                    return float(point["value"])
    return None


def mib(kib: float) -> str:
    return f"{kib / 1024:+.1f} MiB"


def table(rows: list[Row]) -> None:
    widths = [max(len(text) for text in column) for column in list(zip(*(r[:3] for r in rows), strict=True))]
    print(f"\n{'figure':<{widths[0]}}  {'target':<{widths[1]}}  {'measured':<{widths[2]}}  pass")
    for figure, target, measured, ok in rows:
        verdict = "-" if ok is None else "yes" if ok else "NO"
        print(f"{figure:<{widths[0]}}  {target:<{widths[1]}}  {measured:<{widths[2]}}  {verdict}")


def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    off_dir, on_dir = tmp / "off", tmp / "on"
    off_dir.mkdir()
    on_dir.mkdir()
    port = free_port()
    off = start(off_dir, False, free_port())
    on = start(on_dir, True, port)
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    try:
        setup = token(on_dir)
        time.sleep(args.settle)
        cpu = CpuWindow([on.pid, off.pid])
        cpu.start()
        time.sleep(args.idle)
        idle_cpu = cpu.stop()
        idle_on, idle_off = rss_kib(on.pid), rss_kib(off.pid)
        print(f"idle: RSS page off {idle_off / 1024:.1f} MiB, page on {idle_on / 1024:.1f} MiB: "
              f"{mib(idle_on - idle_off)}; CPU page on {idle_cpu[0]:.1f} %, off {idle_cpu[1]:.1f} %"
              " of one core")  # fmt: skip
        rows.append(("RSS added, page idle", "<= 10 MiB", mib(idle_on - idle_off), idle_on - idle_off <= 10 * 1024))
        rows.append(("CPU, page on / off, idle", "-", f"{idle_cpu[0]:.1f} / {idle_cpu[1]:.1f} % of a core", None))

        print("first load (static files):")
        files, raw, zipped = first_load(base)
        with httpx2.Client(base_url=base, headers=HEADERS, timeout=10) as c:
            c.post("/api/setup", json={"token": setup}).raise_for_status()
            c.post("/api/password", json={"password": PASSWORD}).raise_for_status()
            cookies = c.cookies
        sid = cookies[COOKIE]

        counts = [0] * CLIENTS
        received: list[tuple[float, float]] = []
        threads = [threading.Thread(target=stream, args=(base, cookies, stop, counts, i, received))
                   for i in range(CLIENTS)]  # fmt: skip
        for t in threads:
            t.start()
        seconds = args.minutes * 60
        print(f"{CLIENTS} streams for {seconds:g} s, RSS sampled every {args.every:g} s ...", flush=True)
        sampler = RssSampler([on.pid, off.pid], args.every)
        before = list(counts)
        cpu.start()
        sampler.start()
        time.sleep(seconds)
        sampler.finish()
        stream_cpu = cpu.stop()
        rates = [(after - was) / seconds for after, was in zip(counts, before, strict=True)]
        added = sampler.difference(0, 1)
        end, peak = added[-1][1], max(v for _, v in added)
        second_half = [(t, v) for t, v in added if t >= seconds / 2]
        slope = slope_per_minute(second_half)
        slopes = [slope_per_minute(sampler.series(i)) for i in (0, 1)]
        print(f"  RSS page on {sampler.samples[-1][1][0] / 1024:.1f} MiB, off {sampler.samples[-1][1][1] / 1024:.1f} "
              f"MiB: added {mib(end)} at the end, peak {mib(peak)} ({len(added)} samples)")  # fmt: skip
        print(f"  RSS slope over the run: page on {slopes[0]:+.0f}, off {slopes[1]:+.0f} KiB/min; "
              f"added RSS over the second half: {slope:+.0f} KiB/min")  # fmt: skip
        print(f"  CPU page on {stream_cpu[0]:.1f} %, off {stream_cpu[1]:.1f} % of a core; "
              f"updates/s per client {min(rates):.2f}..{max(rates):.2f}")  # fmt: skip
        where = f"{CLIENTS} clients, {args.minutes:g} min"
        rows.append((f"RSS added, {where}, end", "<= 12 MiB", mib(end), end <= 12 * 1024))
        rows.append((f"RSS added, {where}, peak", "<= 12 MiB", mib(peak), peak <= 12 * 1024))
        # Half a short run is mostly the allocator warming up: no verdict under LEAK_RUN seconds.
        judged = seconds >= LEAK_RUN
        rows.append(("RSS added, slope, 2nd half (leak)", "<= 100 KiB/min" if judged else f"- (run < {LEAK_RUN} s)",
                     f"{slope:+.0f} KiB/min", slope <= 100 if judged else None))  # fmt: skip
        rows.append((f"CPU, page on / off, {CLIENTS} clients", "-",
                     f"{stream_cpu[0]:.1f} / {stream_cpu[1]:.1f} % of a core", None))  # fmt: skip
        rows.append(("updates/s per client", "<= 5", f"{min(rates):.2f}..{max(rates):.2f}", max(rates) <= 5))

        cookie = f"{COOKIE}={sid}"
        for path in ("/api/status", f"/api/preview/{WATCHED[0]}", "/api/session"):
            times = api_times(port, cookie, path, args.requests)
            p50, p99 = percentile(times, 50) * 1000, percentile(times, 99) * 1000
            print(f"  {path}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({args.requests} requests, {CLIENTS} streams on)")
            rows.append((f"{path} p99, {CLIENTS} streams on", "<= 100 ms", f"{p99:.1f} ms", p99 <= 100))

        print(f"poll-to-screen in chromium, {args.changes} changes of {' '.join(WATCHED)} ...", flush=True)
        seen = latency(port, (COOKIE, sid), *WATCHED, changes=args.changes, timeout=args.changes * 3 + 30,
                       received=received)  # fmt: skip
        sse = [x * 1000 for x in seen.to_stream]
        print(f"  reading -> stream client: p50 {percentile(sse, 50):.0f} ms, p95 {percentile(sse, 95):.0f} ms, "
              f"max {max(sse):.0f} ms ({len(sse)} values)")  # fmt: skip
        lat = [x * 1000 for x in seen.latencies]
        p50, p95, worst = percentile(lat, 50), percentile(lat, 95), max(lat)
        print(f"  reading -> paint in chromium: p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {worst:.0f} ms "
              f"({len(lat)} changes)")  # fmt: skip
        foreign = [u for u in seen.first_requests if not u.startswith((base, "data:"))]
        print(f"  requests before the first value: {len(seen.first_requests)}: {' '.join(seen.first_requests)}")
        rows.append(("first load, gzipped", "<= 50 KB", f"{zipped / 1000:.1f} KB ({raw / 1000:.1f} KB raw, "
                     f"{files} files)", zipped <= 50_000))  # fmt: skip
        count = len(seen.first_requests)
        rows.append(("requests before the first value", "<= 5, no other host",
                     f"{count}, {len(foreign)} other host", count <= 5 and not foreign))  # fmt: skip
        rows.append((f"poll-to-screen, {len(lat)} changes", "<= 1000 ms (max)",
                     f"p50 {p50:.0f}, p95 {p95:.0f}, max {worst:.0f} ms", worst <= 1000))  # fmt: skip
    finally:
        stop.set()
        for proc in (off, on):
            proc.send_signal(signal.SIGTERM)
        for proc in (off, on):
            proc.wait(15)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every phase, shorter (a smoke run: about 60 s)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after start before the idle phase")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle CPU window")
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of 5 live streams")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--requests", type=int, default=300, help="requests per JSON route")
    parser.add_argument("--changes", type=int, default=30, help="values watched on screen")
    parser.add_argument("--parts", default="page,scan,walk", help="comma-separated, of page (phases 1-5), scan "
                        "(the page's scan of 1-247 at 9600 baud), walk (the walkthrough's machine time)")  # fmt: skip
    if parser.parse_args().quick:  # shorter defaults; options given still win
        parser.set_defaults(settle=5.0, idle=5.0, minutes=0.5, every=2.0, requests=100, changes=10)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"page", "scan", "walk"} or not parts:
        parser.error(f"--parts: expected some of page, scan, walk (comma-separated), got {args.parts!r}")
    load = os.getloadavg()
    print(f"bench/ui.py {' '.join(sys.argv[1:])}: {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, Python {sys.version.split()[0]}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rows = (run(args, Path(tmp)) if "page" in parts else []) + ui_walk.rows(parts, Path(tmp))
        except Exception as exc:
            print(f"bench/ui.py: could not measure: {exc}", file=sys.stderr)
            return 1
    table(rows)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
