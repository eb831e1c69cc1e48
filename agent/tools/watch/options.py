"""``edge-agent watch`` options, checked into what the watcher runs with (argparse only: imported by the CLI)."""

from __future__ import annotations

import argparse
import re

from agent.tools.broker_args import add_connection_args

GATEWAY_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# A topic root: levels without wildcards, no leading or trailing slash (agent/contract/events.py).
PREFIX = re.compile(r"^[^#+/\s][^#+\s]*[^#+/\s]$|^[^#+/\s]$")
CLASSES = ("alarm", "event", "telemetry", "media")
GENERATED_SESSION_S = 300  # a generated client id's session: outlives a reconnect, not the watcher


class UsageError(Exception):
    """A bad option, named in the message (exit status 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The broker, what to watch, and the thresholds."""
    add_connection_args(p)
    p.add_argument("--gateway", help="watch this gateway only (default: every gateway under the prefix)")
    p.add_argument("--prefix", default="ioc/v1", help="event topic prefix (the site's uplink.mqtt.topic_prefix)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to watch after subscribing (0: until Ctrl-C)")
    p.add_argument(
        "--client-id",
        help="keep a persistent session under this id: a watcher restarted with it gets what it missed "
        "(default: a generated id, unsubscribed at the end)",
    )
    p.add_argument(
        "--session-expiry", type=int, default=86_400, help="MQTT 5: seconds the broker keeps a --client-id session"
    )
    p.add_argument(
        "--max-late",
        type=float,
        default=60.0,
        help="seconds from an event's time to its receipt before it counts as late",
    )
    p.add_argument("--strict-late", action="store_true", help="a late event is a violation (default: counted only)")
    p.add_argument(
        "--max-skew",
        type=float,
        default=86_400.0,
        help="seconds an event's time may be from the receive time (clock check)",
    )
    p.add_argument("--every", type=float, default=5.0, help="seconds between live summary lines on stderr (0: none)")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="TYPE=CLASS",
        help="a type's delivery class where the site's priorities change it, e.g. city.device.status=event",
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")


def check(args: argparse.Namespace) -> None:
    """Refuse what cannot work, naming the option; raises :class:`UsageError`."""
    if args.gateway is not None and not GATEWAY_ID.match(args.gateway):
        raise UsageError(f"--gateway {args.gateway!r}: a gateway id is [a-z0-9][a-z0-9-]* (no wildcards)")
    if not PREFIX.match(args.prefix):
        raise UsageError(f"--prefix {args.prefix!r}: topic levels without wildcards or a leading/trailing slash")
    for name in ("duration", "max_late", "max_skew", "every"):
        value = getattr(args, name)
        if not value >= 0:  # NaN too
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
    if args.session_expiry < 0:
        raise UsageError(f"--session-expiry {args.session_expiry}: must be 0 or more")
    if (args.cert_file is None) != (args.key_file is None):
        raise UsageError("--cert-file and --key-file go together")
    if args.client_id is not None and not 0 < len(args.client_id.encode()) <= 65535:
        raise UsageError("--client-id: 1 to 65535 bytes")


def classes(values: list[str]) -> dict[str, str]:
    """``--class TYPE=CLASS`` values as {type: class}; raises :class:`UsageError`."""
    out: dict[str, str] = {}
    for value in values:
        event_type, _, klass = value.partition("=")
        if not event_type or klass not in CLASSES:
            raise UsageError(f"--class {value!r}: TYPE=CLASS with CLASS one of {', '.join(CLASSES)}")
        out[event_type] = klass
    return out


def topic(args: argparse.Namespace) -> str:
    """The subscription: one gateway's subtree or every gateway's."""
    return f"{args.prefix}/{args.gateway or '+'}/#"
