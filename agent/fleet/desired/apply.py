"""Desired documents in, one at a time: verified, checked, applied through the agent's reload,
watched through a health window, kept or rolled back, and reported at each step.

The retained document arrives again on every reconnect with the same bytes: one already handled
(applied, rejected or rolled back, remembered by the sha256 of its envelope) is not checked
again, so its nonce is never taken for a replay. Every outcome is counted and audit-logged, one
line per document; a refusal never changes what runs and never stops the events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.model import AgentConfigBase, load_config
from agent.config.remote import RemoteConfigError, load_effective
from agent.errors import ConfigError
from agent.fleet.desired import health
from agent.fleet.desired.document import (
    Desired,
    Problem,
    Rejected,
    check_fleet_section,
    digest_of,
    parse,
    peek,
    signed_with_scope,
)
from agent.fleet.desired.report import Report, Reporter, Running
from agent.fleet.desired.startup import Start
from agent.fleet.desired.state import Applied
from agent.fleet.envelope import CONFIG_TYPE, Refused, TrustedKey, verify
from agent.fleet.nonces import NonceStore
from agent.observability.clock import kernel_clock_sync

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.runtime.agent import Agent

log = logging.getLogger(__name__)
audit = logging.getLogger("agent.fleet.audit")

CLOCK_RETRY = 10.0  # seconds between looks at the clock while a document waits for it
HANDLED_MAX = 256  # refused documents recognised in memory (the retained one is always among them)


def kernel_synced() -> bool | None:
    """The kernel's verdict on the clock (None: unknown)."""
    found = kernel_clock_sync()
    return None if found is None else found[0]


