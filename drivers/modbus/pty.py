"""A pseudo-terminal pair standing in for an RS-485 line: one end for the simulator, one for the agent.

It also rehearses wrong line settings. A pty carries bytes, not bits, so nothing garbles them
on their own; the relay between the two ends therefore looks at both ends' termios settings
and, when the simulator's (the meter's) differ from the client's, turns the answer into what a
UART at the client's setting makes of the meter's bit stream (:func:`heard_as`): at another
baud rate, a few wrong bytes; with a parity bit the client does not expect, NUL bytes where
the parity bit fell on a stop bit (a framing error, as Linux reports one without IGNPAR).

Speed is seen on both ends. Parity is not: the kernel refuses PARENB on a pty (EINVAL), so a
client on a pty is always at no parity, and the meter's parity is declared to the relay
(:attr:`PtyPair.meter_parity`, ``simulate modbus --parity E``). Requests pass unchanged: the
rehearsal shows the garbled answer a meter sends when it catches a request anyway.
"""

from __future__ import annotations

import contextlib
import os
import termios
import tty

_SPEEDS = {getattr(termios, f"B{n}"): n for n in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400)}


def heard_as(data: bytes, sent: tuple[int, str], heard: tuple[int, str]) -> bytes:
    """What a UART at ``heard`` (baud, parity) receives of ``data`` sent at ``sent``, 8 data bits, 1 stop bit."""
    bits: list[int] = []
    for byte in data:
        body = [(byte >> i) & 1 for i in range(8)]
        parity = [] if sent[1] == "N" else [(sum(body) + (sent[1] == "O")) % 2]
        bits += [0, *body, *parity, 1]
    tx, rx = 1.0 / sent[0], 1.0 / heard[0]

    def level(t: float) -> int:
        k = int(t / tx + 1e-9)
        return bits[k] if 0 <= k < len(bits) else 1

    edges = [k * tx for k in range(len(bits)) if bits[k] == 0 and (k == 0 or bits[k - 1] == 1)]
    stop_at = 1.5 + 8 + (heard[1] != "N")  # bit times from the start edge to the stop bit's middle
    out, after = bytearray(), -1.0
    for t0 in edges:
        if t0 <= after or level(t0 + 0.5 * rx) != 0:
            continue  # inside the last character, or a glitch rather than a start bit
        value = sum(level(t0 + (1.5 + i) * rx) << i for i in range(8))
        after = t0 + stop_at * rx
        out.append(value if level(after) == 1 else 0)  # a framing error reads as NUL
    return bytes(out)


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
        self.meter_parity = "N"  # the simulator's parity, which its end of the pty cannot hold
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
                if fd == self._m1:
                    data = self._as_heard(data)
                os.write(self._m2 if fd == self._m1 else self._m1, data)

    def _setting(self, slave: int) -> tuple[int, str]:
        attrs = termios.tcgetattr(slave)
        parity = "N" if not attrs[2] & termios.PARENB else "O" if attrs[2] & termios.PARODD else "E"
        return _SPEEDS.get(attrs[5], 0), parity

    def _as_heard(self, data: bytes) -> bytes:
        """The simulator's bytes as the client's UART would receive them."""
        try:
            meter = self._setting(self._fds[1])[0], self.meter_parity
            client = self._setting(self._fds[3])
        except termios.error:
            return data
        if meter == client or 0 in (meter[0], client[0]):
            return data
        return heard_as(data, meter, client)

    def close(self) -> None:
        """Stop relaying and close every end."""
        self._stop = True
        self._thread.join(timeout=1)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
