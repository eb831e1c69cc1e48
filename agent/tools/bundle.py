"""``edge-agent bundle``: build, sign, inspect and apply update bundles (docs/fleet.md, "Update bundles").

Exit status: 0 done (``inspect``: verified, no problem); 1 refused, a problem found, or rolled back;
2 usage (a bad option, a folder that does not build).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """``edge-agent bundle`` and its commands."""
    parser = argparse.ArgumentParser(prog="edge-agent bundle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("build", help="a bundle file from a folder (config.yaml, profiles/, models/), checked")
    p.add_argument("folder", type=Path, help="folder holding config.yaml, profiles/*.yaml, models/*")
    p.add_argument("--version", type=int, required=True, help="bundle version (an integer >= 1; a higher one wins)")
    p.add_argument("--target", action="append", required=True, help="gateway id or group:<name> (repeat, or a,b)")
    p.add_argument("--out", type=Path, required=True, help="bundle file to write")
    p.add_argument("--sections", help="config sections to take (default: as `fleet sign`)")
    p.add_argument("--min-agent-version", help="oldest agent that may apply it (default: this one)")
    p.add_argument("--ttl", default="30d", help="how long it may be applied: 3600, 12h, 30d (at most 30 days)")
    p.add_argument("--health-window", type=float, help="seconds the agent watches it before the commit (default 120)")
    p.add_argument("--key", type=Path, help="sign it now with this key (else: bundle sign later)")
    p.add_argument("--key-id", help="the key's id (default: derived from it)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_build)
    p = sub.add_parser("sign", help="sign a built bundle (offline), in place or into --out")
    p.add_argument("file", type=Path)
    p.add_argument("--key", type=Path, required=True, help="private key file (from fleet keygen), scope bundle")
    p.add_argument("--key-id", help="the key's id (default: derived from it)")
    p.add_argument("--out", type=Path, help="write here instead of replacing FILE")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_sign)
    p = sub.add_parser("inspect", help="what a bundle holds, whether it verifies, every problem named")
    p.add_argument("file", type=Path)
    _trust_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("apply", help="verify, show what changes, hand it to the running agent (or install offline)")
    p.add_argument("file", type=Path)
    p.add_argument("-c", "--config", type=Path, required=True, help="the gateway's site file (its id, groups, keys)")
    p.add_argument("--state-dir", type=Path, help="state directory (default: the buffer's folder)")
    p.add_argument("--dry-run", action="store_true", help="verify and show what would change; change nothing")
    p.add_argument("--reserve", type=int, help="bytes to leave free for the buffer (default: 5%% of the disk)")
    p.add_argument("--wait", type=float, default=3900.0, help="seconds to wait for a running agent's outcome")
    p.add_argument("--allow-downgrade", type=Path, help="a signed directive (allow-downgrade) for an older version")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_apply)
    p = sub.add_parser("allow-downgrade", help="sign a directive letting gateways take one older version (once)")
    p.add_argument("--version", type=int, required=True, help="the older bundle version it allows")
    p.add_argument("--target", required=True, help="gateway id or group:<name>")
    p.add_argument("--key", type=Path, required=True, help="private key file, scope bundle")
    p.add_argument("--key-id", help="the key's id (default: derived from it)")
    p.add_argument("--ttl", default="7d", help="how long it may be used: 3600, 12h, 7d (at most 30 days)")
    p.add_argument("--out", type=Path, required=True, help="file to write (signed, not secret)")
    p.set_defaults(func=_allow_downgrade)
    return parser


def _allow_downgrade(args: argparse.Namespace) -> int:
    from agent.fleet.bundles.downgrade import make
    from agent.tools.fleet.documents import parse_ttl

    try:
        key, key_id = _signing_key(args.key, args.key_id)
        data = make(args.version, target=_targets([args.target])[0], ttl=parse_ttl(args.ttl), key=key, key_id=key_id)
        with open(os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
            out.write(data)
    except (ValueError, OSError) as exc:
        return _usage("allow-downgrade", str(exc))
    print(f"{args.out}: version {args.version} allowed on {args.target} (once), signed by {key_id}")
    return EXIT_OK


def bundle_main(argv: list[str]) -> int:
    """Entry point of ``edge-agent bundle``."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="judge as this gateway would: its keys, id and groups")
    p.add_argument("--public-key", action="append", default=[], help="trust this key (ed25519:...) for bundles")


