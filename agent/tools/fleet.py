"""``edge-agent fleet``: the operator's side of the control channel (docs/fleet.md).

``keygen`` makes a signing key (kept by the operator, 0600) and prints the public line each
site file lists under ``fleet.keys``; ``cmd`` signs one command, sends it through the broker
and prints the gateway's answer. Exit status: 0 answered ok, 1 refused, failed or no answer,
2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _keygen(args: argparse.Namespace) -> int:
    from agent.fleet.keys import generate_key

    out: Path = args.out
    if out.exists():
        print(f"edge-agent fleet keygen: {out} exists; not overwriting a key", file=sys.stderr)
        return EXIT_USAGE
    pem, public, key_id = generate_key()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    line = {"id": args.id or key_id, "public_key": public, "scopes": args.scopes}
    if args.json:
        print(json.dumps({**line, "private_key_file": str(out)}))
    else:
        print(f"private key: {out} (keep it offline; mode 0600)")
        print("add to each site file that trusts it:\nfleet:\n  enabled: true\n  keys:")
        print(f"    - {{id: {line['id']}, public_key: '{public}', scopes: [{', '.join(args.scopes)}]}}")
    return EXIT_OK


def _value(text: str) -> Any:
    """``key=value`` arguments: JSON when it parses (numbers, true, null), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd(args: argparse.Namespace) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.fleet.envelope import COMMAND_TYPE, make_body, sign
    from agent.fleet.keys import key_id, load_private_key

    if (args.cert_file is None) != (args.key_file is None):
        print("edge-agent fleet cmd: --cert-file and --key-file go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        key = load_private_key(args.key)
        command_args = dict(arg.split("=", 1) for arg in args.args)
    except (OSError, ValueError) as exc:
        print(f"edge-agent fleet cmd: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.topic == f"{args.topic_prefix}/{args.gateway}/status":
            status_seen.append(message.payload.decode(errors="replace"))
            return
        try:
            answer.update(json.loads(message.payload))
        except ValueError:
            answer.update({"status": "failed", "error": "the reply is not JSON"})
        done.set()

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"edge-agent-fleet-{request_id}")
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    if args.username:
        password = args.password_file.read_text().strip() if args.password_file else None
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
            print(f"edge-agent fleet cmd: TLS files: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as exc:
        print(f"edge-agent fleet cmd: cannot reach the broker {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    client.loop_start()
    try:
        client.subscribe([(f"{base}/res/{request_id}/+", 1), (f"{args.topic_prefix}/{args.gateway}/status", 1)])
        subscribed.wait(args.timeout)
        started = time.monotonic()
        client.publish(f"{base}/req/{request_id}/{args.command}", envelope, qos=1)
        answered = done.wait(args.timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if not answered:
        state = f" (its status topic says {status_seen[-1]})" if status_seen else ""
        print(f"no answer from {args.gateway} within {args.timeout:g} s{state}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    """``edge-agent fleet`` and its commands."""
    parser = argparse.ArgumentParser(prog="edge-agent fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("keygen", help="make an Ed25519 signing key and print the line site files trust")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (refuses to overwrite)")
    p.add_argument("--id", help="key id (default: derived from the public key)")
    p.add_argument("--scopes", nargs="+", default=["read"], help="scopes to print in the site-file line")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_keygen)
    p = sub.add_parser("cmd", help="sign and send one command; print the answer")
    p.add_argument("gateway", help="gateway id")
    p.add_argument("command", help="ping, status, read, write")
    p.add_argument("args", nargs="*", help="key=value arguments, e.g. device=meter-1 point=active_power")
    p.add_argument("--key", type=Path, required=True, help="private key file (from keygen)")
    p.add_argument("--key-id", help="its id, as the site file lists it (default: the one keygen derived)")
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--tls", action="store_true", help="TLS with the system CAs")
    p.add_argument("--ca-file", type=Path, help="TLS with this CA bundle")
    p.add_argument("--cert-file", type=Path, help="TLS client certificate (config/mosquitto: CN operator)")
    p.add_argument("--key-file", type=Path, help="its private key")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", type=Path, help="file holding the broker password")
    p.add_argument("--root", default="fleet/v1", help="control topic root (the site's fleet.root)")
    p.add_argument("--topic-prefix", default="ioc/v1", help="event topic prefix (to read the status topic)")
    p.add_argument("--ttl", type=float, default=60.0, help="seconds the signed command stays valid")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.set_defaults(func=_cmd)
    return parser


def fleet_main(argv: list[str]) -> int:
    """``edge-agent fleet ...``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
