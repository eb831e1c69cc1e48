"""The page's bus tools: serial ports, a scan of a bus (start, progress, stop), and typed reads.

A view over the CLI's code: the scan is ``scan modbus``'s sweep and profile match, the read
``read modbus``'s, and their errors the same sentences. A port a running device polls is not
scanned (the scan would fight it for the bus); a read of it goes through that device's own
connection, taking its turn between polls.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.ui import bus_fields as fields
from agent.ui.bus_fields import FieldError
from agent.ui.scan_job import ScanJob, ScanRequest

log = logging.getLogger("agent.ui")

STOP_WAIT = 2.0  # seconds a stop waits for the sweep's thread (it ends before its next probe)
READ_TIMEOUT = 0.5  # seconds a read by port waits for its answer, unless told


def _answer(data: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(data, status, headers={"cache-control": "no-store"})


def _error(status: int, message: str) -> JSONResponse:
    return _answer({"error": message}, status)


def _real(path: str) -> str:
    return os.path.realpath(path)


def adapter_name(path: str) -> str:
    """What a ``/dev/serial/by-id`` name says of the adapter: ``usb-FTDI_FT232R_USB_UART_A10K-if00-port0``
    -> ``FTDI FT232R USB UART A10K``; other names say nothing."""
    name = os.path.basename(path)
    if "/serial/by-id/" not in path:
        return ""
    name = name.removeprefix("usb-").removeprefix("pci-")
    stem, _, tail = name.rpartition("-if")
    return (stem if stem and tail[:2].isdigit() else name).replace("_", " ")


class BusRoutes:
    """Ports, the gateway's one scan, and typed reads, for a logged-in technician."""

    def __init__(
        self,
        allowed: Callable[[Request], Any],
        read_json: Callable[[Request], Awaitable[dict[str, Any] | None]],
        devices: Callable[[], list[Any]],
    ) -> None:
        """``allowed``: the page's session check (a Response refuses); ``devices``: the site's device configs."""
        self._allowed = allowed
        self._json = read_json
        self._devices = devices
        self.job = ScanJob()

    def routes(self) -> list[Route]:
        """The bus tools' routes."""
        return [
            Route("/api/ports", self.ports),
            Route("/api/scan", self.scan_view),
            Route("/api/scan", self.scan_start, methods=["POST"]),
            Route("/api/scan/stop", self.scan_stop, methods=["POST"]),
            Route("/api/read", self.read, methods=["POST"]),
        ]

    # ---- who uses which port ---------------------------------------------------------------
    def _polling(self, port: str) -> list[Any]:
        """The enabled devices on ``port`` (the agent polls every enabled device)."""
        real = _real(port)
        return [d for d in self._devices() if d.enabled and getattr(d, "serial", None) is not None
                and _real(d.serial.port) == real]  # fmt: skip

    def _scanning(self, port: str) -> bool:
        request = self.job.request
        return self.job.busy and request is not None and _real(request.port) == _real(port)

    # ---- ports -----------------------------------------------------------------------------
    async def ports(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        return _answer({"ports": await asyncio.to_thread(self._ports)})

    def _ports(self) -> list[dict[str, Any]]:
        from agent.devices.ports import missing, port_problem, present_ports

        configured = [d for d in self._devices() if d.enabled and getattr(d, "serial", None) is not None]
        paths = present_ports()
        seen = {_real(p) for p in paths}
        for device in configured:  # a configured port that is not there is listed too: that is its fault
            if _real(device.serial.port) not in seen:
                paths.append(device.serial.port)
                seen.add(_real(device.serial.port))
        out = []
        for path in paths:
            users = [d.id for d in configured if _real(d.serial.port) == _real(path)]
            present = os.path.exists(path)
            if not present:
                problem: str | None = missing(path)
            elif users or self._scanning(path):
                problem = None  # held by this agent: a lock check would only find ourselves
            else:
                problem = port_problem(path)
            out.append({"path": path, "real": _real(path), "adapter": adapter_name(path), "present": present,
                        "devices": users, "scanning": self._scanning(path), "problem": problem})  # fmt: skip
        return out

    # ---- scan ------------------------------------------------------------------------------
    async def scan_view(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        return _answer(self.job.view())

    async def scan_start(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        body = await self._json(request)
        if body is None:
            return _error(400, "body: expected a JSON object")
        try:
            asked = _scan_request(body)
        except FieldError as exc:
            return _error(400, str(exc))
        if self.job.busy and self.job.request is not None:
            view = self.job.view()
            return _error(409, f"a scan of {view['port']} is running ({view['done']}/{view['total']} probes): "
                               "stop it first")  # fmt: skip
        if polling := self._polling(asked.port):
            names = ", ".join(d.id for d in polling)
            return _error(409, f"{asked.port} is polled by device {names}: disable it first (enabled: false in "
                               "the site file, then apply), then scan")  # fmt: skip
        from drivers.modbus.scan import PortUnusable, open_line

        self.job.reserve(asked)  # before the await: a second start meanwhile is refused
        try:
            line = await asyncio.to_thread(open_line, asked.port, asked.stopbits, asked.timeout)
        except PortUnusable as exc:
            self.job.release(str(exc))
            return _error(409, str(exc))
        self.job.start(line)
        log.info("ui: scan of %s (units %s) started by %s", asked.port, body.get("units", "1-247"),
                 getattr(allowed, "user", "?"))  # fmt: skip
        return _answer(self.job.view(), 202)

    async def scan_stop(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        if self.job.busy:
            self.job.stop()
            await asyncio.to_thread(self.job.join, STOP_WAIT)
        return _answer(self.job.view())

    # ---- typed read ------------------------------------------------------------------------
    async def read(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        body = await self._json(request)
        if body is None:
            return _error(400, "body: expected a JSON object")
        try:
            target = self._read_target(body)
            table, address, count = _registers(body)
        except FieldError as exc:
            return _error(400, str(exc))
        if isinstance(target, Response):
            return target
        config, unit = target
        from drivers.modbus.bus import POOL, ModbusReadError
        from drivers.modbus.typed_read import read_failure, read_registers, typed, where

        try:
            values = await read_registers(config, table, address, count, unit, POOL)
        except ModbusReadError as exc:
            return _error(502, read_failure(config, unit, exc))
        except ValueError as exc:  # the port is open with other settings for a device
            return _error(409, str(exc))
        setting = None
        if config.serial is not None:
            s = config.serial
            setting = f"{s.baudrate} {s.bytesize}{s.parity}{s.stopbits}"
        return _answer({"where": where(config), "setting": setting, "unit": unit, "table": table,
                        "address": address, "count": count, **typed(table, address, values)})  # fmt: skip

    def _read_target(self, body: dict[str, Any]) -> tuple[Any, int] | Response:
        """The connection config and unit a read goes to: a site device's, or a port's with the given settings."""
        from drivers.modbus.typed_read import port_config

        if ("device" in body) == ("port" in body):
            raise FieldError("port or device: give one of them (a serial port with its settings, or a device id)")
        if "device" in body:
            name = body["device"]
            if not isinstance(name, str) or not name:
                raise FieldError(f"device: expected a device id, got {name!r:.40}")
            device = next((d for d in self._devices() if d.id == name), None)
            if device is None:
                return _error(404, f"device: no device {name[:64]!r} in the site file")
            if device.driver != "modbus":
                raise FieldError(f"device: {name} uses the {device.driver} driver; typed reads are for modbus devices")
            return device, fields.integer(body, "unit", 0, 255, device.unit)
        port = fields.port(body)
        unit = fields.integer(body, "unit", 1, 247, 1)
        baud, parity = fields.baud(body, 9600) or 9600, fields.parity(body, "N") or "N"
        stop = fields.stopbits(body)
        timeout = fields.seconds(body, "timeout", 0.05, 5.0) or READ_TIMEOUT
        if self._scanning(port):
            return _error(409, f"{port}: a scan is running on it: stop the scan first")
        asked = f"{baud} 8{parity}{stop}"
        for device in self._polling(port):
            s = device.serial
            if (s.baudrate, s.parity, s.stopbits) != (baud, parity, stop):
                polled = f"{s.baudrate} 8{s.parity}{s.stopbits}"
                return _error(409, f"{port} is polled by device {device.id} at {polled}, not {asked}: "
                                   f"read it as device {device.id}, or disable it first")  # fmt: skip
            # The device's own connection: one open port, this read taking its turn between polls.
            return device, unit
        return port_config(port, unit, baud, parity, stop, timeout), unit


def _scan_request(body: dict[str, Any]) -> ScanRequest:
    expect = fields.optional_int(body, "expect", 1, 247)
    if fields.flag(body, "first"):
        expect = 1
    return ScanRequest(
        port=fields.port(body), baud=fields.baud(body, None), parity=fields.parity(body, None),
        stopbits=fields.stopbits(body), units=fields.units(body), expect=expect,
        timeout=fields.seconds(body, "timeout", 0.01, 2.0),
    )  # fmt: skip


def _registers(body: dict[str, Any]) -> tuple[str, int, int]:
    """(table, zero-based address, count): the address zero-based with ``table``, or a Modicon reference."""
    from drivers.modbus.config import parse_modicon
    from drivers.modbus.typed_read import MAX_COUNT

    given = body.get("address")
    table: str
    if isinstance(given, str):
        try:
            table, address = parse_modicon(given.strip())
        except ValueError as exc:
            raise FieldError(f"address: {exc}; or a zero-based number with table") from None
        if body.get("table") not in (None, table):
            raise FieldError(f"table: {given} is a {table} reference, not {body['table']}")
    else:
        table = fields.table(body)
        address = fields.integer(body, "address", 0, 65535)
    count = fields.integer(body, "count", 1, MAX_COUNT[table], 2)
    if address + count > 65536:
        raise FieldError(f"count: {count} from address {address} runs past 65535")
    return table, address, count
