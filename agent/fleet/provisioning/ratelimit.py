"""A token bucket: at most ``rate`` requests in any second, and how long the rest should wait."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, holding at most one: requests are paced 1/rate apart, so no second
    ever sees more than ``rate`` (a bucket holding ``rate`` would let 2 x rate through in the
    second after a quiet spell)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Full at the start."""
        self.rate = rate
        self.capacity = 1.0
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()
        self._owed = 0.0  # tokens promised to requests told to retry, so they do not all come back at once

    def take(self) -> float:
        """0.0: go ahead (a token was taken); else the seconds to tell the requester to wait."""
        now = self._clock()
        gained = (now - self._at) * self.rate
        self._at = now
        self._owed = max(0.0, self._owed - gained)
        self._tokens = min(self.capacity, self._tokens + gained)
        if self._tokens >= 1.0 - 1e-9:
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        self._owed += 1.0
        # Spread the waiting requests over the seconds the bucket needs to serve them all.
        return max(1.0, math.ceil(self._owed / self.rate))
