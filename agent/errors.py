"""The agent's small error taxonomy.

Each error says what the user can do about it; callers either log or raise, never both.
"""

from __future__ import annotations

from typing import Literal

WriteFailure = Literal["not_writable", "out_of_range", "bad_value", "timeout", "unavailable", "device_error"]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is invalid; fatal at load, refused on reload.

    Carries every problem found, so a technician fixes them in one pass.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DriverStartupError(AgentError):
    """A device could not be started (for example it is offline at boot).

    ``retry`` says whether the runtime should try again with backoff.
    """

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class DriverReadError(AgentError):
    """One poll of a device failed; the runtime counts it and keeps polling."""


class DriverWriteError(AgentError):
    """A write to a device point was refused or failed (the driver cannot write, or the device said no).

    ``kind`` says why, in words every uplink maps to its own codes (OPC UA status codes...):
    ``not_writable`` (the point, its type or the driver takes no writes), ``out_of_range`` (the
    value does not fit), ``bad_value`` (not a value of the point's kind), ``timeout`` (no answer:
    the device may or may not have applied it), ``unavailable`` (not running, not connected),
    ``device_error`` (the device refused or failed otherwise).
    """

    def __init__(self, message: str, kind: WriteFailure = "device_error") -> None:
        super().__init__(message)
        self.kind: WriteFailure = kind


class DriverFatalError(AgentError):
    """The driver cannot work with this device at all; the runtime stops it and reports it."""


class BufferError_(AgentError):
    """The store-and-forward buffer could not take or give events."""
