"""The page's bus tools: serial ports, a scan of a bus (start, progress, stop), and typed reads.

A view over the CLI's code, reached through the driver's plugin (``bus_tools``): the scan is
``scan modbus``'s sweep and profile match, the read ``read modbus``'s, and their errors the
same sentences. A port a running device polls is not
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
from starlette.responses import Response
from starlette.routing import Route

from agent.devices.bus_tools import BusError, BusTools
from agent.devices.registry import load_plugins
from agent.ui import bus_fields as fields
from agent.ui.answer import answer, error
from agent.ui.bus_fields import FieldError
from agent.ui.scan_job import ScanJob, ScanRequest

log = logging.getLogger("agent.ui")

STATUS = {"field": 400, "port": 409, "device": 502}  # of a BusError's kind
STOP_WAIT = 2.0  # seconds a stop waits for the sweep's thread (it ends before its next probe)
READ_TIMEOUT = 0.5  # seconds a read by port waits for its answer, unless told


def bus_tools(driver: str | None = None) -> BusTools | None:
    """``driver``'s bus tools, or (None) the first installed driver's that has them."""
    for name, plugin in load_plugins().items():
        if plugin.bus_tools is not None and driver in (None, name):
            return plugin.bus_tools()
    return None


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
        return answer({"ports": await asyncio.to_thread(self._ports)})

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
        return answer(self.job.view())

    async def scan_start(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        body = await self._json(request)
        if body is None:
            return error(400, "body: expected a JSON object")
        tools = bus_tools()
        if tools is None:
            return error(501, "no installed driver scans a serial bus (the modbus driver does)")
        try:
            asked = _scan_request(body, tools)
        except FieldError as exc:
            return error(400, str(exc))
        if self.job.busy and self.job.request is not None:
            view = self.job.view()
            return error(409, f"a scan of {view['port']} is running ({view['done']}/{view['total']} probes): "
                               "stop it first")  # fmt: skip
        if polling := self._polling(asked.port):
            names = ", ".join(d.id for d in polling)
            return error(409, f"{asked.port} is polled by device {names}: disable it first (enabled: false in "
                               "the site file, then apply), then scan")  # fmt: skip
        self.job.reserve(asked)  # before the await: a second start meanwhile is refused
        try:
            scan = await asyncio.to_thread(tools.open_scan, asked.port, asked.lines, asked.units, asked.expect)
        except BusError as exc:
            self.job.release(str(exc))
            return error(STATUS[exc.kind], str(exc))
        self.job.start(scan)
        log.info("ui: scan of %s (units %s) started by %s", asked.port, str(body.get("units", "1-247"))[:40],
                 getattr(allowed, "user", "?"))  # fmt: skip
        return answer(self.job.view(), 202)

    async def scan_stop(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        if self.job.busy:
            self.job.stop()
            await asyncio.to_thread(self.job.join, STOP_WAIT)
        return answer(self.job.view())

    # ---- typed read ------------------------------------------------------------------------
    async def read(self, request: Request) -> Response:
        allowed = self._allowed(request)
        if isinstance(allowed, Response):
            return allowed
        body = await self._json(request)
        if body is None:
            return error(400, "body: expected a JSON object")
        try:
            target = self._read_target(body)
            if isinstance(target, Response):
                return target
            tools, config, unit = target
            table, address, count = _registers(body, tools)
            return answer(await tools.read(config, unit, table, address, count))
        except FieldError as exc:
            return error(400, str(exc))
        except BusError as exc:
            return error(STATUS[exc.kind], str(exc))

    def _read_target(self, body: dict[str, Any]) -> tuple[BusTools, Any, int] | Response:
        """The tools, the connection (a site device's config, or a port's settings) and the unit a read goes to."""
        if ("device" in body) == ("port" in body):
            raise FieldError("port or device: give one of them (a serial port with its settings, or a device id)")
        if "device" in body:
            name = body["device"]
            if not isinstance(name, str) or not name:
                raise FieldError(f"device: expected a device id, got {name!r:.40}")
            device = next((d for d in self._devices() if d.id == name), None)
            if device is None:
                return error(404, f"device: no device {name[:64]!r} in the site file")
            tools = bus_tools(device.driver)
            if tools is None:
                raise FieldError(f"device: {name} uses the {device.driver} driver, which has no typed reads")
            return tools, device, fields.integer(body, "unit", 0, 255, getattr(device, "unit", 1))
        tools = bus_tools()
        if tools is None:
            return error(501, "no installed driver reads a serial port (the modbus driver does)")
        port = fields.port(body)
        unit = fields.integer(body, "unit", 1, 247, 1)
        baud, parity = fields.baud(body, 9600) or 9600, fields.parity(body, "N") or "N"
        stop = fields.stopbits(body)
        timeout = fields.seconds(body, "timeout", 0.05, 5.0) or READ_TIMEOUT
        if self._scanning(port):
            return error(409, f"{port}: a scan is running on it: stop the scan first")
        asked = f"{baud} 8{parity}{stop}"
        for device in self._polling(port):
            s = device.serial
            if (s.baudrate, s.parity, s.stopbits) != (baud, parity, stop):
                polled = f"{s.baudrate} 8{s.parity}{s.stopbits}"
                return error(409, f"{port} is polled by device {device.id} at {polled}, not {asked}: "
                                   f"read it as device {device.id}, or disable it first")  # fmt: skip
            # The device's own connection: one open port, this read taking its turn between polls.
            return bus_tools(device.driver) or tools, device, unit
        return tools, {"port": port, "baud": baud, "parity": parity, "stopbits": stop, "timeout": timeout}, unit


def _scan_request(body: dict[str, Any], tools: BusTools) -> ScanRequest:
    expect = fields.optional_int(body, "expect", 1, 247)
    if fields.flag(body, "first"):
        expect = 1
    lines = {"baud": fields.baud(body, None), "parity": fields.parity(body, None), "stopbits": fields.stopbits(body),
             "timeout": fields.seconds(body, "timeout", 0.01, 2.0)}  # fmt: skip
    return ScanRequest(port=fields.port(body), lines=lines, units=fields.units(body, tools.parse_units), expect=expect)


def _registers(body: dict[str, Any], tools: BusTools) -> tuple[str, int, int]:
    """(table, zero-based address, count): the address zero-based with ``table``, or a Modicon reference."""
    given = body.get("address")
    table: str
    if isinstance(given, str):
        try:
            table, address = tools.parse_reference(given.strip())
        except ValueError as exc:
            raise FieldError(f"address: {exc}; or a zero-based number with table") from None
        if body.get("table") not in (None, table):
            raise FieldError(f"table: {given} is a {table} reference, not {body['table']}")
    else:
        table = fields.table(body)
        address = fields.integer(body, "address", 0, 65535)
    count = fields.integer(body, "count", 1, tools.max_count(table), 2)
    if address + count > 65536:
        raise FieldError(f"count: {count} from address {address} runs past 65535")
    return table, address, count
