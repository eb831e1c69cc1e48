"""``edge-agent fleet``: the operator's side of the control channel (docs/fleet.md).

One module per command. Exit status everywhere: 0 every gateway answered ok, 1 a gateway
refused, failed or did not answer, 2 usage.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.tools.fleet import ca, provision_responder
from agent.tools.fleet.cmd import cmd
from agent.tools.fleet.common import add_broker_args, add_signing_args
from agent.tools.fleet.diagnostics import diagnostics
from agent.tools.fleet.keygen import keygen
from agent.tools.fleet.push import push_config
from agent.tools.fleet.push_bundle import add_parser as push_bundle_parser
from agent.tools.fleet.sign import sign_config
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
    p.add_argument("command", help="ping, status, read, write, restart, doctor")
    p.add_argument("args", nargs="*", help="key=value arguments, e.g. device=meter-1 point=active_power")
    add_signing_args(p)
    add_broker_args(p)
    p.add_argument("--ttl", type=float, default=60.0, help="seconds the signed command stays valid")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd)
    p = sub.add_parser("diagnostics", help="fetch a gateway's redacted diagnostics bundle (.tar.gz), sha256 checked")
    p.add_argument("gateway", help="gateway id")
    p.add_argument("--out", type=Path, required=True, help="the .tar.gz to write (refuses to overwrite)")
    add_signing_args(p)
    add_broker_args(p)
    p.add_argument("--ttl", type=float, default=60.0, help="seconds each signed request stays valid")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each part")
    p.add_argument("--build-timeout", type=float, default=30.0, help="seconds to wait for the bundle to be built")
    p.add_argument(
        "--requests-per-minute",
        type=int,
        default=100,
        help="at most this many requests a minute "
        "(keep it under the gateway's fleet.requests_per_minute, 120 by default)",
    )
    p.set_defaults(func=diagnostics)
    _config_commands(sub)
    push_bundle_parser(sub)
    p = sub.add_parser("status", help="a row per gateway from its retained status, inventory and reported config")
    p.add_argument("--to", help="gateways that must be there, e.g. gw-001..gw-100,gw-200 (default: all seen)")
    add_broker_args(p)
    p.add_argument("--wait", type=float, default=COLLECT, help="seconds to collect retained messages")
    p.set_defaults(func=status)
    provision_responder.add_parser(sub, add_broker_args)
    ca.add_parser(sub)
    return parser


def _config_commands(sub: Any) -> None:
    """``sign`` and ``push-config``: desired configuration documents (docs/fleet.md)."""
    p = sub.add_parser("sign", help="sign sections of a site file as a config document, offline, into a file")
    p.add_argument("site", type=Path, help="site file (validated in full first)")
    add_signing_args(p)
    p.add_argument("--version", type=int, required=True, help="config version, an integer >= 1; higher wins")
    p.add_argument("--target", required=True, help="gateway id or group:<name>")
    _document_args(p)
    p.add_argument("--ttl", default="7d", help="how long the document stays valid: 3600, 90s, 30m, 12h, 7d (<= 30d)")
    p.add_argument("--health-window", type=int, default=120, help="seconds after apply to prove health (10-3600)")
    p.add_argument("--out", type=Path, required=True, help="file to write (0644: signed, not secret)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=sign_config)
    p = sub.add_parser("push-config", help="publish a config to gateways and wait until each applied it")
    p.add_argument("document", type=Path, help="a site file (signed per gateway) or a .json `sign` wrote")
    p.add_argument("--to", required=True, help="gateways: gw-001..gw-100,gw-200")
    p.add_argument("--key", type=Path, help="private key file (a site file only)")
    p.add_argument("--key-id", help="its id, as site files list it (default: the one keygen derived)")
    p.add_argument("--version", type=int, help="config version (default: the current UNIX time in seconds)")
    _document_args(p)
    p.add_argument("--ttl", help="how long the documents stay valid (default 7d)")
    p.add_argument("--health-window", type=int, help="seconds after apply to prove health (default 120)")
    p.add_argument("--wait", type=float, help="seconds to wait for the answers (default: health window + 30, >= 120)")
    add_broker_args(p)
    p.set_defaults(func=push_config)


def _document_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", help="comma-separated top-level sections (default: all but uplink and fleet)")
    p.add_argument("--require-new-devices", action="store_true", help="devices new in this version must come online")


def fleet_main(argv: list[str]) -> int:
    """``edge-agent fleet ...``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
