"""``edge-agent fleet ca init|client``: a lab's CA, claim and client certificates (production roots stay offline)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from agent.tools.fleet.common import EXIT_OK, EXIT_USAGE


def add_parser(sub: Any) -> None:
    """``ca init`` and ``ca client``."""
    p = sub.add_parser("ca", help="lab certificates: a CA, claim and client certificates (EC P-256)")
    ca_sub = p.add_subparsers(dest="ca_action", required=True)
    q = ca_sub.add_parser("init", help="a self-signed CA: ca.pem and ca.key (0600) in --dir")
    q.add_argument("--dir", type=Path, required=True, help="folder to write into (refuses to overwrite)")
    q.add_argument("--name", default="edge-agent lab CA", help="the CA's CN")
    q.add_argument("--days", type=int, default=3650, help="lifetime")
    q.set_defaults(func=ca_init)
    q = ca_sub.add_parser("client", help="a client certificate: NAME.crt and NAME.key (0600) signed by the CA")
    q.add_argument("--dir", type=Path, required=True, help="the CA's folder (ca.pem, ca.key); output goes there")
    q.add_argument("--name", required=True, help="CN: a claim identity (e.g. claim-batch7), provisioner, operator")
    q.add_argument("--days", type=int, default=730, help="lifetime")
    q.set_defaults(func=ca_client)


def ca_init(args: argparse.Namespace) -> int:
    """Write ca.pem and ca.key."""
    from agent.fleet.provisioning.ca import key_pem, make_ca, pem

    cert_path, key_path = args.dir / "ca.pem", args.dir / "ca.key"
    if cert_path.exists() or key_path.exists():
        print(f"edge-agent fleet ca init: {args.dir} already holds a CA: refusing to overwrite", file=sys.stderr)
        return EXIT_USAGE
    cert, key = make_ca(args.name, args.days)
    args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(key_path, key_pem(key), 0o600)
    _write(cert_path, pem(cert), 0o644)
    print(f"wrote {cert_path} and {key_path}")
    return EXIT_OK


def ca_client(args: argparse.Namespace) -> int:
    """Write NAME.crt and NAME.key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.fleet.provisioning.ca import BACKDATE, Issuer, client_certificate, key_pem, pem

    crt, key_path = args.dir / f"{args.name}.crt", args.dir / f"{args.name}.key"
    if crt.exists() or key_path.exists():
        print(f"edge-agent fleet ca client: {crt} exists: refusing to overwrite", file=sys.stderr)
        return EXIT_USAGE
    try:
        issuer = Issuer.load(args.dir / "ca.pem", args.dir / "ca.key")
    except ValueError as exc:
        print(f"edge-agent fleet ca client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = client_certificate(
        issuer.cert, issuer.key, key.public_key(), args.name, now - BACKDATE, now + dt.timedelta(days=args.days)
    )
    _write(key_path, key_pem(key), 0o600)
    _write(crt, pem(cert) + issuer.chain_pem, 0o644)
    print(f"wrote {crt} and {key_path}")
    return EXIT_OK


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
