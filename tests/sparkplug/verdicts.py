"""Verdicts per Sparkplug assertion id, and the registry the check modules fill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.sparkplug.session import Session

PASS, FAIL, UNTESTED, NOT_APPLICABLE = "pass", "fail", "untested", "not_applicable"


@dataclass(frozen=True)
class Verdict:
    outcome: str  # pass, fail, untested (the session holds no evidence), not_applicable
    detail: str


Check = Callable[[Session], Verdict]
CHECKS: dict[str, Check] = {}


def check(*ids: str) -> Callable[[Check], Check]:
    """Register a function as the check of each of ``ids`` (one rule stated by several ids)."""

    def register(fn: Check) -> Check:
        for i in ids:
            if i in CHECKS:
                raise ValueError(f"two checks for {i}")
            CHECKS[i] = fn
        return fn

    return register


def judge(problems: list[str], seen: int, what: str) -> Verdict:
    """Fail naming the first problems; untested when nothing was there to check; else pass."""
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return Verdict(FAIL, "; ".join(problems[:3]) + more)
    if not seen:
        return Verdict(UNTESTED, f"no {what} in the session")
    return Verdict(PASS, f"{seen} {what} checked")


def all_checks() -> dict[str, Check]:
    """The registry, once the check modules have filled it (they import this module)."""
    from tests.sparkplug import checks_birth, checks_data, checks_host, checks_session  # noqa: F401 - they register

    return CHECKS


def evaluate(session: Session) -> dict[str, Verdict]:
    """Every check's verdict on ``session``."""
    return {i: fn(session) for i, fn in sorted(all_checks().items())}