def _usage(command: str, message: str) -> int:
    print(f"edge-agent bundle {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _signing_key(path: Path, key_id: str | None) -> tuple[Any, str]:
    from agent.fleet.keys import key_id as derive
    from agent.fleet.keys import load_private_key

    key = load_private_key(path)
    return key, key_id or derive(key.public_key())


def _targets(values: list[str]) -> list[str]:
    from agent.tools.fleet.documents import check_target

    return [check_target(t.strip()) for value in values for t in value.split(",") if t.strip()]


def _build(args: argparse.Namespace) -> int:
    import agent
    from agent.tools.bundle_build import BuildError, collect, envelope, manifest_body, write_bundle
    from agent.tools.fleet.documents import parse_sections, parse_ttl

    try:
        targets = _targets(args.target)
        ttl = parse_ttl(args.ttl)
        key, key_id = _signing_key(args.key, args.key_id) if args.key else (None, "")
        items = collect(args.folder, parse_sections(args.sections))
        body, entries = manifest_body(
            items,
            version=args.version,
            targets=targets,
            min_agent_version=args.min_agent_version or agent.__version__,
            health_window=args.health_window,
            ttl=ttl,
        )
        size = write_bundle(args.out, envelope(body, key, key_id), items, force=args.force)
    except BuildError as exc:
        print(f"edge-agent bundle build: {args.folder} does not make a bundle; nothing written:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:
        return _usage("build", str(exc))
    summary = {
        "out": str(args.out),
        "size": size,
        "version": args.version,
        "targets": targets,
        "signed": key is not None,
        "expires_at": body["expires_at"],
        "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        state = f"signed by {key_id}" if key is not None else "UNSIGNED (run edge-agent bundle sign)"
        print(f"bundle version {args.version} for {', '.join(targets)}: {len(entries)} file(s), {size} bytes,")
        print(f"  {state}, expires {body['expires_at']}; {args.out}")
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    from agent.tools.bundle_build import sign_file

    try:
        key, key_id = _signing_key(args.key, args.key_id)
        body = sign_file(args.file, args.out or args.file, key, key_id, force=args.force)
    except (ValueError, OSError) as exc:
        return _usage("sign", str(exc))
    print(f"signed bundle version {body.get('version')} by {key_id}: {args.out or args.file}")
    return EXIT_OK


def _checker(args: argparse.Namespace) -> tuple[Callable[[bytes], Any] | None, str]:
    """The manifest check ``inspect`` and ``apply`` use, and who it judges for."""
    from agent.fleet.bundles.manifest import verify_manifest
    from agent.fleet.envelope import TrustedKey

    keys: dict[str, TrustedKey] = {}
    gateway: str | None = None
    groups: frozenset[str] = frozenset()
    if args.config is not None:
        from agent.config.model import load_config

        config = load_config(args.config)
        keys = {k.id: TrustedKey.from_text(k.id, k.public_key, k.scopes) for k in config.fleet.keys}
        gateway, groups = config.gateway.id, frozenset(config.fleet.groups)
    from agent.fleet.keys import key_id, parse_public_text

    for text in args.public_key:
        kid = key_id(parse_public_text(text))
        keys[kid] = TrustedKey.from_text(kid, text, ["bundle"])
    if not keys:
        return None, "no trusted key given (-c site.yaml or --public-key): the signature is not checked"
    who = f"as gateway {gateway}" if gateway else "for any gateway (targets not judged)"

    def check(envelope: bytes) -> Any:
        return verify_manifest(envelope, keys=keys, gateway=gateway, groups=groups)

    return check, who


def _inspect(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from agent.fleet.bundles.manifest import parse_unverified
    from agent.fleet.bundles.reader import scan

    try:
        check, who = _checker(args)
    except (ConfigError, ValueError) as exc:
        return _usage("inspect", str(exc))
    result = scan(args.file, check_envelope=check or parse_unverified, strict=False)
    if check is None:
        result.verified = False
    manifest = result.manifest
    problems = [message for _, message in result.problems]
    if check is None:
        problems.insert(0, "signature not checked: " + who.split(": ")[0])
    report = {
        "file": str(args.file),
        "verified": result.verified and not result.problems,
        "signature": "verified" if result.verified else "not verified",
        "judged": who,
        "version": manifest.version if manifest else None,
        "targets": list(manifest.targets) if manifest else None,
        "min_agent_version": manifest.min_agent_version if manifest else None,
        "expires_at": manifest.expires_at if manifest else None,
        "signed_by": manifest.signed_by if manifest else None,
        "files": [
            {"path": e.path, "size": e.size, "sha256": e.sha256, "ok": e.path in result.checked}
            for e in (manifest.files if manifest else ())
        ],
        "problems": problems,
        "codes": [code for code, _ in result.problems],
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print_inspect(report)
    return EXIT_OK if report["verified"] else EXIT_FAILED


def _print_inspect(report: dict[str, Any]) -> None:
    if report["version"] is None:
        print(f"{report['file']}: not a readable bundle")
    else:
        print(
            f"{report['file']}: bundle version {report['version']} for {', '.join(report['targets'])},"
            f" agent >= {report['min_agent_version']}, expires {report['expires_at']}"
        )
        print(f"signature: {report['signature']}" + (f" (key {report['signed_by']})" if report["signed_by"] else ""))
        for entry in report["files"]:
            mark = "ok " if entry["ok"] else "BAD"
            print(f"  {mark} {entry['path']:40s} {entry['size']:>12d}  sha256:{entry['sha256'][:16]}...")
    for problem in report["problems"]:
        print(f"problem: {problem}")
    print("verified" if report["verified"] else f"NOT verified: {len(report['problems'])} problem(s)")


def _apply(args: argparse.Namespace) -> int:
    from agent.tools.bundle_apply import apply_bundle

    return apply_bundle(args)