class DesiredConfig:
    """The ``config`` document handler of one agent (registered when ``fleet.enabled``)."""

    def __init__(
        self, agent: Agent, start: Start, nonces: NonceStore, *, clock: Callable[[], bool | None] = kernel_synced
    ) -> None:
        """``start``: what start-up found (agent/fleet/desired/startup.py); its report is put now."""
        self._agent = agent
        self._path: Path = agent.config_path or Path()
        self._state = start.state
        self._nonces = nonces
        self._clock = clock
        self.running = start.running
        self._sections: dict[str, Any] = dict(start.sections)
        self._applied = start.applied.digest if start.applied is not None else None
        self._handled = {e["digest"]: e for e in start.history if isinstance(e.get("digest"), str)}
        self._rolled_back = {e.get("version") for e in start.history if e.get("status") == "rolled_back"}
        self._applying: str | None = None
        self._next: bytes | None = None
        self._worker: asyncio.Task[None] | None = None
        self._unsynced: bytes | None = None  # the newest document refused for the clock, retried
        self._clock_task: asyncio.Task[None] | None = None
        self.outcomes: Counter[str] = Counter()
        self.reporter = Reporter(agent.config.gateway.id, agent.inbound.reports)
        self.reporter.put(start.report, now=True)

    # ---- in ---------------------------------------------------------------------------
    async def take(self, data: bytes, origin: str) -> None:
        """The inbound handler: keep the newest document; one worker handles them in turn."""
        self._next = data
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="fleet-config")

    async def idle(self) -> None:
        """Until every document taken so far is handled (tests)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def _work(self) -> None:
        while self._next is not None:
            data, self._next = self._next, None
            try:
                await self.handle(data)
            except health.Stopped:
                log.info("the agent stops during a health window: the next start runs the last good config")
                return
            except Exception:  # a bug: logged, the next document still gets its turn
                log.exception("a desired config document could not be handled")

    @property
    def sections(self) -> dict[str, Any]:
        """The remote sections that run (a bundle without config.json keeps them)."""
        return dict(self._sections)

    def load_file(self, path: Path) -> AgentConfigBase:
        """For SIGHUP: the local file as it is now, with the running remote sections over it."""
        return load_effective(path, self._sections) if self._sections else load_config(path)

    async def handle(self, data: bytes) -> None:
        """One document, start to finish."""
        if not data:
            log.info("the desired config was withdrawn (empty retained message): version %d keeps running",
                     self.running.version)  # fmt: skip
            return
        digest = digest_of(data)
        if digest in (self._applied, self._applying):
            return  # our own retained document, again after a reconnect
        self._unsynced = None  # a newer document: the one waiting for the clock is superseded
        seen = self._handled.get(digest)
        if seen is not None and seen.get("status") == "superseded":
            return
        if seen is not None:
            last, again = self.reporter.last, self._report_of(seen)
            if last is None or (last.version, last.status, last.reason) != (again.version, again.status, again.reason):
                self.reporter.put(again)  # the report is about this document again
            return
        try:
            desired = self._verify(data, digest)
            new = await self._check(desired)
        except Rejected as exc:
            self._reject(data, digest, exc)
            return
        if new is not None:
            await self._apply(desired, new)

    # ---- checks -----------------------------------------------------------------------
    def _verify(self, data: bytes, digest: str) -> Desired:
        fleet = self._agent.config.fleet
        keys = {k.id: TrustedKey.from_text(k.id, k.public_key, k.scopes) for k in fleet.keys}
        synced = True if fleet.clock == "trusted" else self._clock()
        try:
            verified = verify(
                data, payload_type=CONFIG_TYPE, scope="config", keys=keys, gateway=self._agent.config.gateway.id,
                groups=frozenset(fleet.groups), nonces=self._nonces, clock_synced=synced,
            )  # fmt: skip
        except Refused as exc:
            if exc.code == "clock_unsynced":
                self._wait_for_clock(data)
            raise Rejected(exc.code, exc.message, [Problem(exc.field, exc.code, exc.message)]) from None
        desired = parse(verified.body, key_id=verified.key_id, data=data)
        if "fleet" in desired.sections and not signed_with_scope(data, "keys", keys):
            message = "a fleet section needs a signature by a key with scope keys as well as config"
            raise Rejected("scope", message, [Problem("signatures", "scope", message)])
        return desired

    async def _check(self, desired: Desired) -> AgentConfigBase | None:
        """The effective config ``desired`` makes; None if it is what runs (already applied)."""
        running = self.running
        if desired.version == running.version and desired.hash == running.hash:
            # Re-signed, same content: remember this envelope as the applied one, change nothing.
            self._save_applied(desired)
            self._audit(desired, "already applied")
            self.reporter.put(Report(running.version, "applied", running, running.hash))
            return None
        if desired.version in self._rolled_back:
            message = f"version {desired.version} was rolled back before and is never retried"
            raise Rejected("rolled_back_before", message, [Problem("payload.version", "rolled_back_before", message)])
        if desired.version <= running.version and not desired.downgrade:
            message = f"version {desired.version} is not above the applied version {running.version}"
            raise Rejected("stale", message, [Problem("payload.version", "stale", message)])
        try:
            new = await asyncio.to_thread(load_effective, self._path, desired.sections)
        except RemoteConfigError as exc:
            errors = [Problem(p.field, "invalid", p.message) for p in exc.fields]
            raise Rejected("invalid", f"{len(errors)} problem(s) in the sections", errors) from None
        except ConfigError as exc:  # the local file itself (edited, unreadable)
            errors = [Problem(None, "invalid", p) for p in exc.problems]
            raise Rejected("invalid", "the local site file does not validate", errors) from None
        if "fleet" in desired.sections:
            check_fleet_section(new.fleet, self._agent.config.fleet)
        return new

    async def apply_bundle(self, desired: Desired, commit: Callable[[], object]) -> dict[str, Any] | None:
        """A bundle's config on this same version line (agent/fleet/bundles/runner.py): checked, applied,
        watched; ``commit`` runs once healthy, before the config is saved as the last good one.

        Returns None once applied, else the outcome's entry (``status`` rejected or rolled_back).
        """
        try:
            new = await self._check(desired)
        except Rejected as exc:
            self._reject(desired.envelope, desired.digest, exc)
            return self._handled.get(desired.digest)
        if new is None:  # what runs already: nothing to reload
            commit()
            return None
        previous, version = self._applied, self.running.version
        await self._apply(desired, new, commit)
        if self._applied != desired.digest:
            return self._handled.get(desired.digest)
        if previous is not None:  # its retained document comes again on each reconnect: neither news nor a replay
            entry = self._entry(previous, version, None, "superseded", f"bundle version {desired.version}", [])
            self._state.remember(entry)
            self._handled[previous] = entry
        return None

    # ---- apply ------------------------------------------------------------------------
    async def _apply(self, desired: Desired, new: AgentConfigBase, commit: Callable[[], object] | None = None) -> None:
        agent = self._agent
        old, old_running, old_sections = agent.config, self.running, self._sections
        before = health.online(agent)
        ends = datetime.now(UTC) + timedelta(seconds=desired.health_window)
        self._applying = desired.digest
        self._state.save_pending(
            {
                "version": desired.version,
                "hash": desired.hash,
                "digest": desired.digest,
                "health_window_ends": ends.isoformat(),
            }
        )
        self.running = Running(desired.version, desired.hash, tuple(sorted(desired.sections)))
        self._sections = desired.sections
        self.reporter.put(Report(desired.version, "applying", self.running, desired.hash, health_window_ends=ends),
                          now=True)  # fmt: skip
        try:
            try:
                changes = await agent.reload(new)
            except ConfigError as exc:
                self.running, self._sections = old_running, old_sections
                self._state.clear_pending()
                errors = [Problem(None, "restart_needed", p) for p in exc.problems]
                self._reject(desired.envelope, desired.digest, Rejected("restart_needed", exc.problems[0], errors))
                return
            except Exception as exc:  # half applied, maybe: back to the last good config
                log.exception("applying remote config version %d failed", desired.version)
                problem = Problem(None, "apply_failed", f"{type(exc).__name__}: {exc}")
                await self._roll_back(desired, old, old_running, old_sections, [problem], "the reload failed")
                return
            self._audit(desired, f"applying ({', '.join(changes) or 'no changes'})")
            problems = await health.watch(agent, desired, old, new, before)
            if problems:
                await self._roll_back(desired, old, old_running, old_sections, problems, health.reason_of(problems))
                return
            if commit is not None:  # a bundle's files are committed first: agent/fleet/bundles/startup.py
                commit()
            self._save_applied(desired)
            self._state.clear_pending()
            self._audit(desired, "applied")
            self.reporter.put(Report(desired.version, "applied", self.running, desired.hash), now=True)
        finally:
            self._applying = None

    async def _roll_back(
        self,
        desired: Desired,
        old: AgentConfigBase,
        running: Running,
        sections: dict[str, Any],
        problems: list[Problem],
        reason: str,
    ) -> None:
        try:
            await self._agent.reload(old)
        except Exception:
            log.exception("rolling back remote config version %d failed", desired.version)
        self.running, self._sections = running, sections
        entry = self._entry(desired.digest, desired.version, desired.hash, "rolled_back", reason, problems)
        self._state.remember(entry)  # before the pending file goes: a crash in between still rolls back
        self._state.clear_pending()
        self._handled[desired.digest] = entry  # the retained document comes again on the restored link
        self._rolled_back.add(desired.version)
        self._audit(desired, f"rolled back: {reason}")
        self.reporter.put(self._report_of(entry), now=True)

    # ---- outcomes ---------------------------------------------------------------------
    def _save_applied(self, desired: Desired) -> None:
        self._state.save_applied(
            Applied(desired.version, desired.hash, desired.sections, desired.digest, desired.envelope)
        )
        self._applied = desired.digest

    def _reject(self, data: bytes, digest: str, exc: Rejected) -> None:
        version, doc_hash = peek(data)
        self.outcomes[exc.code] += 1
        entry = self._entry(digest, version, doc_hash, "rejected", exc.reason, exc.errors, code=exc.code)
        if exc.code != "clock_unsynced":  # that one is retried: not remembered as handled
            self._state.remember(entry)
            self._handled[digest] = entry
            while len(self._handled) > HANDLED_MAX:  # a flood of distinct documents: forget the oldest
                del self._handled[next(iter(self._handled))]
        # One line per document: each is its own state for the repeat filter, never folded away.
        audit.warning("fleet config version %d refused: %s (%s, %d so far)", version, exc.code,
                      exc.errors[0].field if exc.errors else "-", self.outcomes[exc.code],
                      extra={"subject": "fleet config", "state": f"{digest[:16]} refused"})  # fmt: skip
        self.reporter.put(self._report_of(entry))

    def _entry(
        self,
        digest: str,
        version: int,
        doc_hash: str | None,
        status: str,
        reason: str,
        problems: list[Problem],
        code: str | None = None,
    ) -> dict[str, Any]:
        errors = [p.to_json() for p in problems]
        if not errors and code is not None:
            errors = [{"field": None, "code": code, "message": reason}]
        return {"digest": digest, "version": version, "hash": doc_hash, "status": status, "reason": reason,
                "errors": errors}  # fmt: skip

    def _report_of(self, entry: dict[str, Any]) -> Report:
        errors = [Problem(e.get("field"), str(e.get("code")), str(e.get("message"))) for e in entry.get("errors", [])]
        return Report(entry.get("version", 0), entry["status"], self.running, entry.get("hash"), entry.get("reason"),
                      errors)  # fmt: skip

    def _audit(self, desired: Desired, outcome: str) -> None:
        self.outcomes[outcome.split(" ", 1)[0]] += 1
        # applying, then applied or rolled back: each a state of its own, so none is folded away.
        state = f"{desired.digest[:16]} {outcome.split()[0]}"
        audit.info("fleet config version %d (%s) signed by %s: %s", desired.version, desired.hash[:19],
                   desired.key_id, outcome, extra={"subject": "fleet config", "state": state})  # fmt: skip

    # ---- the clock --------------------------------------------------------------------
    def _wait_for_clock(self, data: bytes) -> None:
        self._unsynced = data
        if self._clock_task is None or self._clock_task.done():
            self._clock_task = asyncio.get_running_loop().create_task(self._clock_retry(), name="fleet-config-clock")

    async def _clock_retry(self) -> None:
        while self._unsynced is not None:
            await asyncio.sleep(CLOCK_RETRY)
            if self._unsynced is not None and self._clock() is not False:
                data, self._unsynced = self._unsynced, None
                log.info("the clock is synchronised: the desired config waiting for it is checked again")
                if self._next is None:
                    await self.take(data, "clock")
