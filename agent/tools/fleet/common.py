"""What every ``edge-agent fleet`` command shares: exit codes, broker options, the connection."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ToolError(Exception):
    """A problem the command reports in one line and exits with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        """``code``: EXIT_USAGE for the operator's input, EXIT_FAILED for the broker or a gateway."""
        super().__init__(message)
        self.code = code


def add_broker_args(p: argparse.ArgumentParser) -> None:
    """Where the broker is and how to log in (the operator's certificate under config/mosquitto)."""
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--tls", action="store_true", help="TLS with the system CAs")
    p.add_argument("--ca-file", type=Path, help="TLS with this CA bundle")
    p.add_argument("--cert-file", type=Path, help="TLS client certificate (config/mosquitto: CN operator)")
    p.add_argument("--key-file", type=Path, help="its private key")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", type=Path, help="file holding the broker password")
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1", help="MQTT protocol version")
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

    if (args.cert_file is None) != (args.key_file is None):
        raise ToolError("--cert-file and --key-file go together", EXIT_USAGE)
    v5 = args.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    )
    if args.username:
        try:
            password = args.password_file.read_text().strip() if args.password_file else None
        except OSError as exc:
            raise ToolError(f"--password-file: {exc}", EXIT_USAGE) from exc
        client.username_pw_set(args.username, password)
    if args.ca_file or args.cert_file or args.tls:
        # A client certificate is how a broker with use_identity_as_username knows the operator
        # (its CN is the ACL's user name: config/mosquitto/README.md).
        try:
            client.tls_set(
                ca_certs=str(args.ca_file) if args.ca_file else None,
                certfile=str(args.cert_file) if args.cert_file else None,
                keyfile=str(args.key_file) if args.key_file else None,
            )
        except OSError as exc:  # ssl.SSLError too: a file missing, unreadable or not PEM
            raise ToolError(f"TLS files: {exc}", EXIT_USAGE) from exc
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
