"""``edge-agent fleet push-config``: publish a desired config to gateways and follow what each reports.

Everything is published first (retained, QoS 1, PUBACKs awaited), then the answers are awaited
once, so a hundred gateways take about as long as the slowest one.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.tools.fleet.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ToolError, close, connect, fail
from agent.tools.fleet.documents import (
    DEFAULT_HEALTH_WINDOW,
    DEFAULT_TTL,
    build,
    check_health_window,
    check_version,
    config_hash,
    parse_sections,
    parse_ttl,
    read_signed,
    site_sections,
)
from agent.tools.fleet.follow import FINAL, NO_ANSWER, NOT_PUBLISHED, Outcome, Tracker, percentile
from agent.tools.fleet.targets import expand

IN_FLIGHT = 200  # unacknowledged documents at most: bounds memory for thousands of 256 KiB documents
ACK_TIMEOUT = 30.0  # seconds for the broker to acknowledge one publish
CONNECT_TIMEOUT = 10.0
WAIT_AFTER_WINDOW = 30  # default --wait: the health window and this much more
MAX_WAIT = 86400


@dataclass(frozen=True)
class Plan:
    """What to publish: the version and hash every gateway should report, and each one's document."""

    version: int
    hash: str
    health_window: int
    document: Callable[[str], bytes]


def push_config(args: argparse.Namespace) -> int:
    """Publish ``args.document`` to each gateway of ``args.to``; print how each answered."""
    from agent.errors import ConfigError

    try:
        gateways = expand(args.to)
        plan = _plan(args, gateways)
    except ConfigError as exc:
        print(f"edge-agent fleet push-config: {args.document} is not a valid site file; nothing sent:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        return fail("push-config", ToolError(str(exc), EXIT_USAGE))
    if args.wait is not None and not 0 <= args.wait <= MAX_WAIT:
        return fail("push-config", ToolError(f"--wait {args.wait:g}: 0 to {MAX_WAIT} seconds", EXIT_USAGE))
    wait = args.wait if args.wait is not None else max(120, plan.health_window + WAIT_AFTER_WINDOW)
    tracker = Tracker(gateways, plan.version, plan.hash, args.root, args.topic_prefix)
    try:
        client = connect(args, f"edge-agent-fleet-push-{secrets.token_hex(4)}")
    except ToolError as exc:
        return fail("push-config", exc)
    outcomes: list[Outcome] = []
    try:
        _subscribe(client, args, tracker)
        if not args.json:
            print(
                f"version {plan.version} ({plan.hash[:19]}...) to {len(gateways)} gateway(s); waiting up to {wait:g} s"
            )
        _publish(client, args.root, gateways, plan, tracker)
        deadline = time.monotonic() + wait
        width = max(map(len, gateways))
        while tracker.waiting() or not tracker.answers.empty():
            left = deadline - time.monotonic()
            if left <= 0 and tracker.answers.empty():
                break
            outcome = _next(tracker, left)
            if outcome is not None:
                outcomes.append(outcome)
                _row(outcome, width, args.json)
    except ToolError as exc:
        return fail("push-config", exc)
    finally:
        close(client)
    for outcome in tracker.unanswered():
        outcomes.append(outcome)
        _row(outcome, width, args.json)
    summary = _summary(outcomes)
    if args.json:
        gateway_docs = {o.gateway: o.as_json() for o in outcomes}
        print(json.dumps({"version": plan.version, "hash": plan.hash, "gateways": gateway_docs, "summary": summary}))
    else:
        print(_summary_line(summary))
    return EXIT_OK if summary["applied"] == len(gateways) else EXIT_FAILED


def _plan(args: argparse.Namespace, gateways: list[str]) -> Plan:
    """The documents: a signed .json as it is, or the site file signed for each gateway.

    Raises:
        ValueError, ConfigError: the operator's input, named.
    """
    path: Path = args.document
    if path.suffix.lower() == ".json":
        given = {
            "--key": args.key,
            "--key-id": args.key_id,
            "--version": args.version,
            "--sections": args.sections,
            "--ttl": args.ttl,
            "--health-window": args.health_window,
            "--require-new-devices": args.require_new_devices or None,
        }
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)}: {path} is signed already (these are for pushing a site file)")
        signed = read_signed(path)
        if not signed.target.startswith("group:") and gateways != [signed.target]:
            raise ValueError(f"{path} is signed for {signed.target} alone: give --to {signed.target}")
        window = signed.health_window if signed.health_window is not None else DEFAULT_HEALTH_WINDOW
        return Plan(signed.version, signed.hash, window, lambda _gateway: signed.data)
    if args.key is None:
        raise ValueError("--key: a site file is signed for each gateway (or push a file `fleet sign` wrote)")
    from agent.fleet.keys import key_id, load_private_key

    ttl = parse_ttl(args.ttl or DEFAULT_TTL)
    names = parse_sections(args.sections)
    version = check_version(args.version if args.version is not None else int(time.time()))
    window = check_health_window(args.health_window if args.health_window is not None else DEFAULT_HEALTH_WINDOW)
    key = load_private_key(args.key)
    sections = site_sections(path, names)
    signer = args.key_id or key_id(key.public_key())

    def document(gateway: str) -> bytes:
        return build(
            sections,
            key=key,
            key_id=signer,
            version=version,
            target=gateway,
            ttl=ttl,
            health_window=window,
            require_new_devices=args.require_new_devices,
        )

    document(max(gateways, key=len))  # the largest one: over 256 KiB is refused before anything is sent
    return Plan(version, config_hash(sections), window, document)


