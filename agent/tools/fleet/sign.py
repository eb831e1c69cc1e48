"""``edge-agent fleet sign``: sections of a site file as a signed config document, offline, into a file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.tools.fleet.common import EXIT_OK, EXIT_USAGE, ToolError, fail
from agent.tools.fleet.documents import (
    build,
    check_health_window,
    check_target,
    check_version,
    config_hash,
    parse_sections,
    parse_ttl,
    site_sections,
)

FLEET_NOTE = (
    "note: a fleet section is applied only if signed by a key with scope `keys` as well as `config`"
    " (this key must hold both)"
)


def sign_config(args: argparse.Namespace) -> int:
    """Validate ``args.site``, sign the chosen sections for ``args.target``, write ``args.out`` (0644)."""
    from agent.errors import ConfigError
    from agent.fleet.keys import key_id, load_private_key

    try:
        ttl = parse_ttl(args.ttl)
        names = parse_sections(args.sections)
        target = check_target(args.target)
        check_version(args.version)
        check_health_window(args.health_window)
        if args.out.exists() and not args.force:
            raise ValueError(f"{args.out} exists; not overwriting it (--force to replace it)")
        key = load_private_key(args.key)
        sections = site_sections(args.site, names)
        data = build(
            sections,
            key=key,
            key_id=args.key_id or key_id(key.public_key()),
            version=args.version,
            target=target,
            ttl=ttl,
            health_window=args.health_window,
            require_new_devices=args.require_new_devices,
        )
        _write(args.out, data, force=args.force)
    except ConfigError as exc:
        print(f"edge-agent fleet sign: {args.site} is not a valid site file; nothing signed:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:
        return fail("sign", ToolError(str(exc), EXIT_USAGE))
    body = _body(data)
    summary = {
        "out": str(args.out),
        "version": args.version,
        "target": target,
        "hash": config_hash(sections),
        "sections": list(sections),
        "expires_at": body["expires_at"],
    }
    if "fleet" in sections:
        print(FLEET_NOTE, file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"signed version {args.version} for {target}: {', '.join(sections)} ({summary['hash']}),"
            f" expires {summary['expires_at']}; {args.out} ({len(data)} bytes)"
        )
    return EXIT_OK


def _body(envelope: bytes) -> dict[str, Any]:
    import base64

    body: dict[str, Any] = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    return body


def _write(out: Path, data: bytes, *, force: bool) -> None:
    """``out`` mode 0644 (a signed document is public, not secret); replaced only with ``force``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(f".{out.name}.{os.getpid()}.tmp") if force else out
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)  # whatever the umask
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if force:
        os.replace(path, out)  # never a half-written file under the name
