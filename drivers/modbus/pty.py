"""A pseudo-terminal pair standing in for an RS-485 line: one end for the simulator, one for the agent."""

from __future__ import annotations

import contextlib
import os
import tty


class PtyPair:
    """Two linked serial-like devices. ``device`` is the simulator's end, ``client`` the agent's.

    Both sides open a path with pyserial, and a pty's master end has no path; so two ptys are
    joined by a thread relaying bytes between their masters.
    """

    def __init__(self) -> None:
        """Create both ptys (raw mode) and start relaying."""
        import threading

        self._fds: list[int] = []
        ends = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            tty.setraw(master)
            self._fds += [master, slave]
            ends.append((master, os.ttyname(slave)))
        (self._m1, self.device), (self._m2, self.client) = ends
        self._stop = False
        self._thread = threading.Thread(target=self._relay, name="pty-relay", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        import select

        while not self._stop:
            ready, _, _ = select.select([self._m1, self._m2], [], [], 0.1)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                os.write(self._m2 if fd == self._m1 else self._m1, data)

    def close(self) -> None:
        """Stop relaying and close every end."""
        self._stop = True
        self._thread.join(timeout=1)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
