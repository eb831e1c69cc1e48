"""Certificate renewal over the operational connection (docs/fleet.md, "Certificate renewal").

At ``at_fraction`` of the lifetime (or ``before_expiry_days`` before the end, if sooner) the
gateway makes a new pending key, sends a CSR on ``{root}/{gw}/identity/request``, checks the
answer (chain to ``fleet.identity.ca_file``, its own new key, its own id), writes
``cert.next.pem`` and asks the uplink to connect with the new pair. Only after the broker
accepted it once are the files promoted; a refused certificate is dropped and the old one goes
on. A failed attempt is retried after ``retry_hours`` ± 20 %. The clock, the sleep, the
exchange with the responder and the swap are passed in, so the whole schedule runs on a fake
clock in the tests.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from cryptography import x509

from agent import __version__
from agent.fleet.identity.keystore import CsrFields, KeyStore
from agent.fleet.identity.renew_config import RenewConfig
from agent.fleet.identity.renewal_schedule import Validity, expiring, renew_at, retry_after
from agent.fleet.identity.renewal_verify import AnswerRefused, verify_answer
from agent.uplinks.api import IdentityFiles

log = logging.getLogger(__name__)

RECHECK = 3600.0  # s: the longest sleep, so a clock that jumps (NTP after boot) is noticed within the hour
NOT_YET_VALID_RECHECK = 60.0  # s between looks while the clock is behind the certificate's start

# exchange(request body, nonce, timeout) -> the answer carrying our nonce, or None (none in time)
Exchange = Callable[[bytes, str, float], Awaitable["dict[str, Any] | None"]]
# swap(files, timeout) -> None: the uplink connected with them; else why not
Swap = Callable[[IdentityFiles, float], Awaitable["str | None"]]


class ChainFiles(Protocol):
    """What renewal needs of the identity folder's certificate files."""

    def write_cert_next(self, chain_pem: bytes) -> None: ...

    def promote_cert(self) -> None: ...

    def discard_next(self) -> None: ...


