"""systemd integration: readiness, status, stopping and the watchdog (``sd_notify``).

No dependency: the notify protocol is one datagram per message on the AF_UNIX socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). Without that variable
every call here is a no-op, so the agent runs the same outside systemd.

The watchdog pings (``WATCHDOG=1``, every ``$WATCHDOG_USEC``/2) come from a thread of their
own, and only while a check says the agent's loops are progressing (see
``Agent.stalls()``: the event loop's heartbeat, the buffer's commit thread, the uplink). A
stuck event loop cannot run the check's heartbeat, so the pings stop and systemd restarts
the service after ``WatchdogSec=``; a thread blocked on a dead disk does the same.

Example unit::

    [Service]
    Type=notify
    NotifyAccess=main
    WatchdogSec=30s
    ExecStart=/opt/edge-agent/bin/edge-agent run -c /etc/edge-agent/site.yaml
    Restart=on-failure
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not supported


class Notifier:
    """Sends ``sd_notify`` messages to systemd."""

    def __init__(self, address: str, *, watchdog_usec: int | None = None) -> None:
        """Use the socket at ``address`` (as found in ``$NOTIFY_SOCKET``)."""
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._lock = threading.Lock()
        self._failed_once = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier systemd asked for, or None when not run by systemd with ``Type=notify``."""
        env = os.environ if env is None else env
        address = _address(env.get("NOTIFY_SOCKET", ""))
        if address is None:
            return None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(address, watchdog_usec=usec)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the timeout), or None without a watchdog."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; never raises."""
        message = "\n".join(fields).encode()
        try:
            with self._lock:
                self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed_once:  # systemd gone or socket misconfigured: say it once
                self._failed_once = True
                log.warning("cannot notify systemd at %r: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=...``: one line shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        """``RELOADING=1`` (for ``Type=notify-reload``); send :meth:`ready` when done."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class Watchdog:
    """Pings systemd's watchdog from a thread, but only while ``check()`` finds no stall.

    ``check`` returns the stalls it found, part -> what is wrong (empty: healthy); it must be
    cheap and thread-safe.
    """

    def __init__(self, notifier: Notifier, interval: float, check: Callable[[], dict[str, str]]) -> None:
        """Prepare; :meth:`start` starts the thread."""
        self.notifier = notifier
        self.interval = interval
        self.check = check
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-watchdog", daemon=True)
        self._stalled: set[str] = set()

    def start(self) -> None:
        """Start pinging."""
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging (and wait for the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.interval + 1)

    def _run(self) -> None:
        while True:
            try:
                stalls = self.check()
            except Exception as exc:  # a broken check must not look healthy
                stalls = {"check": f"{type(exc).__name__}: {exc}"}
            if not stalls:
                if self._stalled:
                    log.warning("watchdog: progressing again, pinging systemd")
                self.notifier.watchdog()
                self.pings += 1
            elif set(stalls) != self._stalled:
                log.error(
                    "watchdog: not pinging systemd, which restarts the agent after WatchdogSec: %s",
                    "; ".join(f"{part}: {why}" for part, why in sorted(stalls.items())),
                )
            self._stalled = set(stalls)
            if self._stop.wait(self.interval):
                return