def _subscribe(client: Any, args: argparse.Namespace, tracker: Tracker) -> None:
    """Follow reports and availability before anything is published: no answer can slip past."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise ToolError(f"the broker did not accept the connection within {CONNECT_TIMEOUT:g} s", EXIT_FAILED)
        time.sleep(0.02)
    granted: list[Any] = []
    client.on_message = lambda _c, _u, message: tracker.on_message(message.topic, message.payload)
    client.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.extend(codes)
    filters = [f"{args.root}/+/reported", f"{args.topic_prefix}/+/status"]
    client.subscribe([(topic, 1) for topic in filters])
    # paho reconnects by itself after a drop, to a clean session: the subscriptions must be renewed.
    client.on_connect = lambda c, _u, _f, reason, _p: (
        None if reason.is_failure else c.subscribe([(topic, 1) for topic in filters])
    )
    while not granted:
        if time.monotonic() > deadline + CONNECT_TIMEOUT:
            raise ToolError(f"the broker did not acknowledge the subscription to {filters[0]}", EXIT_FAILED)
        time.sleep(0.02)
    refused = [topic for topic, code in zip(filters, granted, strict=False) if code.is_failure]
    if refused:
        raise ToolError(f"the broker refused the subscription to {', '.join(refused)} (its ACL?)", EXIT_FAILED)


def _publish(client: Any, root: str, gateways: list[str], plan: Plan, tracker: Tracker) -> None:
    """Publish each gateway's document retained, QoS 1; return once the broker acknowledged all."""
    refusals: dict[int, str] = {}

    def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):  # MQTT 5 only: a 3.1.1 PUBACK cannot say no
            refusals[mid] = str(reason)  # paho calls this before it marks the message published

    client.on_publish = on_publish
    in_flight: deque[tuple[str, Any]] = deque()

    def acked() -> None:
        gateway, info = in_flight.popleft()
        topic = f"{root}/{gateway}/desired"
        try:
            info.wait_for_publish(ACK_TIMEOUT)
        except (ValueError, RuntimeError) as exc:
            raise ToolError(f"publishing {topic} failed: {exc}", EXIT_FAILED) from exc
        if not info.is_published():
            raise ToolError(f"the broker did not acknowledge {topic} within {ACK_TIMEOUT:g} s", EXIT_FAILED)
        if info.mid in refusals:
            tracker.refused(gateway, refusals.pop(info.mid))

    for gateway in gateways:
        data = plan.document(gateway)
        tracker.sent(gateway, time.monotonic())
        in_flight.append((gateway, client.publish(f"{root}/{gateway}/desired", data, qos=1, retain=True)))
        while len(in_flight) > IN_FLIGHT:
            acked()
    while in_flight:
        acked()


def _next(tracker: Tracker, left: float) -> Outcome | None:
    import queue

    try:
        return tracker.answers.get(timeout=max(0.001, min(left, 0.2)))
    except queue.Empty:
        return None


def _row(outcome: Outcome, width: int, quiet: bool) -> None:
    """One line per gateway as it answers: gateway, version, status, seconds, reason (or what it last said)."""
    if quiet:
        return
    seconds = f"{outcome.seconds:6.1f} s" if outcome.seconds is not None else f"{'-':>6}  "
    detail = outcome.reason
    if outcome.status == NO_ANSWER:
        said = f"last report: {outcome.last_report}" if outcome.last_report else "no report at all"
        status = f"status topic: {outcome.availability}" if outcome.availability else "no status topic"
        detail = f"{said}; {status}" + (f"; {outcome.reason}" if outcome.reason else "")
    shown = outcome.status.replace("_", " ")
    print(f"{outcome.gateway:<{width}}  v{outcome.version}  {shown:<13}  {seconds}  {detail}".rstrip(), flush=True)


def _summary(outcomes: list[Outcome]) -> dict[str, Any]:
    counts = {status: sum(o.status == status for o in outcomes) for status in (*FINAL, NO_ANSWER, NOT_PUBLISHED)}
    times = [o.seconds for o in outcomes if o.status == "applied" and o.seconds is not None]
    spread = {"p50": percentile(times, 0.5), "p95": percentile(times, 0.95), "max": max(times, default=None)}
    return {"gateways": len(outcomes), **counts, "seconds_to_applied": spread}


def _summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{summary[s]} {s.replace('_', ' ')}" for s in (*FINAL, NO_ANSWER, NOT_PUBLISHED) if summary[s]]
    line = f"{summary['gateways']} gateway(s): " + ", ".join(parts)
    spread = summary["seconds_to_applied"]
    if spread["max"] is not None:
        line += f"; seconds to applied p50 {spread['p50']:.1f}, p95 {spread['p95']:.1f}, max {spread['max']:.1f}"
    return line