class RenewalFailed(Exception):
    """One attempt failed; the message says why (it goes to the log, the inventory and the metrics)."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        """``retry_after``: seconds the responder asked us to wait at least."""
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class RenewalState:
    """What the inventory and the metrics show about renewal."""

    not_before: datetime | None = None
    not_after: datetime | None = None
    subject: str | None = None
    serial_number: str | None = None
    renew_at: datetime | None = None
    next_attempt: datetime | None = None  # set after a failure
    last_error: str | None = None
    renewals: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by short reason
    expiring_sent: datetime | None = None


@dataclass(frozen=True)
class Who:
    """Who the gateway is, as the request says it."""

    gateway_id: str
    serial: str
    hardware_model: str = "unknown"


class Renewer:
    """Keeps the client certificate valid: renews on schedule, retries, warns before expiry."""

    def __init__(
        self,
        who: Who,
        config: Callable[[], RenewConfig],
        *,
        keys: KeyStore,
        chains: ChainFiles,
        current: Callable[[], IdentityFiles],
        roots: Callable[[], list[x509.Certificate]],
        exchange: Exchange,
        swap: Swap,
        promoted: Callable[[x509.Certificate], None],
        on_expiring: Callable[[dict[str, Any]], None],
        clock: Callable[[], datetime],
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random | None = None,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        """``current()``: the files in use; ``promoted(leaf)``: after the new pair became current;
        ``changed()``: after each attempt (what the inventory shows changed)."""
        self.who, self._config = who, config
        self._keys, self._chains, self._current, self._roots = keys, chains, current, roots
        self._exchange, self._swap, self._promoted, self._on_expiring = exchange, swap, promoted, on_expiring
        self._clock, self._sleep = clock, sleep
        self._rng = rng or random.Random()
        self._changed = changed
        self.state = RenewalState()
        self._behind_logged = False
        self._parsed: tuple[bytes, x509.Certificate] | None = None  # parsed again only when the file changed

    def read_certificate(self) -> Validity | None:
        """The current leaf's validity (kept in :attr:`state`); None if it cannot be read."""
        path = self._current().cert_file
        try:
            data = path.read_bytes()
            known = self._parsed
            leaf = known[1] if known and known[0] == data else x509.load_pem_x509_certificates(data)[0]
        except (OSError, ValueError, IndexError) as exc:
            self.state.last_error = f"{path}: cannot read the certificate ({exc})"
            return None
        self._parsed = (data, leaf)
        s = self.state
        s.not_before, s.not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        s.subject, s.serial_number = leaf.subject.rfc4514_string(), format(leaf.serial_number, "x")
        validity = Validity(s.not_before, s.not_after)
        s.renew_at = renew_at(validity, self._config())
        return validity

    async def run(self) -> None:
        """Forever: sleep until due (waking at least hourly), renew, or retry after a failure."""
        while True:
            try:
                await self._sleep(self.step())
                if self._due():
                    await self.attempt()
            except Exception as exc:  # a bug or a broken folder: say so, keep the agent, look again later
                log.exception("certificate renewal: unexpected error")
                self._failed(f"internal: {type(exc).__name__}: {exc}")
                await self._sleep(RECHECK)

    def step(self) -> float:
        """Look at the certificate and the clock; seconds to sleep before the next look (0: renew now)."""
        config = self._config()
        validity = self.read_certificate()
        now = self._clock()
        if validity is None:
            return RECHECK
        if now < validity.not_before:
            # A board without a real-time clock boots in the past: wait for NTP, never crash.
            if not self._behind_logged:
                self._behind_logged = True
                log.warning(
                    "the clock (%s) is before the client certificate's start (%s): waiting for the clock",
                    now.isoformat(timespec="seconds"),
                    validity.not_before.isoformat(timespec="seconds"),
                )
            return NOT_YET_VALID_RECHECK
        self._behind_logged = False
        if expiring(validity, now, config, self.state.expiring_sent):
            self.state.expiring_sent = now
            self._on_expiring(self.expiring_data(now))
        if not config.enabled:
            return RECHECK
        due = self._due_at()
        return 0.0 if due is None or now >= due else min(RECHECK, (due - now).total_seconds())

    def _due_at(self) -> datetime | None:
        s = self.state
        if s.renew_at is None:
            return None
        return max(s.renew_at, s.next_attempt) if s.next_attempt is not None else s.renew_at

    def _due(self) -> bool:
        due = self._due_at()
        return self._config().enabled and due is not None and self._clock() >= due

    async def attempt(self) -> bool:
        """One renewal; on failure the next attempt is scheduled. True: renewed."""
        try:
            leaf = await self.renew_once()
        except RenewalFailed as exc:
            return self._failed(str(exc), exc.retry_after)
        finally:
            self._changed()
        self.state.renewals += 1
        self.state.next_attempt = self.state.last_error = None
        log.info(
            "client certificate renewed: serial %x, valid until %s",
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        self.read_certificate()
        return True

    def _failed(self, reason: str, not_before: float = 0.0) -> bool:
        s = self.state
        wait = max(retry_after(self._config(), self._rng), timedelta(seconds=not_before))
        s.next_attempt = self._clock() + wait
        s.last_error = reason
        key = reason.split(":", 1)[0][:40]
        s.failures[key] = s.failures.get(key, 0) + 1
        log.warning(
            "certificate renewal failed: %s; the current certificate stays, next attempt %s",
            reason,
            s.next_attempt.isoformat(timespec="seconds"),
        )
        return False

    async def renew_once(self) -> x509.Certificate:
        """Request, check, swap, promote. Raises :class:`RenewalFailed` naming why."""
        config, who = self._config(), self.who
        self._keys.generate()
        nonce = secrets.token_hex(16)
        fields = CsrFields(who.serial, who.hardware_model, __version__, nonce, who.gateway_id)
        request = {
            "serial": who.serial,
            "hardware_model": who.hardware_model,
            "agent_version": __version__,
            "nonce": nonce,
            "csr": self._keys.csr("pending", fields).decode(),
            "gateway_id": who.gateway_id,
        }
        answer = await self._exchange(json.dumps(request).encode(), nonce, config.answer_timeout)
        if answer is None:
            raise RenewalFailed(f"no answer: the responder did not answer within {config.answer_timeout:g} s")
        if answer.get("status") in ("retry", "refused"):
            wait = answer.get("retry_after")
            reason = str(answer.get("reason") or "no reason given")[:200]
            after = float(wait) if isinstance(wait, int | float) and 0 <= wait < 10**7 else 0.0
            raise RenewalFailed(f"{answer['status']}: {reason}", after)
        try:
            issued = verify_answer(
                answer,
                nonce=nonce,
                gateway_id=who.gateway_id,
                pending_key=self._keys.public_key("pending"),
                roots=self._roots(),
                now=self._clock(),
            )
        except AnswerRefused as exc:
            raise RenewalFailed(f"answer refused: {exc}") from exc
        self._chains.write_cert_next(issued.chain_pem)
        refused = await self._swap(self.pending_files(), config.swap_timeout)
        if refused is not None:
            self._chains.discard_next()
            raise RenewalFailed(f"new certificate refused: {refused}")
        # No await from here on: the uplink must never see the files half renamed.
        self._keys.promote()
        self._chains.promote_cert()
        self._promoted(issued.leaf)
        return issued.leaf

    def pending_files(self) -> IdentityFiles:
        """``cert.next.pem`` and ``key.next.pem`` beside the current files."""
        current = self._current()
        return IdentityFiles(current.cert_file.with_name("cert.next.pem"), current.key_file.with_name("key.next.pem"))

    def expiring_data(self, now: datetime) -> dict[str, Any]:
        """The ``city.gateway.cert.expiring`` event's data."""
        s = self.state
        left = (s.not_after - now).total_seconds() if s.not_after is not None else 0.0
        return {
            "subject": s.subject,
            "serial_number": s.serial_number,
            "not_after": _rfc3339(s.not_after),
            "seconds_left": round(left),
            "days_left": int(left // 86400),
            "last_error": s.last_error,
            "next_attempt": _rfc3339(s.next_attempt),
        }


def _rfc3339(at: datetime | None) -> str | None:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z") if at is not None else None
