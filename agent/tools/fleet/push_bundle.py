"""``edge-agent fleet push-bundle FILE --to gw-001..gw-020``: a signed bundle to gateways over MQTT, throttled.

Each gateway gets a retained offer on ``{root}/{gw}/bundle/offer`` (the bundle's signed manifest, its
size and sha256) and asks for chunks through its retained ``{root}/{gw}/bundle/status`` (an ``ask``
token and the offset it has); this tool sends ``{root}/{gw}/bundle/chunk`` messages from that offset
at ``--rate`` bytes a second per gateway, and starts again from the gateway's offset whenever it asks
again (after a disconnect, a broker restart, a stall). A gateway offline now finds the retained
offer when it returns and asks: it is served while this tool waits (``--wait``). The protocol, the
gateway's side: agent/fleet/bundles/transfer.py; docs/fleet.md, "Update bundles".

Exit status: 0 every gateway applied it (or had it already); 1 one refused it, rolled it back or
did not finish within ``--wait``; 2 usage.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.tools.fleet.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ToolError, close, connect, fail
from agent.tools.fleet.targets import expand

DEFAULT_RATE = 1_000_000  # bytes a second per gateway: a 5 MB bundle in 5 s, events keep their share
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 128 * 1024 - 64  # agent/fleet/bundles/transfer.py: a message is at most 128 KiB
FINAL = ("applied", "rolled_back", "refused")
BURST = 0.25  # seconds of rate a gateway's stream may send at once


@dataclass
class Target:
    """One gateway's transfer as this tool sees it."""

    name: str
    state: str = "offline"  # until its status names this transfer
    ask: str | None = None
    offset: int = 0  # the next byte to send
    sending: bool = False
    tokens: float = 0.0
    sent: int = 0
    asks: int = 0
    started: float | None = None
    received: float | None = None
    final: dict[str, Any] | None = None
    last: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """The file to send and its offer."""

    path: Path
    size: int
    sha256: str
    transfer: str
    manifest: bytes
    health_window: float


def read_bundle(path: Path) -> Bundle:
    """The bundle's size, sha256 and signed manifest (not verified here: the gateways do).

    Raises:
        ToolError: not a readable bundle file.
    """
    from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError, parse_unverified
    from agent.fleet.bundles.tarball import ArchiveError, members

    try:
        with path.open("rb") as file:
            first = next(members(file), None)
            if first is None or first[0].path != MANIFEST_NAME:
                raise ToolError(f"{path}: not a bundle (its first member is not {MANIFEST_NAME})", EXIT_USAGE)
            manifest = first[1].read()
            window = parse_unverified(manifest).health_window
            file.seek(0)
            digest = hashlib.file_digest(file, "sha256").hexdigest()
            size = file.tell()
    except (OSError, ArchiveError, BundleError) as exc:
        raise ToolError(f"{path}: {exc}", EXIT_USAGE) from exc
    return Bundle(path, size, digest, digest[:32], manifest, window)


class Pusher:
    """Offers, asks and chunks for a set of gateways over one connection (paho's thread and this one)."""

    def __init__(self, client: Any, args: argparse.Namespace, bundle: Bundle, gateways: list[str]) -> None:
        """``client``: connected, its loop running."""
        self.client = client
        self.root = args.root
        self.rate = float(args.rate)
        self.chunk = int(args.chunk)
        self.bundle = bundle
        self.targets = {gw: Target(gw) for gw in gateways}
        self._lock = threading.Lock()
        self._fd = os.open(bundle.path, os.O_RDONLY)
        offer = {
            "transfer": bundle.transfer, "size": bundle.size, "sha256": bundle.sha256, "chunk": self.chunk,
            "rate": self.rate, "manifest": base64.b64encode(bundle.manifest).decode("ascii"),
        }  # fmt: skip
        if args.allow_downgrade is not None:
            offer["allow"] = base64.b64encode(args.allow_downgrade.read_bytes()).decode("ascii")
        self.offer = json.dumps(offer).encode()
        client.on_message = self._on_message
        client.on_connect = self._on_connect

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if not reason.is_failure:
            self.start()  # again after a reconnect: a restarted broker may have lost the retained offers

    def start(self) -> None:
        """Subscribe to every status and publish every offer (retained)."""
        self.client.subscribe([(f"{self.root}/{gw}/bundle/status", 1) for gw in self.targets])
        for gw, target in self.targets.items():
            if target.final is None:
                self.client.publish(f"{self.root}/{gw}/bundle/offer", self.offer, qos=1, retain=True)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        gw = message.topic[len(self.root) + 1 :].split("/", 1)[0]
        target = self.targets.get(gw)
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if target is None or not isinstance(doc, dict) or doc.get("transfer") != self.bundle.transfer:
            return  # an idle gateway's status, or another transfer's
        now = time.monotonic()
        with self._lock:
            target.last = doc
            target.state = str(doc.get("state"))
            if target.state == "receiving":
                if doc.get("ask") != target.ask:  # it asks (again): from where it is
                    target.ask, target.offset, target.sending = doc.get("ask"), int(doc.get("offset", 0)), True
                    target.asks += 1
                    target.started = target.started or now
            else:
                target.sending = False
                if target.received is None and target.started is not None:
                    target.received = now
                if target.state in FINAL:
                    target.final = doc

    def done(self) -> bool:
        """Has every gateway a final outcome?"""
        with self._lock:
            return all(t.final is not None for t in self.targets.values())

    def pump(self, dt: float) -> None:
        """Send what each stream's rate allows for the last ``dt`` seconds."""
        with self._lock:
            streams = [t for t in self.targets.values() if t.sending]
            for target in streams:
                target.tokens = min(self.rate * BURST + self.chunk, target.tokens + self.rate * dt)
        for target in streams:
            while True:
                with self._lock:
                    if not target.sending or target.offset >= self.bundle.size or target.tokens < self.chunk:
                        break
                    offset = target.offset
                    data = os.pread(self._fd, min(self.chunk, self.bundle.size - offset), offset)
                    target.offset += len(data)
                    target.tokens -= len(data)
                    target.sent += len(data)
                from agent.fleet.bundles.transfer import chunk_message

                topic = f"{self.root}/{target.name}/bundle/chunk"
                self.client.publish(topic, chunk_message(self.bundle.transfer, offset, data), qos=1)

    def clear_offers(self) -> None:
        """Withdraw the retained offers (every gateway has its outcome)."""
        infos = [self.client.publish(f"{self.root}/{gw}/bundle/offer", b"", qos=1, retain=True) for gw in self.targets]
        for info in infos:
            info.wait_for_publish(5)

    def close(self) -> None:
        """Release the file."""
        os.close(self._fd)


