"""The page's bus scan: one at a time per gateway, the driver's sweep in a thread, stoppable.

The sweep blocks (it waits on the line for each unit), so it runs in a thread of its own and
the agent's loop polls on. The port is opened before the thread starts (a port that cannot be
used is refused at once, in words) and closed by the sweep when it ends, however it ends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.devices.bus_tools import BusScan


@dataclass(frozen=True)
class ScanRequest:
    """What to sweep: the port, the line settings (baud/parity None: the likely ones), units, when to stop."""

    port: str
    lines: dict[str, Any]
    units: list[int]
    expect: int | None


class ScanJob:
    """The gateway's one scan: reserved, running in its thread, then finished with its hits kept."""

    def __init__(self) -> None:
        """No scan yet."""
        self.request: ScanRequest | None = None
        self.state = "idle"  # idle, opening, running, done, stopped, failed
        self.error: str | None = None
        self._scan: BusScan | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._ended = 0.0

    @property
    def busy(self) -> bool:
        """Whether a scan holds (or is about to hold) its port."""
        return self.state in ("opening", "running")

    def reserve(self, request: ScanRequest) -> None:
        """Claim the gateway's one scan before the port is opened (a second start meanwhile is refused)."""
        self.request, self.state, self.error, self._scan = request, "opening", None, None
        self._stop = threading.Event()
        self._started, self._ended = time.monotonic(), 0.0

    def release(self, error: str) -> None:
        """The port did not open: nothing ran."""
        self.state, self.error, self._ended = "failed", error, time.monotonic()

    def start(self, scan: BusScan) -> None:
        """Run ``scan`` (its port open) in a thread."""
        self._scan, self.state = scan, "running"
        self._thread = threading.Thread(target=self._run, args=(scan,), name="ui-scan", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the sweep before its next probe; the hits so far are kept."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the sweep to end; whether it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def _run(self, scan: BusScan) -> None:
        try:
            scan.run(self._stop)
            self.error = scan.view().get("error")
        except Exception as exc:  # a driver's bug must not leave the job running for ever
            self.error = f"the scan failed: {exc}"
        self.state = "failed" if self.error else "stopped" if self._stop.is_set() else "done"
        self._ended = time.monotonic()

    def view(self) -> dict[str, Any]:
        """Where the scan is: state, setting, unit, done/total, hits with their profiles, garbled, refused."""
        out: dict[str, Any] = {"setting": "-", "unit": 0, "done": 0, "total": 0, "found": [], "garbled": 0,
                               "refused": [], "note": None}  # fmt: skip
        if self._scan is not None:
            out |= self._scan.view()
        out |= {"state": self.state, "error": self.error}
        request = self.request
        if request is not None:
            end = self._ended or time.monotonic()
            out |= {"port": request.port, "count": len(request.units), "elapsed_s": round(end - self._started, 1)}
        return out
