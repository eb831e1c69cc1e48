"""``edge-agent fleet status``: one row per gateway, from what the broker keeps retained.

No gateway is asked anything: each one's retained availability (``{prefix}/{gw}/status``),
inventory (``{prefix}/{gw}/inventory``) and reported configuration (``{root}/{gw}/reported``)
say how it is, even while it is offline. Every payload is read as untrusted input: a
malformed one makes its row say so, never the command fail.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from agent.tools.fleet.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ToolError, close, connect, fail
from agent.tools.fleet.targets import expand

COLLECT = 1.5  # seconds to collect retained messages unless every --to gateway was seen sooner
NOT_APPLIED = ("applying", "rejected", "rolled_back")


class Retained:
    """The newest retained document of each kind, per gateway (filled on paho's thread)."""

    def __init__(self, root: str, prefix: str) -> None:
        """``root``: the fleet topic root; ``prefix``: the events' topic prefix."""
        self._root = root.split("/")
        self._prefix = prefix.split("/")
        self._lock = threading.Lock()
        self.docs: dict[str, dict[str, bytes]] = {}

    def subscriptions(self) -> list[tuple[str, int]]:
        """Reported first: a broker sends the retained messages of a SUBSCRIBE filter by filter
        (Mosquitto does), so once a gateway's status is in, its reported document is too."""
        root, prefix = "/".join(self._root), "/".join(self._prefix)
        return [(f"{root}/+/reported", 1), (f"{prefix}/+/inventory", 1), (f"{prefix}/+/status", 1)]

    def on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        """paho's callback: keep the payload under (gateway, kind)."""
        levels = message.topic.split("/")
        for base, kinds in ((self._root, ("reported",)), (self._prefix, ("inventory", "status"))):
            if len(levels) == len(base) + 2 and levels[: len(base)] == base and levels[-1] in kinds:
                with self._lock:
                    self.docs.setdefault(levels[-2], {})[levels[-1]] = bytes(message.payload)
                return

    def complete(self, gateways: list[str]) -> bool:
        """Every one of ``gateways`` has its availability and inventory in."""
        with self._lock:
            return all({"status", "inventory"} <= set(self.docs.get(g, {})) for g in gateways)

    def snapshot(self) -> dict[str, dict[str, bytes]]:
        """A copy, safe to read while paho goes on."""
        with self._lock:
            return {g: dict(kinds) for g, kinds in self.docs.items()}


def _json(payload: bytes | None) -> dict[str, Any] | None:
    if not payload:
        return None
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def row(gateway: str, docs: dict[str, bytes], now: datetime) -> dict[str, Any]:
    """One gateway's row: availability, agent, configuration, clock, buffer, certificate; and its problems."""
    problems: list[str] = []
    if not docs:
        problems.append("nothing retained: never connected with the fleet channel on, or another broker or root")
    availability = docs.get("status", b"").decode(errors="replace").strip() or "unknown"
    if docs and availability != "online":
        problems.append(f"availability {availability}")
    inventory = _get(_json(docs.get("inventory")), "data")
    reported = _json(docs.get("reported"))
    if "inventory" in docs and not isinstance(inventory, dict):
        problems.append("inventory unreadable")
    if "reported" in docs and reported is None:
        problems.append("reported document unreadable")
    out: dict[str, Any] = {
        "gateway": gateway,
        "availability": availability,
        "agent_version": _get(inventory, "agent_version"),
        "config_version": _get(reported, "running", "version") if reported else _get(inventory, "config", "version"),
        "config_status": _config_status(reported, inventory),
        "config_reason": None,
        "clock_synced": _get(inventory, "clock", "synced"),
        "clock_source": _get(inventory, "clock", "source"),
        "buffer_rows": _get(inventory, "buffer", "rows"),
        "buffer_oldest_age_s": _get(inventory, "buffer", "oldest_age_s"),
        "cert_not_after": _get(inventory, "certificate", "not_after"),
        "cert_days_left": _get(inventory, "certificate", "days_left"),
        "inventory_time": _get(_json(docs.get("inventory")), "time"),
    }
    if reported:
        errors = reported.get("errors")
        first = errors[0] if isinstance(errors, list) and errors else None
        out["config_reason"] = reported.get("reason") or _get(first, "message") or _get(first, "code")
        out["config_reported_version"] = reported.get("version")
        if out["config_status"] in NOT_APPLIED:
            problems.append(f"config version {reported.get('version')} {out['config_status']}")
    days = out["cert_days_left"]
    if isinstance(days, int) and isinstance(out["cert_not_after"], str):
        # The inventory may be hours old: count the days from now, not from when it was built.
        try:
            not_after = datetime.fromisoformat(out["cert_not_after"].replace("Z", "+00:00"))
            out["cert_days_left"] = (not_after - now).days
        except ValueError:
            pass
    out["problems"] = problems
    out["ok"] = not problems
    return out


def _cell(r: dict[str, Any]) -> list[str]:
    running, reported, state = r["config_version"], r.get("config_reported_version"), r["config_status"]
    if reported is not None:  # the report is about that version; another may run meanwhile
        config = f"v{reported} {state}" + (f" (runs v{running})" if running != reported else "")
    else:
        config = "-" if running is None and state is None else f"v{running} {state or '?'}"
    flag = r["clock_synced"]
    synced = "synced" if flag is True else "UNSYNCED" if flag is False else "unknown" if flag is None else "?"
    clock = "-" if r["clock_source"] is None else f"{synced} ({r['clock_source']})"
    rows, age = r["buffer_rows"], r["buffer_oldest_age_s"]
    buffer = "-" if rows is None else f"{rows}" + (f", oldest {age:g} s" if isinstance(age, int | float) else "")
    cert = "-" if r["cert_days_left"] is None else f"{r['cert_days_left']} d ({str(r['cert_not_after'])[:10]})"
    return [r["gateway"], r["availability"], str(r["agent_version"] or "-"), config, clock, buffer, cert]


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [["GATEWAY", "STATE", "AGENT", "CONFIG", "CLOCK", "BUFFER", "CERT"], *map(_cell, rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    for r in rows:
        lines += [f"{r['gateway']}: {p}" for p in r["problems"]]
        if r["config_reason"]:
            lines.append(f"{r['gateway']}: config: {r['config_reason']}")
    return "\n".join(lines)


def status(args: argparse.Namespace) -> int:
    """Collect the retained documents, print a row per gateway; exit 1 if any is not well."""
    try:
        wanted = expand(args.to) if args.to else None
    except ValueError as exc:
        return fail("status", ToolError(f"--to: {exc}", EXIT_USAGE))
    retained = Retained(args.root, args.topic_prefix)
    subscribed = threading.Event()
    try:
        client = connect(args, f"edge-agent-fleet-status-{secrets.token_hex(4)}")
    except ToolError as exc:
        return fail("status", exc)
    client.on_message = retained.on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    try:
        client.subscribe(retained.subscriptions())
        subscribed.wait(max(args.wait, 1.0))
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and not (wanted and retained.complete(wanted)):
            time.sleep(0.05)
    finally:
        close(client)
    docs = retained.snapshot()
    now = datetime.now(UTC)
    rows = [row(g, docs.get(g, {}), now) for g in (wanted if wanted is not None else sorted(docs))]
    if args.json:
        print(json.dumps(rows))
    elif rows:
        print(_table(rows))
    if not rows:
        print(f"no gateway has anything retained under {args.root}/ or {args.topic_prefix}/", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if all(r["ok"] for r in rows) else EXIT_FAILED


def _config_status(reported: Any, inventory: Any) -> str | None:
    """The reported status; ``local`` when no remote version was ever applied (version 0)."""
    if not reported:
        return "local" if inventory else None
    status = _get(reported, "status")
    if status == "applied" and _get(reported, "version") == 0:
        return "local"
    return status if isinstance(status, str) else None
