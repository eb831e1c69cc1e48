"""``edge-agent fleet diagnostics``: fetch a gateway's redacted diagnostics bundle as a ``.tar.gz``.

One signed ``diagnostics`` request builds the bundle on the gateway (its size, sha256 and number
of parts come back); then one signed request per part, in order, on the same connection, each
retried once on a timeout under a new id. The file is written only once every part arrived and
the size and sha256 match (mode 0600, never over an existing file).

A gateway takes ``fleet.requests_per_minute`` requests a minute (120 by default); a 5 MB bundle
is 77 parts of 64 KiB, 78 requests in all. The command sends at most ``--requests-per-minute``
(default 100) in any minute, waiting when a larger bundle needs it, and says so.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.tools.fleet.cmd import no_answer
from agent.tools.fleet.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ToolError, close, connect, fail

MAX_BUNDLE = 5 * 1000 * 1000  # what a gateway builds at most: a larger claim is refused
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Session:
    """Signed requests to one gateway over one connection, paced to a number per minute."""

    def __init__(self, args: argparse.Namespace, client: Any, key: Any, key_id: str) -> None:
        """``client``: connected, loop running; its callbacks are set here."""
        self._args = args
        self._client = client
        self._key = key
        self._key_id = key_id
        self._base = f"{args.root}/{args.gateway}"
        self._status_topic = f"{args.topic_prefix}/{args.gateway}/status"
        self._replies: dict[str, dict[str, Any]] = {}
        self._got = threading.Condition()
        self._sent: collections.deque[float] = collections.deque()
        self.status_seen: list[str] = []
        subscribed = threading.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *_a: subscribed.set()
        client.subscribe([(f"{self._base}/res/+/+", 1), (self._status_topic, 1)])
        subscribed.wait(args.timeout)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        if message.topic == self._status_topic:
            self.status_seen.append(message.payload.decode(errors="replace"))
            return
        request_id = message.topic.split("/")[-2]
        try:
            answer = json.loads(message.payload)
        except ValueError:
            answer = {"status": "failed", "error": "the reply is not JSON"}
        if not isinstance(answer, dict):
            answer = {"status": "failed", "error": "the reply is not a JSON object"}
        with self._got:
            self._replies[request_id] = answer
            self._got.notify_all()

    def ask(self, command: str, command_args: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The gateway's answer to one signed request, or None if none came within ``timeout`` s."""
        from agent.fleet.envelope import COMMAND_TYPE, make_body, sign

        self._pace()
        request_id = secrets.token_hex(8)
        fields = {"command": command, "id": request_id, "args": command_args}
        body = make_body(target=self._args.gateway, ttl=self._args.ttl, fields=fields)
        envelope = sign(COMMAND_TYPE, body, self._key, self._key_id)
        self._client.publish(f"{self._base}/req/{request_id}/{command}", envelope, qos=1)
        with self._got:
            self._got.wait_for(lambda: request_id in self._replies, timeout)
            return self._replies.pop(request_id, None)

    def _pace(self) -> None:
        """At most ``--requests-per-minute`` in any 60 s (so in any minute the gateway counts)."""
        most = self._args.requests_per_minute
        while len(self._sent) >= most:
            wait = self._sent[0] + 60.0 - time.monotonic()
            if wait <= 0:
                self._sent.popleft()
                continue
            time.sleep(wait)
        self._sent.append(time.monotonic())


