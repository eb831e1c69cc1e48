"""A driver's bus tools for the technician page: scan a serial bus, read registers typed.

The page is core and never imports a driver; a driver that can scan and read offers these
through its plugin (``DriverPlugin.bus_tools``), built from the code of its own CLI commands,
so the page and ``edge-agent scan``/``read`` say the same things.
"""

from __future__ import annotations

import threading
from typing import Any, Literal, Protocol

Kind = Literal["field", "port", "device"]


class BusError(Exception):
    """What a bus tool could not do, in one line naming port, setting or unit, and the fix.

    ``kind``: ``field`` (a request field is wrong: the message starts with its name), ``port``
    (missing, forbidden, busy, a setting it refuses, in use), ``device`` (no answer, an
    exception response, a garbled answer).
    """

    def __init__(self, message: str, kind: Kind) -> None:
        super().__init__(message)
        self.kind: Kind = kind


class BusScan(Protocol):
    """One sweep of a bus, its port already open."""

    def run(self, stop: threading.Event) -> None:
        """Sweep until done or ``stop`` is set (checked before each probe); closes the port. Blocks."""

    def view(self) -> dict[str, Any]:
        """Progress so far: setting, unit, done, total, found (hits with profile and evidence),
        garbled, refused, and ``error`` (None, or why the sweep ended early)."""


class BusTools(Protocol):
    """A driver's scan and typed read."""

    def open_scan(self, port: str, lines: dict[str, Any], units: list[int], expect: int | None) -> BusScan:
        """A sweep of ``port`` with its port opened; ``lines``: baud, parity (None: the likely ones),
        stopbits, timeout (None: the driver's own wait).

        Raises:
            BusError: the port cannot be used (kind ``port``), in the words of ``scan``.
        """

    async def read(self, target: Any, unit: int, table: str, address: int, count: int) -> dict[str, Any]:
        """A typed read: ``target`` is a device config of this driver, or ``{port, baud, parity,
        stopbits, timeout}``. Returns where, setting, registers (pdu, reference, hex, value) and
        pairs (every 32-bit order).

        Raises:
            BusError: kind ``port`` (in use with other settings), ``device`` (timeout, exception, ...).
        """

    def parse_units(self, text: str) -> list[int]:
        """``1-10,15`` as unit ids; raises ValueError."""

    def parse_reference(self, text: str) -> tuple[str, int]:
        """A 1-based reference (``30001``) as (table, zero-based address); raises ValueError naming it."""

    def max_count(self, table: str) -> int:
        """The most registers (or bits) of ``table`` one read may ask for."""
