"""Pacing: at most ``rate`` requests in any second, held for their turn or told how long to wait."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """Requests go 1/rate apart, so no second ever sees more than ``rate`` (a bucket holding
    ``rate`` tokens would let 2 x rate through in the second after a quiet spell).

    :meth:`reserve` gives a request the next free slot if it is near (the responder holds its
    answer until then: a burst of claims is served at the full rate, not in retry rounds);
    :meth:`take` answers now or says how long to wait."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Free at the start."""
        self.rate = rate
        self._clock = clock
        self._next = clock()  # the next free slot
        self._at = self._next
        self._owed = 0.0  # requests told to retry, so they do not all come back at once

    def reserve(self, hold: float) -> float | None:
        """Seconds until this request's slot (0.0: now), reserved; None if it is more than ``hold`` away."""
        now = self._clock()
        at = max(now, self._next)
        if at - now > hold + 1e-9:
            return None
        self._next = at + 1.0 / self.rate
        return at - now

    def take(self) -> float:
        """0.0: go ahead (the slot is taken); else the seconds to tell the requester to wait."""
        now = self._clock()
        self._owed = max(0.0, self._owed - (now - self._at) * self.rate)
        self._at = now
        if now >= self._next - 1e-9:
            self._next = now + 1.0 / self.rate
            return 0.0
        self._owed += 1.0
        # Spread the waiting requests over the seconds needed to serve them all, beyond the reserved slots.
        return max(1.0, math.ceil(self._owed / self.rate + (self._next - now)))