def push_bundle(args: argparse.Namespace) -> int:
    """Send ``args.file`` to each gateway of ``args.to``; print how each ended."""
    try:
        gateways = expand(args.to)
        if not 1024 <= args.chunk <= MAX_CHUNK:
            raise ToolError(f"--chunk: 1024 to {MAX_CHUNK} bytes", EXIT_USAGE)
        if args.rate < 1024:
            raise ToolError("--rate: at least 1024 bytes a second", EXIT_USAGE)
        bundle = read_bundle(args.file)
        if args.allow_downgrade is not None and not args.allow_downgrade.is_file():
            raise ToolError(f"--allow-downgrade: {args.allow_downgrade}: no such file", EXIT_USAGE)
    except ValueError as exc:
        return fail("push-bundle", ToolError(f"--to: {exc}", EXIT_USAGE))
    except ToolError as exc:
        return fail("push-bundle", exc)
    wait = args.wait if args.wait is not None else max(300.0, 2 * bundle.size / args.rate + bundle.health_window + 60)
    try:
        client = connect(args, f"push-bundle-{secrets.token_hex(4)}")
    except ToolError as exc:
        return fail("push-bundle", exc)
    client.reconnect_delay_set(0.2, 2)
    pusher = Pusher(client, args, bundle, gateways)
    started = time.monotonic()
    try:
        deadline = started + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        pusher.start()
        last = time.monotonic()
        while not pusher.done() and time.monotonic() - started < wait:
            time.sleep(0.005)
            now = time.monotonic()
            pusher.pump(now - last)
            last = now
        if pusher.done() and not args.keep_offer:
            pusher.clear_offers()
    finally:
        pusher.close()
        close(client)
    return _print(args, pusher, time.monotonic() - started)


def _print(args: argparse.Namespace, pusher: Pusher, took: float) -> int:
    rows: list[dict[str, Any]] = []
    for target in pusher.targets.values():
        doc = target.final or target.last
        seconds = (target.received or 0) - (target.started or 0)
        rows.append({
            "gateway": target.name, "status": target.final.get("state") if target.final else "unfinished",
            "version": doc.get("version"), "reason": doc.get("reason"), "sent": target.sent, "asks": target.asks,
            "mb_per_s": round(pusher.bundle.size / seconds / 1e6, 3) if target.received and seconds > 0 else None,
            "last_state": target.state,
        })  # fmt: skip
    ok = all(r["status"] == "applied" for r in rows)
    if args.json:
        print(json.dumps({"transfer": pusher.bundle.transfer, "size": pusher.bundle.size, "seconds": round(took, 3),
                          "gateways": rows}))  # fmt: skip
    else:
        width = max(len(r["gateway"]) for r in rows)
        for r in rows:
            rate = f"{r['mb_per_s']} MB/s" if r["mb_per_s"] else "-"
            state = r["status"] if r["status"] != "unfinished" else f"unfinished ({r['last_state']})"
            reason = f"  {r['reason']}" if r["reason"] and r["status"] != "applied" else ""
            print(f"{r['gateway']:<{width}}  {state:<12} v{r['version'] or '-'}  {rate}  asks {r['asks']}{reason}")
        applied = sum(r["status"] == "applied" for r in rows)
        print(f"{applied}/{len(rows)} applied in {took:.1f} s", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def add_parser(sub: Any) -> None:
    """``push-bundle``'s options (registered by agent/tools/fleet/__init__.py)."""
    from agent.tools.fleet.common import add_broker_args

    p = sub.add_parser("push-bundle", help="send a signed bundle to gateways over MQTT, throttled, resumable")
    p.add_argument("file", type=Path, help="the bundle file (built and signed with `edge-agent bundle`)")
    p.add_argument("--to", required=True, help="gateways: gw-001..gw-020,gw-200")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="bytes a second per gateway (default 1000000)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help=f"bytes a message (default {DEFAULT_CHUNK})")
    p.add_argument("--wait", type=float, help="seconds to wait for every outcome (default: from size, rate, window)")
    p.add_argument("--allow-downgrade", type=Path, help="a signed directive (bundle allow-downgrade) for an older one")
    p.add_argument("--keep-offer", action="store_true", help="leave the retained offers when every gateway answered")
    add_broker_args(p)
    p.set_defaults(func=push_bundle)
