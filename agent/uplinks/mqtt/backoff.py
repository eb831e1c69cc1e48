"""Waits between connection attempts, spread over a fleet."""

from __future__ import annotations

import random


class Backoff:
    """When to try the broker again: a random phase, then one attempt per ``cap`` seconds.

    A broker restart drops every gateway of a fleet at the same instant, and a power cut boots
    them together. After such a moment (a connection that had held ends, or the first attempt
    since start fails) the wait is full jitter over the cap, U(0, cap): a fleet of N comes back
    at about N / cap per second. While the broker stays away (failed attempts, or connections
    that end before they held) each gateway keeps that random phase and tries once per cap,
    counted from the start of its previous attempt: the fleet stays evenly spread, still N / cap
    attempts per second, and each gateway finds the broker back within one cap (half of it on
    average). Only a connection that held draws a new phase; a CONNACK alone changes nothing,
    so a broker that accepts and then drops the connection is retried once per cap, not in a
    fast loop. Attempts are never closer than ``floor`` seconds.
    """

    def __init__(self, floor: float, cap: float, hold: float, rng: random.Random | None = None) -> None:
        """``floor``: least time between two attempts; ``cap``: the period; ``hold``: see class doc."""
        self.floor = floor
        self.cap = cap
        self.hold = hold
        self._rng = rng or random.Random()
        self._last_attempt = -float("inf")
        self._connected_at: float | None = None
        self._in_step = True  # the fleet may be in lockstep: draw a random phase

    def attempt(self, now: float) -> None:
        """A connection attempt starts."""
        self._last_attempt = now

    def connected(self, now: float) -> None:
        """The broker accepted the connection (a reconnect to resend continues the same run)."""
        if self._connected_at is None:
            self._connected_at = now

    def next_wait(self, now: float, *, resend: bool = False) -> float:
        """Seconds to wait after a failed attempt or an ended connection."""
        connected_at = self._connected_at
        if resend and connected_at is not None:
            wait = 0.0  # one gateway's own decision, not a fleet event: go at once
        else:
            self._connected_at = None
            if connected_at is not None:
                self._in_step = now - connected_at >= self.hold  # only a connection that held resets
            if self._in_step:
                self._in_step = False
                wait = self._rng.uniform(0.0, self.cap)
            else:
                wait = self._last_attempt + self.cap - now
        return max(0.0, wait, self._last_attempt + self.floor - now)
