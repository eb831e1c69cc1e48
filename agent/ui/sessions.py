"""Logged-in sessions (in memory) and the failed-login limit.

A session is a random id in an HttpOnly cookie; it ends after 30 minutes without a request,
8 hours after login, when the agent restarts, or when the password changes (``ui reset``).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass

IDLE_SECONDS = 30 * 60.0
ABSOLUTE_SECONDS = 8 * 3600.0
FAILURES_PER_MINUTE = 5  # the 6th failed login within a minute is refused (429) unchecked
MAX_SESSIONS = 32  # the oldest go first: a page for a few technicians, not a crowd


@dataclass
class Session:
    """One login."""

    user: str
    stamp: str | None  # the password's stamp at login (None: the setup session, before any password)
    created: float
    seen: float
    must_set_password: bool


class Sessions:
    """Session ids -> sessions, and recent failed logins."""

    def __init__(self) -> None:
        """Empty."""
        self._sessions: dict[str, Session] = {}
        self._failures: deque[float] = deque()

    def open(self, user: str, stamp: str | None, *, must_set_password: bool = False) -> str:
        """A new session's id."""
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda sid: self._sessions[sid].created)
            del self._sessions[oldest]
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        self._sessions[sid] = Session(user, stamp, now, now, must_set_password)
        return sid

    def get(self, sid: str | None, stamp: str | None) -> Session | None:
        """The live session ``sid`` (its idle time restarts), or None if it is unknown or over."""
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = time.monotonic()
        over = now - session.seen > IDLE_SECONDS or now - session.created > ABSOLUTE_SECONDS
        if over or (session.stamp is not None and session.stamp != stamp):
            del self._sessions[sid]
            return None
        session.seen = now
        return session

    def close(self, sid: str | None) -> None:
        """Log out."""
        if sid:
            self._sessions.pop(sid, None)

    def limited(self) -> bool:
        """Whether logins are refused for now (FAILURES_PER_MINUTE failures in the last minute)."""
        now = time.monotonic()
        while self._failures and now - self._failures[0] > 60.0:
            self._failures.popleft()
        return len(self._failures) >= FAILURES_PER_MINUTE

    def failed(self) -> None:
        """Count a failed login."""
        self._failures.append(time.monotonic())
