"""What every ``edge-agent fleet`` command shares: exit codes, broker options, the connection."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.tools.broker_args import add_connection_args, apply_login

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ToolError(Exception):
    """A problem the command reports in one line and exits with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        """``code``: EXIT_USAGE for the operator's input, EXIT_FAILED for the broker or a gateway."""
        super().__init__(message)
        self.code = code


def add_broker_args(p: argparse.ArgumentParser) -> None:
    """Where the broker is and how to log in (the operator's certificate under config/mosquitto)."""
    add_connection_args(p)
    p.add_argument("--root", default="fleet/v1", help="control topic root (the site's fleet.root)")
    p.add_argument("--topic-prefix", default="ioc/v1", help="event topic prefix (to read the status topic)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_signing_args(p: argparse.ArgumentParser) -> None:
    """The operator's signing key, as ``keygen`` made it."""
    p.add_argument("--key", type=Path, required=True, help="private key file (from keygen)")
    p.add_argument("--key-id", help="its id, as the site file lists it (default: the one keygen derived)")


def connect(args: argparse.Namespace, client_id: str) -> Any:
    """A connected paho client with its network loop running; raises :class:`ToolError`."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    v5 = args.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    )
    try:
        apply_login(client, args)
    except ValueError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from exc
    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as exc:
        raise ToolError(f"cannot reach the broker {args.host}:{args.port}: {exc}", EXIT_FAILED) from exc
    client.loop_start()
    return client


def close(client: Any) -> None:
    """Disconnect and stop the network loop."""
    client.disconnect()
    client.loop_stop()


def fail(tool: str, exc: ToolError) -> int:
    """Print a :class:`ToolError` the way every fleet command does."""
    print(f"edge-agent fleet {tool}: {exc}", file=sys.stderr)
    return exc.code
