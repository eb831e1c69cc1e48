"""``edge-agent fleet keygen``: an Ed25519 signing key and the line site files list to trust it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agent.tools.fleet.common import EXIT_OK, EXIT_USAGE


def keygen(args: argparse.Namespace) -> int:
    """Write the private key (0600, never overwritten) and print the public line."""
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
