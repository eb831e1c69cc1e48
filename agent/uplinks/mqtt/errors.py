"""Why a broker connection ended: the publish loop catches these and reconnects."""

from __future__ import annotations


class ConnectionLost(Exception):
    """The broker connection ended; the publish loop restarts after backoff."""


class Resend(ConnectionLost):
    """The uplink ends the connection itself to send messages whose PUBACK went missing."""
