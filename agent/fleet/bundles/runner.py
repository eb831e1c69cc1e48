"""The running agent applies a bundle: stage, switch, reload, health window, commit, or back to the previous one.

One apply at a time, whatever brought the file (``edge-agent bundle apply`` through the inbox,
agent/fleet/bundles/inbox.py, or ``fleet push-bundle`` over MQTT, agent/fleet/bundles/transfer.py).
The bundle's config goes through the remote configuration's own apply (agent/fleet/desired/apply.py):
the same checks, reload, health window and report, on the same version line, the bundle's version
being the config's. A bundle without ``config.json`` reloads the running sections, so new profiles
and models take effect the same way.

Every step is the ``bundle`` report (``{root}/{gateway}/bundle/status``, retained) and one audit
line; a refusal names the file or field and changes nothing.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.contract.events import format_time
from agent.fleet.bundles.downgrade import allowed_version
from agent.fleet.bundles.inbox import serve
from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError, Manifest, verify_manifest
from agent.fleet.bundles.startup import applied_of, use_profiles
from agent.fleet.bundles.store import BundleStore, Staged, bundles_dir
from agent.fleet.bundles.transfer import Receiver
from agent.fleet.desired import health
from agent.fleet.desired.document import Desired, signed_with_scope
from agent.fleet.envelope import TrustedKey
from agent.fleet.nonces import NonceStore

if TYPE_CHECKING:
    from agent.fleet.desired.apply import DesiredConfig
    from agent.runtime.agent import Agent

log = logging.getLogger(__name__)
audit = logging.getLogger("agent.fleet.audit")

REPORT_NAME = "bundle"
FINAL = ("applied", "rolled_back", "refused")


class BundleRunner:
    """Applies bundle files in the running agent and reports each step."""

    def __init__(self, agent: Agent, desired: DesiredConfig) -> None:
        """The store is ``<buffer folder>/fleet/bundles`` (recovered already, at start)."""
        self._agent = agent
        self._desired = desired
        self.root = bundles_dir(agent.config.buffer.path.parent)
        self.store = BundleStore(self.root)
        self._lock = asyncio.Lock()
        self.status: dict[str, Any] = {}
        self.outcomes: dict[str, int] = {}
        self.receiver = Receiver(self)
        channel = agent.inbound.channel  # its nonce store: a downgrade directive works once
        self._nonces = channel.nonces if channel is not None else NonceStore(None)
        use_profiles(self.root)
        running = self.store.current()
        self.report({"state": "idle", "version": running[0] if running else 0})

    # ---- checks ---------------------------------------------------------------------
    def keys(self) -> dict[str, TrustedKey]:
        """The trusted keys of the running config (a bundle may rotate them: the next bundle sees the new ones)."""
        return {k.id: TrustedKey.from_text(k.id, k.public_key, k.scopes) for k in self._agent.config.fleet.keys}

    def allowed(self, directive: bytes | None, *, use: bool) -> int | None:
        """The older version a downgrade directive allows (None without one); ``use``: take its nonce.

        Raises:
            BundleError: the directive is refused, named.
        """
        if directive is None:
            return None
        config = self._agent.config
        nonces = self._nonces if use else NonceStore(None)
        return allowed_version(directive, keys=self.keys(), gateway=config.gateway.id,
                               groups=frozenset(config.fleet.groups), nonces=nonces)  # fmt: skip

    def check(self, envelope: bytes, allow_version: int | None = None) -> Manifest:
        """Signature, scope, target, expiry, and the config version line (run in a thread).

        Raises:
            BundleError: naming the field.
        """
        config = self._agent.config
        manifest = verify_manifest(
            envelope, keys=self.keys(), gateway=config.gateway.id, groups=frozenset(config.fleet.groups)
        )
        running = self._desired.running.version
        if manifest.version <= running and manifest.version != allow_version:
            message = (f"version {manifest.version} older than installed {running}" if manifest.version < running
                       else f"version {manifest.version} is already installed")  # fmt: skip
            raise BundleError("stale", [message + " (one version line with remote configs)"])
        return manifest

    def installed(self, envelope: bytes) -> bool:
        """Is this manifest the running bundle's (an offer of what is installed already)?"""
        running = self.store.current()
        try:
            return running is not None and (running[1] / MANIFEST_NAME).read_bytes() == envelope
        except OSError:
            return False

    def admit(self, manifest: Manifest, size: int, allow_version: int | None = None) -> None:
        """Room for a transfer of ``size`` bytes as well as the unpacked files (run in a thread).

        Raises:
            BundleError: ``stale``, ``no_space``... as the store's ``admit``.
        """
        self.store.admit(manifest, reserve_bytes=self.store.reserve() + size, allow_version=allow_version)

    async def run(self) -> None:
        """The inbox and the transfer's watchdog, until cancelled."""

        async def local(path: Path, on_status: Callable[[dict[str, Any]], None], allow: bytes | None) -> dict[str, Any]:
            return await self.apply(path, origin="local", on_status=on_status, allow=allow)

        await asyncio.gather(serve(self.root, local), self.receiver.watch())

    # ---- apply ----------------------------------------------------------------------
    async def apply(
        self, path: Path, *, origin: str, extra: dict[str, Any] | None = None,
        on_status: Callable[[dict[str, Any]], None] | None = None, allow: bytes | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Apply the bundle file at ``path``; the final status (``state`` applied, rolled_back or refused).

        ``allow``: a signed downgrade directive (agent/fleet/bundles/downgrade.py), used up here.
        """
        async with self._lock:
            base = {"origin": origin, **(extra or {})}

            def step(doc: dict[str, Any]) -> dict[str, Any]:
                status = self.report({**base, **doc})
                if on_status is not None:
                    on_status(status)
                return status

            step({"state": "verifying"})
            try:
                version = self.allowed(allow, use=True)
                check = functools.partial(self.check, allow_version=version)
                staged = await asyncio.to_thread(self.store.stage, path, check, allow_version=version)
            except BundleError as exc:
                return self._refused(step, exc.code, exc.problems, None)
            except OSError as exc:
                code = "no_space" if exc.errno == errno.ENOSPC else "io"
                return self._refused(step, code, [str(exc)], None)
            return await self._switched(step, staged)

    async def _switched(self, step: Callable[[dict[str, Any]], dict[str, Any]], staged: Staged) -> dict[str, Any]:
        manifest = staged.manifest
        version = manifest.version
        await asyncio.to_thread(self.store.switch, staged)
        try:
            applied = applied_of(self.root / "current", version, self._desired.sections)
        except (BundleError, OSError) as exc:
            problems = exc.problems if isinstance(exc, BundleError) else [str(exc)]
            await asyncio.to_thread(self.store.rollback, problems[0])
            return self._refused(step, "malformed", problems, version, rolled_back=True)
        if "fleet" in applied.sections and not signed_with_scope(applied.envelope, "keys", self.keys()):
            # Rotating keys takes the current keys' word: a signature with scope keys, as a config's.
            message = "config.json: a fleet section needs a signature by a key with scope keys as well as bundle"
            await asyncio.to_thread(self.store.rollback, message)
            return self._refused(step, "scope", [message], version, rolled_back=True)
        desired = Desired(
            version, applied.sections, applied.hash, health_window=manifest.health_window,
            key_id=manifest.signed_by or "", digest=applied.digest, envelope=applied.envelope,
            downgrade=staged.downgrade or version <= self._desired.running.version,
        )  # fmt: skip
        ends = datetime.now(UTC) + timedelta(seconds=manifest.health_window)
        step({"state": "applying", "version": version, "health_window_ends": format_time(ends)})
        audit.info("bundle version %d (signed by %s) applying%s", version, manifest.signed_by,
                   " (a downgrade, allowed by a signed directive)" if desired.downgrade else "")  # fmt: skip
        try:
            entry = await self._desired.apply_bundle(desired, self.store.commit)
        except health.Stopped:  # the next start rolls the bundle and its config back together
            reason = "the agent stopped during the health window: rolled back at its next start"
            return step({"state": "rolled_back", "version": version, "reason": reason, "errors": []})
        except Exception as exc:  # a bug: back to the previous bundle, reported
            log.exception("bundle version %d could not be applied", version)
            await asyncio.to_thread(self.store.rollback, f"{type(exc).__name__}: {exc}")
            return self._refused(step, "internal", [f"{type(exc).__name__}: {exc}"], version, rolled_back=True)
        if entry is None:
            self._count("applied")
            audit.info("bundle version %d applied", version)
            return step({"state": "applied", "version": version})
        reason = str(entry.get("reason") or "the config was not applied")
        await asyncio.to_thread(self.store.rollback, reason)
        errors = [e for e in entry.get("errors", []) if isinstance(e, dict)]
        if entry.get("status") == "rolled_back":
            self._count("rolled_back")
            audit.warning("bundle version %d rolled back: %s", version, reason)
            return step({"state": "rolled_back", "version": version, "reason": reason, "errors": errors})
        code = str(errors[0].get("code")) if errors else "invalid"
        return self._refused(step, code, [reason, *(str(e.get("message")) for e in errors)], version, rolled_back=True)

    def _refused(
        self, step: Callable[[dict[str, Any]], dict[str, Any]], code: str, problems: list[str], version: int | None,
        *, rolled_back: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        self._count(code)
        # One line per refusal, never folded: each names its file or field.
        audit.warning("bundle%s refused: %s: %s", f" version {version}" if version else "", code, "; ".join(problems),
                      extra={"subject": "bundle", "state": f"refused {code} {len(self.outcomes)}"})  # fmt: skip
        doc: dict[str, Any] = {"state": "refused", "code": code, "reason": problems[0] if problems else code,
                               "errors": [{"code": code, "message": p} for p in problems]}  # fmt: skip
        if version is not None:
            doc["version"] = version
        if rolled_back:
            doc["switched_back"] = True
        return step(doc)

    # ---- reports --------------------------------------------------------------------
    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def report(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Put the ``bundle`` report (``doc`` and the running version); returns it."""
        running = self.store.current()
        status = {
            "gateway": self._agent.config.gateway.id,
            "time": format_time(datetime.now(UTC)),
            **doc,
            "running": running[0] if running else 0,
        }
        self.status = status
        body = json.dumps(status, separators=(",", ":"), default=str).encode()
        self._agent.inbound.reports.put(REPORT_NAME, body)
        return status
