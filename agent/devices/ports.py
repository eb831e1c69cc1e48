"""Why a local port (an RS-485 adapter, a pseudo-terminal) cannot be used, in the words every tool shares.

``edge-agent read``/``scan``, the running agent (its first failed connect) and ``edge-agent
doctor`` all print these sentences, so a technician meets one cause and one fix whichever
tool he ran first.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
from contextlib import suppress
from pathlib import Path

BY_ID = Path("/dev/serial/by-id")
PTY_MAJORS = range(136, 144)  # Unix98 pseudo-terminal slaves (/dev/pts/N)


def present_ports() -> list[str]:
    """Serial adapters present, by their stable names first (``/dev/serial/by-id``), else by tty name."""
    for pattern in ("dev/serial/by-id/*", "dev/ttyUSB*", "dev/ttyACM*"):
        found = sorted(str(f) for f in Path("/").glob(pattern))
        if found:
            return found
    return []


def missing(port: str) -> str:
    """The sentence for a port that does not exist, listing the adapters that do."""
    present = present_ports()
    hint = f"adapters present: {', '.join(present)}" if present else "is the USB adapter plugged in? (none present)"
    return f"serial port {port} not found; {hint}"


def port_holders(path: str) -> list[str]:
    """Other processes holding ``path`` open, as ``pid N (command line)``; [] if none (or not visible)."""
    real = os.path.realpath(path)
    holders = []
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with suppress(OSError):
                if os.readlink(fd) == real:
                    with suppress(OSError):
                        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        holders.append(f"pid {proc.name} ({command.strip()[:80]})")
                    break
    return holders


def is_pty(port: str) -> bool:
    """Whether ``port`` is a pseudo-terminal (which has no parity bit and no real baud rate)."""
    try:
        return os.major(os.stat(port).st_rdev) in PTY_MAJORS
    except OSError:
        return False


def _locked(port: str) -> bool:
    """Whether another process holds ``port``'s exclusive lock (pyserial's ``exclusive``, as pymodbus opens it)."""
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return exc.errno == errno.EBUSY  # TIOCEXCL: a terminal opened exclusively
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our lock too
    return False


def port_problem(port: str, error: BaseException | None = None, setting: str | None = None) -> str | None:
    """A specific reason, with its fix, why ``port`` cannot be used; None if nothing is found wrong.

    ``error`` is what opening it raised, if anything; ``setting`` the line settings asked of it
    (``9600 8E1``), named when the port refuses them.
    """
    if not os.path.exists(port):
        return missing(port)
    if not os.access(port, os.R_OK | os.W_OK):
        group = grp.getgrgid(os.stat(port).st_gid).gr_name
        user = pwd.getpwuid(os.geteuid()).pw_name
        return (f"permission denied on {port}: it belongs to group '{group}'; "
                f"run: sudo usermod -aG {group} {user} (then log in again, or restart the service)")  # fmt: skip
    if _errno(error) == errno.EINVAL:  # before the lock check: the caller may hold the port itself
        what = setting or "these line settings"
        why = ("a pseudo-terminal has no parity bit: use parity N on it (the simulator rehearses parity)"
               if is_pty(port) else "use settings the adapter supports (serial.baudrate, serial.parity)")  # fmt: skip
        return f"{port} refuses {what} (invalid argument); {why}"
    if _locked(port):
        holders = port_holders(port)
        who = f": open in {'; '.join(holders)}" if holders else ""
        return f"{port} is busy{who}; stop that process (the agent: systemctl stop edge-agent), then try again"
    if error is not None:
        return f"cannot open {port}: {_text(error)}"
    return None


def _errno(error: BaseException | None) -> int | None:
    """The errno of an OSError, or of a ``termios.error`` (a bare ``(errno, text)`` tuple)."""
    if error is None:
        return None
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    args = getattr(error, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return _errno(error.__cause__ or error.__context__) if (error.__cause__ or error.__context__) else None


def _text(error: BaseException) -> str:
    args: tuple[object, ...] = tuple(getattr(error, "args", ()))
    if len(args) == 2 and isinstance(args[0], int):
        return str(args[1])
    return str(error) or type(error).__name__
