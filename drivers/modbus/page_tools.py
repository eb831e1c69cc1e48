"""The Modbus driver's bus tools for the technician page: ``scan modbus`` and ``read modbus``'s own code.

The page (core) reaches these through the plugin (agent/devices/bus_tools.py), never by import.
"""

from __future__ import annotations

import threading
from typing import Any

from agent.devices.bus_tools import BusError
from agent.devices.ports import port_problem
from drivers.modbus.rtu_line import RtuLine, SettingRefused, setting_name
from drivers.modbus.scan import PortUnusable, Progress, open_line, refused_note, settings, sweep


class ModbusScan:
    """One sweep of an RTU bus: the CLI's sweep, frequency-first, each hit matched to a profile."""

    def __init__(self, line: RtuLine, lines: dict[str, Any], units: list[int], expect: int | None) -> None:
        """``line``: the port, open; closed when :meth:`run` ends."""
        self.line = line
        self.baud: int | None = lines.get("baud")
        self.parity: str | None = lines.get("parity")
        self.stopbits = int(lines.get("stopbits") or 1)
        self.units = units
        self.expect = expect
        self.progress = Progress()
        self.error: str | None = None

    def run(self, stop: threading.Event) -> None:
        """Sweep until done or stopped; a failure becomes :attr:`error`, never a traceback."""
        port = self.line.port
        failure: BaseException | None = None
        try:
            for _hit in sweep(self.line, self.units, settings(self.baud, self.parity), ("holding", 0),
                              stopbits=self.stopbits, expect=self.expect, configure=self.line.configure,
                              progress=self.progress, stop=stop):  # fmt: skip
                pass  # each hit is in self.progress.found as soon as it is found
        except SettingRefused as exc:  # the one setting asked for
            self.error = port_problem(port, exc.error, exc.setting)
        except Exception as exc:  # an adapter pulled out mid-scan: in words, below
            failure = exc
        finally:
            self.line.close()
        if failure is not None:
            self.error = port_problem(port, failure) or f"{port}: {failure}"

    def view(self) -> dict[str, Any]:
        """Progress, hits, and what ended the sweep early (if anything)."""
        refused = list(self.progress.refused)
        asked = setting_name(self.baud, self.parity, self.stopbits) if self.baud and self.parity else None
        return self.progress.as_dict() | {
            "error": self.error,
            "asked": asked,
            "note": refused_note(self.line.port, refused) if refused else None,
        }


class ModbusBusTools:
    """Scan and typed read over Modbus RTU (reads also over TCP, through a site device)."""

    def open_scan(self, port: str, lines: dict[str, Any], units: list[int], expect: int | None) -> ModbusScan:
        """The port opened once for a sweep (missing, forbidden, busy: :class:`BusError` in ``scan``'s words)."""
        try:
            line = open_line(port, int(lines.get("stopbits") or 1), lines.get("timeout"))
        except PortUnusable as exc:
            raise BusError(str(exc), "port") from exc
        return ModbusScan(line, lines, units, expect)

    async def read(self, target: Any, unit: int, table: str, address: int, count: int) -> dict[str, Any]:
        """A typed read through the process's bus pool: a running device's connection is shared, taking turns."""
        from drivers.modbus.bus import POOL, ModbusReadError
        from drivers.modbus.config import ModbusConfig
        from drivers.modbus.typed_read import port_config, read_failure, read_registers, typed, where

        if isinstance(target, ModbusConfig):
            config = target
        else:
            config = port_config(target["port"], unit, target["baud"], target["parity"], target["stopbits"],
                                 target["timeout"])  # fmt: skip
        try:
            values = await read_registers(config, table, address, count, unit, POOL)
        except ModbusReadError as exc:
            raise BusError(read_failure(config, unit, exc), "device") from exc
        except ValueError as exc:  # the port is open for a device with other line settings
            raise BusError(str(exc), "port") from exc
        setting = None
        if config.serial is not None:
            s = config.serial
            setting = f"{s.baudrate} {s.bytesize}{s.parity}{s.stopbits}"
        return {"where": where(config), "setting": setting, "unit": unit, "table": table, "address": address,
                "count": count, **typed(table, address, values)}  # fmt: skip

    def parse_units(self, text: str) -> list[int]:
        """As ``--units``."""
        from drivers.modbus.tools import parse_units

        return parse_units(text)

    def parse_reference(self, text: str) -> tuple[str, int]:
        """As ``read --address 30001``."""
        from drivers.modbus.config import parse_modicon

        return parse_modicon(text)

    def max_count(self, table: str) -> int:
        """125 registers or 2000 bits (the protocol's limit for one request)."""
        from drivers.modbus.typed_read import MAX_COUNT

        return MAX_COUNT[table]
