"""``edge-agent fleet``: the operator's side of the control channel (docs/fleet.md).

One module per command. Exit status everywhere: 0 every gateway answered ok, 1 a gateway
refused, failed or did not answer, 2 usage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.tools.fleet.cmd import cmd
from agent.tools.fleet.common import add_broker_args, add_signing_args
from agent.tools.fleet.keygen import keygen
from agent.tools.fleet.status import COLLECT, status


def build_parser() -> argparse.ArgumentParser:
    """``edge-agent fleet`` and its commands."""
    parser = argparse.ArgumentParser(prog="edge-agent fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("keygen", help="make an Ed25519 signing key and print the line site files trust")
    p.add_argument("--out", type=Path, required=True, help="private key file to write (refuses to overwrite)")
    p.add_argument("--id", help="key id (default: derived from the public key)")
    p.add_argument("--scopes", nargs="+", default=["read"], help="scopes to print in the site-file line")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=keygen)
    p = sub.add_parser("cmd", help="sign and send one command; print the answer")
    p.add_argument("gateway", help="gateway id")
    p.add_argument("command", help="ping, status, read, write")
    p.add_argument("args", nargs="*", help="key=value arguments, e.g. device=meter-1 point=active_power")
    add_signing_args(p)
    add_broker_args(p)
    p.add_argument("--ttl", type=float, default=60.0, help="seconds the signed command stays valid")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd)
    p = sub.add_parser("status", help="a row per gateway from its retained status, inventory and reported config")
    p.add_argument("--to", help="gateways that must be there, e.g. gw-001..gw-100,gw-200 (default: all seen)")
    add_broker_args(p)
    p.add_argument("--wait", type=float, default=COLLECT, help="seconds to collect retained messages")
    p.set_defaults(func=status)
    return parser


def fleet_main(argv: list[str]) -> int:
    """``edge-agent fleet ...``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
