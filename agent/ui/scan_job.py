"""The page's bus scan: one at a time per gateway, the CLI's sweep in a thread, stoppable.

The sweep blocks (it waits on the line for each unit), so it runs in a thread of its own and
the agent's loop polls on. The port is opened once, before the thread starts (so a port that
cannot be used is refused at once, in words), and closed when the sweep ends, however it ends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.devices.ports import port_problem
from drivers.modbus.rtu_line import RtuLine, SettingRefused, setting_name
from drivers.modbus.scan import Progress, refused_note, settings, sweep


@dataclass(frozen=True)
class ScanRequest:
    """What to sweep: the port, the settings to try (None: the likely ones), the units, when to stop."""

    port: str
    baud: int | None
    parity: str | None
    stopbits: int
    units: list[int]
    expect: int | None
    timeout: float | None
    table: str = "holding"
    address: int = 0


class ScanJob:
    """The gateway's one scan: reserved, running in its thread, then finished with its hits kept."""

    def __init__(self) -> None:
        """No scan yet."""
        self.request: ScanRequest | None = None
        self.state = "idle"  # idle, opening, running, done, stopped, failed
        self.progress = Progress()
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._ended = 0.0

    @property
    def busy(self) -> bool:
        """Whether a scan holds (or is about to hold) its port."""
        return self.state in ("opening", "running")

    def reserve(self, request: ScanRequest) -> None:
        """Claim the gateway's one scan before the port is opened (a second start meanwhile is refused)."""
        self.request, self.state, self.error = request, "opening", None
        self.progress = Progress()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._ended = 0.0

    def release(self, error: str) -> None:
        """The port did not open: nothing ran."""
        self.state, self.error, self._ended = "failed", error, time.monotonic()

    def start(self, line: RtuLine) -> None:
        """Sweep on ``line`` (opened for this request) in a thread; the thread closes it."""
        self.state = "running"
        self._thread = threading.Thread(target=self._run, args=(line,), name="ui-scan", daemon=True)
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

    def _run(self, line: RtuLine) -> None:
        request = self.request
        assert request is not None
        expect = request.expect
        failure: BaseException | None = None
        refused: SettingRefused | None = None
        try:
            lines = settings(request.baud, request.parity)
            probe = (request.table, request.address)
            for _hit in sweep(line, request.units, lines, probe, stopbits=request.stopbits, expect=expect,
                              configure=line.configure, progress=self.progress, stop=self._stop):  # fmt: skip
                pass  # each hit is in self.progress.found as soon as it is found
        except SettingRefused as exc:
            refused = exc
        except Exception as exc:  # an adapter pulled out mid-scan: said in words below, never a traceback
            failure = exc
        finally:
            line.close()
        if refused is not None:
            self.error = port_problem(request.port, refused.error, refused.setting)
        elif failure is not None:
            self.error = port_problem(request.port, failure) or f"{request.port}: {failure}"
        self.state = "failed" if self.error else "stopped" if self._stop.is_set() else "done"
        self._ended = time.monotonic()

    def view(self) -> dict[str, Any]:
        """Where the scan is: state, setting, unit, done/total, hits with their profiles, garbled, refused."""
        request = self.request
        out: dict[str, Any] = {"state": self.state, "error": self.error} | self.progress.as_dict()
        if request is None:
            return out
        end = self._ended or time.monotonic()
        refused = self.progress.refused
        out |= {"port": request.port, "units": f"{request.units[0]}-{request.units[-1]}",
                "count": len(request.units), "elapsed_s": round(end - self._started, 1),
                "note": refused_note(request.port, refused) if refused else None}  # fmt: skip
        if request.baud is not None and request.parity is not None:
            out["asked"] = setting_name(request.baud, request.parity, request.stopbits)
        return out
