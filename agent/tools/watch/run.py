"""``edge-agent watch``: subscribe, check every message, print a live line and the final report."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

from agent.tools.watch import options
from agent.tools.watch.checks import Checker, Limits
from agent.tools.watch.report import report_json, report_text, summary_line
from agent.tools.watch.subscription import Session, SessionError

EXIT_OK, EXIT_VIOLATIONS, EXIT_USAGE = 0, 1, 2


def watch(args: argparse.Namespace) -> int:
    """Run until ``--duration`` after subscribing (or SIGINT/SIGTERM); 0 clean, 1 violations or no broker, 2 usage."""
    try:
        options.check(args)
        limits = Limits(args.max_late, args.max_skew, args.strict_late, options.classes(args.classes))
        checker = Checker(args.prefix, limits)
        lock = threading.Lock()

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            received = time.time()
            with lock:
                try:
                    checker.handle(topic, payload, retained, received)
                except Exception as exc:  # a bug of ours must not stop the watch: report it with the topic
                    checker.malformed(topic, "", "", f"the watcher could not check it: {exc!r}")

        session = Session(args, options.topic(args), on_message)
        session.open(args.host, args.port)
    except options.UsageError as exc:
        print(f"edge-agent watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SessionError as exc:
        print(f"edge-agent watch: {exc}", file=sys.stderr)
        return EXIT_VIOLATIONS
    started = time.monotonic()
    try:
        with _stop_on_signals() as stop:
            _live(checker, lock, stop, started, args.duration, args.every)
    finally:
        session.close()
    seconds = time.monotonic() - started
    with lock:
        checker.finish()
        print(json.dumps(report_json(checker, seconds), indent=2) if args.json else report_text(checker, seconds))
        return EXIT_VIOLATIONS if checker.findings.counts else EXIT_OK


def _live(
    checker: Checker, lock: threading.Lock, stop: threading.Event, started: float, duration: float, every: float
) -> None:
    """Wait for the end, printing the summary line every ``every`` seconds."""
    last, last_events = started, 0
    while True:
        now = time.monotonic()
        remaining = started + duration - now if duration > 0 else float("inf")
        next_line = last + every - now if every > 0 else float("inf")
        wait = min(remaining, next_line, 3600.0)
        if wait > 0 and stop.wait(wait):
            return
        now = time.monotonic()
        if duration > 0 and now >= started + duration:
            return
        if every > 0 and now >= last + every:
            with lock:
                rate = (checker.events - last_events) / max(now - last, 1e-9)
                line = summary_line(checker, now - started, rate)
                last_events = checker.events
            print(line, file=sys.stderr, flush=True)
            last = now


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT (Ctrl-C) and SIGTERM end the watch with its report, not a traceback."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: the caller keeps its own handling
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
