"""The system clock as systemd-timedated sees it, and setting it through timedated.

The agent never sets the clock itself: its unit has ``ProtectClock=yes`` and no capabilities.
It asks systemd-timedated over the system bus (``org.freedesktop.timedate1.SetTime``), which a
polkit rule allows the service user (systemd/install.sh installs it). jeepney speaks D-Bus in
pure Python, blocking: every call here runs in a worker thread with a timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from agent.observability.clock import kernel_clock_sync

TIMEDATED = "org.freedesktop.timedate1"
TIMEDATED_PATH = "/org/freedesktop/timedate1"
THRESHOLD_S = 2.0  # the page offers to set the clock only when it is further off than this

SYNCED = "the clock is synchronised to network time: it is not set by hand (network time keeps it right)"
NTP_ON = (
    "automatic time sync (NTP) is on, and systemd-timedated refuses to set the time while it is. "
    "Either let the gateway reach an NTP server (UDP port 123), or on the gateway run "
    "'sudo timedatectl set-ntp false', set the clock here, then 'sudo timedatectl set-ntp true' "
    "once it can reach one"
)
POLKIT = (
    "the gateway did not allow the agent to set the time ({name}): install the polkit rule "
    "/etc/polkit-1/rules.d/50-edge-agent.rules (systemd/install.sh does; docs/install.md)"
)
_AUTH_ERRORS = (
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    "org.freedesktop.PolicyKit1.Error.NotAuthorized",
)


class ClockError(Exception):
    """Setting the clock failed; ``status`` is the HTTP status the page answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ClockState:
    """What decides whether the page may offer to set the clock."""

    timedated: bool  # reachable on the system bus
    ntp: bool | None  # automatic time sync on (None: unknown)
    synchronised: bool | None
    how: str  # where ``synchronised`` came from, or why timedated is not reachable

    def refusal(self) -> tuple[int, str] | None:
        """Why the clock cannot be set from the page (HTTP status, words), or None."""
        if self.synchronised:
            return 409, SYNCED
        if not self.timedated:
            return 503, (
                f"systemd-timedated is not reachable ({self.how}): set the time on the gateway itself "
                "(sudo timedatectl set-time 'YYYY-MM-DD HH:MM:SS', or date -s)"
            )
        if self.ntp is not False:
            return 409, NTP_ON
        return None


def _call(member: str, signature: str | None, body: tuple[Any, ...], timeout: float, interface: str) -> Any:
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import unwrap_msg

    address = DBusAddress(TIMEDATED_PATH, bus_name=TIMEDATED, interface=interface)
    with open_dbus_connection(bus="SYSTEM", auth_timeout=timeout) as connection:
        reply = connection.send_and_get_reply(new_method_call(address, member, signature, body), timeout=timeout)
    return unwrap_msg(reply)


def read_state(timeout: float) -> ClockState:
    """timedated's NTP and NTPSynchronized (blocking); the kernel's word on sync without timedated."""
    from jeepney.wrappers import DBusErrorResponse

    try:
        (found,) = _call("GetAll", "s", (TIMEDATED,), timeout, "org.freedesktop.DBus.Properties")
    except DBusErrorResponse as exc:
        return _without_timedated(f"{exc.name}")
    except (OSError, ValueError, KeyError) as exc:  # no bus socket, refused, timed out, a bad bus address
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return _without_timedated(f"the system bus {_bus_address()}: {reason}")
    values = {name: value for name, (_signature, value) in found.items()}
    ntp, synced = values.get("NTP"), values.get("NTPSynchronized")
    return ClockState(
        timedated=True,
        ntp=ntp if isinstance(ntp, bool) else None,
        synchronised=synced if isinstance(synced, bool) else None,
        how=f"timedated: NTP={ntp}, NTPSynchronized={synced}",
    )


def _bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "unix:path=/run/dbus/system_bus_socket"


def _without_timedated(why: str) -> ClockState:
    kernel = kernel_clock_sync()
    return ClockState(timedated=False, ntp=None, synchronised=kernel[0] if kernel else None, how=why)


def set_time(usec_utc: int, timeout: float) -> None:
    """SetTime(usec_utc, relative=false, interactive=false) on timedated (blocking); ClockError if refused."""
    from jeepney.wrappers import DBusErrorResponse

    try:
        _call("SetTime", "xbb", (usec_utc, False, False), timeout, TIMEDATED)
    except DBusErrorResponse as exc:
        name = str(exc.name)
        if name.endswith("AutomaticTimeSyncEnabled"):
            raise ClockError(409, NTP_ON) from exc
        if name in _AUTH_ERRORS:
            raise ClockError(403, POLKIT.format(name=name)) from exc
        detail = exc.data[0] if exc.data and isinstance(exc.data[0], str) else ""
        raise ClockError(502, f"systemd-timedated refused: {name} {detail}".strip()) from exc
    except (OSError, ValueError) as exc:
        raise ClockError(503, f"systemd-timedated did not answer: {exc}") from exc
