"""When to renew: pure functions of the certificate's validity and the clock (tested on a fake clock)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.fleet.identity.renew_config import RenewConfig

JITTER = 0.2  # a failed renewal is retried after retry_hours ± 20 %, so a fleet's retries spread out
EXPIRING_EVERY = timedelta(days=1)  # the expiring event goes out at most this often


@dataclass(frozen=True)
class Validity:
    """A certificate's validity period (UTC)."""

    not_before: datetime
    not_after: datetime


def renew_at(validity: Validity, config: RenewConfig) -> datetime:
    """At ``at_fraction`` of the lifetime, or ``before_expiry_days`` before the end if that is sooner.

    A certificate shorter-lived than the margin (a responder issuing for 7 days) is renewed at the
    fraction: the margin would fall before its start and every new certificate would be renewed at
    once, in a loop.
    """
    lifetime = validity.not_after - validity.not_before
    by_fraction = validity.not_before + lifetime * config.at_fraction
    by_margin = validity.not_after - timedelta(days=config.before_expiry_days)
    return by_fraction if by_margin <= validity.not_before else min(by_fraction, by_margin)


def retry_after(config: RenewConfig, rng: random.Random) -> timedelta:
    """How long after a failed attempt the next one starts: ``retry_hours`` ± 20 %."""
    return timedelta(hours=config.retry_hours * rng.uniform(1 - JITTER, 1 + JITTER))


def expiring(validity: Validity, now: datetime, config: RenewConfig, last_sent: datetime | None) -> bool:
    """Whether a ``city.gateway.cert.expiring`` event is due now (few days left; none sent within a day)."""
    if validity.not_after - now > timedelta(days=config.expiring_days):
        return False
    return last_sent is None or now - last_sent >= EXPIRING_EVERY
