"""The broker options every city-side command takes (fleet, watch, ingest), and the login they give."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_connection_args(p: argparse.ArgumentParser, *, protocol: bool = True) -> None:
    """Where the broker is and how to log in (a client certificate: config/mosquitto/README.md)."""
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--tls", action="store_true", help="TLS with the system CAs")
    p.add_argument("--ca-file", type=Path, help="TLS with this CA bundle")
    p.add_argument("--cert-file", type=Path, help="TLS client certificate")
    p.add_argument("--key-file", type=Path, help="its private key")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", type=Path, help="file holding the broker password")
    if protocol:
        p.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1", help="MQTT protocol version")


def apply_login(client: Any, args: argparse.Namespace) -> None:
    """User name, password and TLS from the options onto a paho client.

    Raises:
        ValueError: naming the option whose file cannot be used.
    """
    if (args.cert_file is None) != (args.key_file is None):
        raise ValueError("--cert-file and --key-file go together")
    if args.username:
        try:
            password = args.password_file.read_text().strip() if args.password_file else None
        except OSError as exc:
            raise ValueError(f"--password-file: {exc}") from exc
        client.username_pw_set(args.username, password)
    if args.ca_file or args.cert_file or args.tls:
        try:
            client.tls_set(
                ca_certs=str(args.ca_file) if args.ca_file else None,
                certfile=str(args.cert_file) if args.cert_file else None,
                keyfile=str(args.key_file) if args.key_file else None,
            )
        except OSError as exc:  # ssl.SSLError too: a file missing, unreadable or not PEM
            raise ValueError(f"TLS files: {exc}") from exc
