"""``edge-agent bundle apply``: verify, show what changes, then hand the bundle to the running agent.

With an agent running on this state directory (agent/fleet/bundles/inbox.py), the agent applies it:
stage, switch, reload, health window, commit or roll back; this prints each step and the outcome.
With none, it installs offline: stage, switch, the installed files proved against the signed
manifest, commit (a failed check rolls back at once); the agent takes it up at its next start.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.fleet.bundles.inbox import agent_running, hand_over
from agent.fleet.bundles.manifest import BundleError, Manifest, verify_manifest
from agent.fleet.bundles.store import BundleStore, bundles_dir

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def changes(old: Manifest | None, new: Manifest) -> list[tuple[str, str]]:
    """(what, path) for each file added, changed or removed from ``old`` to ``new``."""
    before = {e.path: e.sha256 for e in old.files} if old else {}
    after = {e.path: e.sha256 for e in new.files}
    rows = [("added" if p not in before else "changed", p) for p, h in after.items() if before.get(p) != h]
    rows += [("removed", p) for p in before if p not in after]
    rows += [("same", p) for p, h in after.items() if before.get(p) == h]
    return rows


def apply_bundle(args: argparse.Namespace) -> int:
    """Run ``bundle apply`` as ``args`` says; prints the outcome, returns the exit status."""
    from agent.config.model import load_config
    from agent.errors import ConfigError
    from agent.fleet.envelope import TrustedKey

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"edge-agent bundle apply: {args.config} is not a valid site file:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    keys = {k.id: TrustedKey.from_text(k.id, k.public_key, k.scopes) for k in config.fleet.keys}
    if not any("bundle" in k.scopes for k in keys.values()):
        print(f"edge-agent bundle apply: {args.config}: fleet.keys has no key with scope bundle", file=sys.stderr)
        return EXIT_USAGE
    gateway, groups = config.gateway.id, frozenset(config.fleet.groups)

    def check(envelope: bytes) -> Manifest:
        return verify_manifest(envelope, keys=keys, gateway=gateway, groups=groups)

    store = BundleStore(bundles_dir(args.state_dir or config.buffer.path.parent))
    out: dict[str, Any] = {"file": str(args.file), "gateway": gateway}
    if not args.dry_run and agent_running(store.root) is not None:
        return _to_agent(args, store, check, out)
    try:
        out["recovered"] = store.recover()
        running = store.current()
        old = store.installed_manifest(running[0]) if running else None
        out["running"] = running[0] if running else None
        if args.dry_run:
            return _dry_run(args, store, check, old, out)
        staged = store.stage(args.file, check, reserve_bytes=args.reserve)
        out["version"] = staged.manifest.version
        out["changes"] = changes(old, staged.manifest)
        store.switch(staged)
        problems = store.check_installed(staged.manifest.version)
        if problems:
            store.rollback("installed files do not match the manifest: " + "; ".join(problems))
            return _done(args, out, "rolled_back", problems)
        store.commit()
    except BundleError as exc:
        return _done(args, out, "refused", exc.problems, code=exc.code)
    except OSError as exc:
        return _done(args, out, "refused", [str(exc) if exc.args[1:] else repr(exc)], code="io")
    return _done(args, out, "committed", [])


def _to_agent(args: argparse.Namespace, store: BundleStore, check: Any, out: dict[str, Any]) -> int:
    """Verify and show what changes here, then let the running agent apply it (never ``recover``: it is its)."""
    try:
        running = store.current()
        old = store.installed_manifest(running[0]) if running else None
        out["running"] = running[0] if running else None
        out["agent"] = "running"
        _dry_run(args, store, check, old, dict(out), quiet=True, into=out)
    except BundleError:
        pass  # the agent refuses it too, and its refusal is reported and audit-logged: handed over all the same
    if not args.json:
        _show(args, out)

    def step(doc: dict[str, Any]) -> None:
        if not args.json and doc.get("state") == "applying":
            print(f"applying: the agent watches its health until {doc.get('health_window_ends')}", flush=True)

    try:
        allow = args.allow_downgrade.read_bytes() if args.allow_downgrade else None
        result = hand_over(store.root, args.file, step, wait=args.wait, allow=allow)
    except OSError as exc:
        return _done(args, out, "refused", [f"cannot hand the bundle to the agent: {exc}"], code="io")
    except TimeoutError as exc:
        return _done(args, out, "timeout", [str(exc)], code="timeout")
    if result is None:
        return _done(args, out, "refused", ["the running agent did not take the bundle (is fleet.enabled on?)"],
                     code="not_taken")  # fmt: skip
    out["version"] = result.get("version", out.get("version"))
    problems = [str(e.get("message")) for e in result.get("errors", []) if isinstance(e, dict)]
    if result.get("state") == "rolled_back" and not problems:
        problems = [str(result.get("reason"))]
    return _done(args, out, str(result.get("state")), problems, code=str(result.get("code") or ""), shown=True)


def _dry_run(
    args: argparse.Namespace,
    store: BundleStore,
    check: Any,
    old: Manifest | None,
    out: dict[str, Any],
    *,
    quiet: bool = False,
    into: dict[str, Any] | None = None,
) -> int:
    from agent.fleet.bundles.reader import scan

    def admitted(envelope: bytes) -> Manifest:
        manifest: Manifest = check(envelope)
        store.admit(manifest, reserve_bytes=args.reserve)
        return manifest

    result = scan(args.file, check_envelope=admitted, strict=True)
    assert result.manifest is not None
    out["version"] = result.manifest.version
    out["changes"] = changes(old, result.manifest)
    if into is not None:
        into.update(version=out["version"], changes=out["changes"])
    return EXIT_OK if quiet else _done(args, out, "would_apply", [])


def _show(args: argparse.Namespace, out: dict[str, Any]) -> None:
    if out.get("recovered"):
        print(f"recovered: version {out['recovered']} had not been committed; rolled back")
    running = f"version {out['running']}" if out.get("running") else "no bundle"
    agent = " (the agent runs: it applies it)" if out.get("agent") else ""
    print(f"{args.file}: running {running}{agent}")
    for change, path in out.get("changes", []):
        if change != "same":
            print(f"  {change:8s} {path}")


def _done(
    args: argparse.Namespace,
    out: dict[str, Any],
    status: str,
    problems: list[str],
    code: str = "",
    *,
    shown: bool = False,
) -> int:
    out.update(status=status, code=code or None, problems=problems)
    if args.json:
        out["changes"] = [{"change": c, "path": p} for c, p in out.get("changes", [])]
        print(json.dumps(out))
    else:
        if not shown:
            _show(args, out)
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        version = out.get("version")
        print(f"{status}" + (f" version {version}" if version else "") + (f" ({code})" if code else ""))
    return EXIT_OK if status in ("committed", "would_apply", "applied") else EXIT_FAILED
