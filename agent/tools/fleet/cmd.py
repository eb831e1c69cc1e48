"""``edge-agent fleet cmd``: sign one command, send it through the broker, print the answer."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from typing import Any

from agent.tools.fleet.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ToolError, close, connect, fail
from agent.tools.fleet.mqtt5 import Exchange


def _value(text: str) -> Any:
    """``key=value`` arguments: JSON when it parses (numbers, true, null), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def no_answer(gateway: str, timeout: float, status_seen: list[str], last_seen: str | None = None) -> str:
    """What to say when a gateway did not answer: its retained status, if this client could read it.

    The status is the bare word ``online`` or ``offline`` (its last will), with no time in it;
    ``last_seen`` is the time of its retained inventory, which an online gateway puts out at least
    every 5 minutes: it went offline within 5 minutes after that.
    """
    head = f"no answer from {gateway} within {timeout:g} s"
    if not status_seen:
        return head
    state = status_seen[-1]
    if state != "offline":
        return f"{head} (its status topic says {state})"
    if last_seen is None:
        return f"{head}: offline (so says its status topic; no inventory tells since when)"
    return f"{head}: offline since {last_seen} or up to 5 minutes later (its last inventory)"


def _event_time(payload: bytes) -> str | None:
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    moment = event.get("time") if isinstance(event, dict) else None
    return moment if isinstance(moment, str) else None


def cmd(args: argparse.Namespace) -> int:
    """Sign ``args.command`` for ``args.gateway``, send it, wait for the answer and print it."""
    from agent.fleet.envelope import COMMAND_TYPE, make_body, sign
    from agent.fleet.keys import key_id, load_private_key

    try:
        key = load_private_key(args.key)
        command_args = dict(arg.split("=", 1) for arg in args.args)
    except (OSError, ValueError) as exc:
        return fail("cmd", ToolError(str(exc), EXIT_USAGE))
    request_id = secrets.token_hex(8)
    body = make_body(
        target=args.gateway,
        ttl=args.ttl,
        fields={"command": args.command, "id": request_id, "args": {k: _value(v) for k, v in command_args.items()}},
    )
    envelope = sign(COMMAND_TYPE, body, key, args.key_id or key_id(key.public_key()))
    base = f"{args.root}/{args.gateway}"
    answer: dict[str, Any] = {}
    status_seen: list[str] = []
    last_seen: list[str | None] = [None]
    inventory = f"{args.topic_prefix}/{args.gateway}/inventory"
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.topic == f"{args.topic_prefix}/{args.gateway}/status":
            status_seen.append(message.payload.decode(errors="replace"))
            return
        if message.topic == inventory:
            last_seen[0] = _event_time(message.payload)
            return
        try:
            answer.update(json.loads(message.payload))
        except ValueError:
            answer.update({"status": "failed", "error": "the reply is not JSON"})
        done.set()

    try:
        client = connect(args, f"edge-agent-fleet-{request_id}")
    except ToolError as exc:
        return fail("cmd", exc)
    exchange = Exchange(args, base, request_id)  # MQTT 5: response topic, correlation data, expiry
    client.on_message = exchange.replies_only(on_message)
    client.on_subscribe = lambda *_a: subscribed.set()
    try:
        client.subscribe(
            [(f"{base}/res/{request_id}/+", 1), (f"{args.topic_prefix}/{args.gateway}/status", 1), (inventory, 1)]
        )
        subscribed.wait(args.timeout)
        started = time.monotonic()
        client.publish(f"{base}/req/{request_id}/{args.command}", envelope, qos=1, properties=exchange.properties)
        answered = done.wait(args.timeout)
    finally:
        close(client)
    if not answered:
        print(no_answer(args.gateway, args.timeout, status_seen, last_seen[0]), file=sys.stderr)
        return EXIT_FAILED
    answer["round_trip_ms"] = round((time.monotonic() - started) * 1000, 1)
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"{args.gateway}: {answer.get('status')}" + (f" ({answer['code']})" if answer.get("code") else ""))
        if answer.get("error"):
            print(f"  {answer['error']}")
        if answer.get("data"):
            print(json.dumps(answer["data"], indent=2))
    return EXIT_OK if answer.get("status") == "ok" else EXIT_FAILED