def _check_build(data: Any) -> tuple[str, int, str, int, int]:
    """(bundle, size, sha256, parts, part_size) of the build answer; ToolError if it does not add up."""
    if not isinstance(data, dict):
        raise ToolError("the gateway's answer has no data", EXIT_FAILED)
    bundle, digest = data.get("bundle"), data.get("sha256")
    if not (isinstance(bundle, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", bundle)):
        raise ToolError(f"the gateway answered no usable bundle id: {str(bundle)[:80]!r}", EXIT_FAILED)
    if not (isinstance(digest, str) and _SHA256.match(digest)):
        raise ToolError("the gateway answered no sha256", EXIT_FAILED)
    size, parts, part_size = (_count(data, name) for name in ("size", "parts", "part_size"))
    if size > MAX_BUNDLE or parts != -(-size // part_size):
        raise ToolError(f"size {size} in {parts} parts of {part_size} does not add up (or is over 5 MB)", EXIT_FAILED)
    return bundle, size, digest, parts, part_size


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ToolError(f"the gateway answered {name} {value!r}, not a count", EXIT_FAILED)
    return value


def _fetch(session: Session, bundle: str, index: int, expected: int, timeout: float) -> bytes:
    """One part, retried once if no answer came; ToolError if refused or of the wrong length."""
    for attempt in (1, 2):
        answer = session.ask("diagnostics", {"bundle": bundle, "part": index}, timeout)
        if answer is None:
            if attempt == 1:
                continue
            raise ToolError(f"part {index}: no answer, twice", EXIT_FAILED)
        if answer.get("status") != "ok":
            raise ToolError(f"part {index}: {answer.get('code')}: {answer.get('error')}", EXIT_FAILED)
        data = answer.get("data")
        text = data.get("data") if isinstance(data, dict) else None
        try:
            raw = base64.b64decode(text if isinstance(text, str) else "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ToolError(f"part {index}: not base64", EXIT_FAILED) from exc
        if len(raw) != expected:
            raise ToolError(f"part {index}: {len(raw)} bytes, expected {expected}", EXIT_FAILED)
        return raw
    raise AssertionError("unreachable")  # pragma: no cover


def _save(out: Path, content: bytes) -> None:
    """Write ``content`` to a new file (0600); nothing is left behind if writing fails."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def diagnostics(args: argparse.Namespace) -> int:
    """Build, fetch, check and save the bundle; 0 saved, 1 refused, no answer or a mismatch, 2 usage."""
    from agent.fleet.keys import key_id, load_private_key

    out: Path = args.out
    if out.exists():
        return fail("diagnostics", ToolError(f"{out} exists; not overwriting it", EXIT_USAGE))
    try:
        key = load_private_key(args.key)
    except (OSError, ValueError) as exc:
        return fail("diagnostics", ToolError(str(exc), EXIT_USAGE))
    try:
        client = connect(args, f"edge-agent-fleet-{secrets.token_hex(8)}")
    except ToolError as exc:
        return fail("diagnostics", exc)
    started = time.monotonic()
    try:
        session = Session(args, client, key, args.key_id or key_id(key.public_key()))
        content, bundle, digest = _download(session, args)
    except ToolError as exc:
        return fail("diagnostics", exc)
    finally:
        close(client)
    try:
        _save(out, content)
    except OSError as exc:
        return fail("diagnostics", ToolError(f"cannot write {out}: {exc}", EXIT_FAILED))
    seconds = round(time.monotonic() - started, 1)
    if args.json:
        print(
            json.dumps({"bundle": bundle, "file": str(out), "size": len(content), "sha256": digest, "seconds": seconds})
        )
    else:
        print(f"{args.gateway}: bundle {bundle} saved to {out} ({len(content)} bytes, sha256 {digest}, {seconds} s)")
    return EXIT_OK


def _download(session: Session, args: argparse.Namespace) -> tuple[bytes, str, str]:
    answer = session.ask("diagnostics", {}, args.build_timeout)
    if answer is None:
        raise ToolError(no_answer(args.gateway, args.build_timeout, session.status_seen), EXIT_FAILED)
    if answer.get("status") != "ok":
        raise ToolError(f"{answer.get('status')} ({answer.get('code')}): {answer.get('error')}", EXIT_FAILED)
    bundle, size, digest, parts, part_size = _check_build(answer.get("data"))
    if parts + 1 > args.requests_per_minute:
        minutes = (parts + 1) / args.requests_per_minute
        print(
            f"{parts} parts: at most {args.requests_per_minute} requests a minute, about {minutes:.1f} minutes",
            file=sys.stderr,
        )
    chunks = []
    for index in range(parts):
        expected = part_size if index < parts - 1 else size - part_size * (parts - 1)
        chunks.append(_fetch(session, bundle, index, expected, args.timeout))
    content = b"".join(chunks)
    actual = hashlib.sha256(content).hexdigest()
    if len(content) != size or actual != digest:
        raise ToolError(
            f"the bundle does not match: {len(content)} bytes, sha256 {actual}; "
            f"the gateway said {size} bytes, sha256 {digest}; nothing saved",
            EXIT_FAILED,
        )
    return content, bundle, digest
