"""Technician commands: ``edge-agent profiles``, ``scan modbus``, ``read modbus``, ``simulate modbus``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
import termios
from pathlib import Path
from typing import Any

from agent.devices.ports import port_problem
from drivers.modbus import profiles as profile_store

COMMON_BAUDS = (9600, 19200, 38400, 4800, 2400, 57600, 115200)
COMMON_PARITIES = ("N", "E", "O")


def profiles_main(argv: list[str]) -> int:
    """List the device profiles found (id, vendor, model, points, manual)."""
    parser = argparse.ArgumentParser(prog="edge-agent profiles", description=profiles_main.__doc__)
    parser.add_argument("--dir", type=Path, help="also look in this folder (as a site's profiles/ would)")
    args = parser.parse_args(argv)
    found = profile_store.available(args.dir.parent if args.dir else None)
    if not found:
        print("no profiles found in: " + ", ".join(map(str, profile_store.search_dirs())), file=sys.stderr)
        return 1
    print(f"{'PROFILE':<24} {'VENDOR':<18} {'MODEL':<26} {'POINTS':>6}  MANUAL")
    for name, path in sorted(found.items()):
        try:
            p = profile_store.load(name, args.dir.parent if args.dir else None)
        except profile_store.ProfileError as exc:
            print(f"{name:<24} BROKEN: {exc}")
            continue
        manual = p.get("manual") or {}
        cite = f"{manual.get('title', '?')} ({manual.get('revision', '?')})"
        print(f"{name:<24} {p.get('vendor', ''):<18} {p.get('model', ''):<26} {len(p['points']):>6}  {cite}")
        del path
    return 0


def _connection_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial port (RTU), e.g. /dev/ttyUSB0")
    where.add_argument("--host", help="TCP host (Modbus TCP), host or host:port")
    parser.add_argument("--rtu-over-tcp", action="store_true", help="RTU framing over TCP (serial gateways)")
    parser.add_argument("--baud", type=int, help="baud rate (RTU); scan tries common ones if omitted")
    parser.add_argument("--parity", choices=COMMON_PARITIES, help="parity (RTU); scan tries N, E, O if omitted")
    parser.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    parser.add_argument("--timeout", type=float, help="seconds to wait for an answer "
                        "(read: 0.3; scan: 35 ms turnaround + the answer's length)")  # fmt: skip


def _device(args: argparse.Namespace, unit: int, baud: int | None, parity: str | None, **extra: Any) -> Any:
    from drivers.modbus.config import ModbusConfig

    raw: dict[str, Any] = {"id": "cli", "driver": "modbus", "unit": unit, "timeout": args.timeout or 0.3, **extra}
    if args.port:
        raw |= {"transport": "rtu", "serial": {"port": args.port, "baudrate": baud or 9600,
                                               "parity": parity or "N", "stopbits": args.stopbits}}  # fmt: skip
    else:
        host, _, port = args.host.partition(":")
        raw |= {"transport": "rtu_over_tcp" if args.rtu_over_tcp else "tcp", "host": host, "port": int(port or 502)}
    raw.setdefault("points", [{"name": "probe", "table": "holding", "address": 0, "quantity": "counter"}])
    return ModbusConfig.model_validate(raw)


def scan_main(argv: list[str]) -> int:
    """Find which units answer (1-247 at 9600 baud in about 11 s), at which line setting, and their profiles."""
    from drivers.modbus import scan_cli

    parser = argparse.ArgumentParser(prog="edge-agent scan modbus", description=scan_main.__doc__)
    _connection_args(parser)
    scan_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        units = parse_units(args.units)
    except ValueError:
        parser.error(f"--units: expected ids 1-247 like 1-10 or 1,2,5, got {args.units!r}")
    return scan_cli.run_scan(args, units, lambda unit: _device(args, unit, args.baud, args.parity))


def parse_units(text: str) -> list[int]:
    """``1-10,15`` as unit ids. Raises ValueError outside 0..247 or when not numbers."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    if not out or not all(0 <= u <= 247 for u in out):
        raise ValueError(text)
    return out


def read_main(argv: list[str]) -> int:
    """One-shot read of registers, decoded: --address 30001 --count 10 --type float32."""
    from drivers.modbus.config import BIT_TABLES, TYPE_REGISTERS, parse_modicon

    parser = argparse.ArgumentParser(prog="edge-agent read modbus", description=read_main.__doc__)
    _connection_args(parser)
    parser.add_argument("--unit", type=int, default=1)
    parser.add_argument("--address", required=True,
                        help="Modicon number (30001 = input register 0, 40001 = holding 0) or a zero-based "
                             "address with --table")  # fmt: skip
    parser.add_argument("--table", choices=("holding", "input", "coil", "discrete"))
    parser.add_argument("--count", type=int, default=1, help="how many values")
    parser.add_argument("--type", default="uint16", choices=[*sorted(TYPE_REGISTERS), "string"])
    parser.add_argument("--byte-order", choices=("big", "little"), default="big")
    parser.add_argument("--word-order", choices=("big", "little"), default="big")
    args = parser.parse_args(argv)
    if args.table:
        table, address = args.table, int(args.address, 0)
    else:
        try:
            table, address = parse_modicon(args.address)
        except ValueError as exc:
            print(f"error: {exc}; or give --table with a zero-based address", file=sys.stderr)
            return 2
    if args.port and (problem := port_problem(args.port)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    kind = "bool" if table in BIT_TABLES else args.type
    width = 1 if table in BIT_TABLES else TYPE_REGISTERS.get(kind, args.count)
    points = [{"name": f"p{i}", "table": table, "address": address + i * width, "type": kind,
               "quantity": "counter", **({"length": args.count} if kind == "string" else {})}
              for i in range(1 if kind == "string" else args.count)]  # fmt: skip
    config = _device(args, args.unit, args.baud, args.parity, points=points,
                     byte_order=args.byte_order, word_order=args.word_order)  # fmt: skip
    return asyncio.run(_read(config, table, address, points))


async def _read(config: Any, table: str, address: int, points: list[dict[str, Any]]) -> int:
    from drivers.modbus.bus import ModbusReadError
    from drivers.modbus.driver import decode_point
    from drivers.modbus.typed_read import read_failure, read_registers

    span = max(p.address + p.registers for p in config.points) - address
    try:
        values = await read_registers(config, table, address, span, config.unit)
    except ModbusReadError as exc:
        print(f"error: {read_failure(config, config.unit, exc)}", file=sys.stderr)
        return 1
    print(f"{'ADDRESS':>8}  {'RAW':<24}  VALUE")
    for point in config.points:
        raw = values[point.address - address : point.address - address + point.registers]
        try:
            value: object = decode_point(point, values, address, config)
        except ValueError as exc:
            value = f"({exc})"
        print(f"{point.address:>8}  {' '.join(f'{int(r):04x}' for r in raw):<24}  {value}")
    del points
    return 0


def simulate_main(argv: list[str]) -> int:
    """Serve a profile's points with changing values on TCP or on a pseudo-terminal (RTU), as the meter would."""
    parser = argparse.ArgumentParser(prog="edge-agent simulate modbus", description=simulate_main.__doc__)
    parser.add_argument("--profile", required=True, help="profile id (edge-agent profiles)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="serve Modbus TCP, e.g. 127.0.0.1:5020")
    where.add_argument("--rtu", nargs="?", const="pty", metavar="PORT",
                       help="serve RTU on a serial port, or on a new pseudo-terminal (prints its path)")  # fmt: skip
    parser.add_argument("--units", default="1", help="unit ids to serve, e.g. 1-8")
    parser.add_argument("--baud", type=int, default=9600, help="the meter's baud rate (a client at another "
                        "rate on the pty gets garbled answers, as from a real meter)")  # fmt: skip
    parser.add_argument("--parity", choices=COMMON_PARITIES, default="N",
                        help="the meter's parity; on a pty (which has no parity bit) a client is at N, so E or O "
                             "rehearses a parity mismatch")  # fmt: skip
    parser.add_argument("--lenient", action="store_true", help="answer 0 for registers outside the profile "
                        "(default: exception 2, as meters do)")  # fmt: skip
    parser.add_argument("--garble", action="store_true",
                        help="corrupt every answer's CRC: what a wrong baud rate or parity looks like")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_simulate(args))
    except (OSError, termios.error) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            print(f"error: {args.tcp} is already in use", file=sys.stderr)
            return 1
        if args.rtu:
            setting = f"{args.baud} 8{args.parity}1"
            print(f"error: {port_problem(args.rtu, exc, setting) or exc}", file=sys.stderr)
            return 1
        raise


async def _simulate(args: argparse.Namespace) -> int:
    from drivers.modbus.config import PointConfig
    from drivers.modbus.simulator import SimulatedUnit, Simulator

    logging.getLogger("pymodbus").setLevel(logging.WARNING)  # not its "Server listening." on the technician's screen

    try:
        profile = profile_store.load(args.profile)
    except profile_store.ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    defaults = profile.get("defaults") or {}
    points = [PointConfig.model_validate(p) for p in profile["points"]]
    units = [SimulatedUnit(u, points, byte_order=defaults.get("byte_order", "big"), strict=not args.lenient,
                           word_order=defaults.get("word_order", "big")) for u in parse_units(args.units)]  # fmt: skip
    for unit in units:
        unit.faults.corrupt_crc = args.garble
    sim = Simulator(units, identity={"VendorName": str(profile.get("vendor", "")),
                                     "ProductCode": str(profile.get("model", ""))})  # fmt: skip
    keep: Any = None
    scan = f" --units {args.units} --add-to site.yaml"  # the command a technician rehearses next
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        await sim.serve_tcp(host or "127.0.0.1", int(port))
        print(f"serving {args.profile} units {args.units} on Modbus TCP {args.tcp}\n"
              f"next: edge-agent scan modbus --host {args.tcp}{scan}", flush=True)  # fmt: skip
    else:
        path, parity = args.rtu, args.parity
        if path == "pty":
            from drivers.modbus.pty import PtyPair

            keep = PtyPair()
            keep.meter_parity, parity = args.parity, "N"  # the pty refuses parity: the relay emulates it
            path = keep.device
            print(f"serving {args.profile} units {args.units} (RTU {args.baud} 8{args.parity}1) on {path}; "
                  f"point the agent at serial.port: {keep.client}\n"
                  f"next: edge-agent scan modbus --port {keep.client}{scan}", flush=True)  # fmt: skip
        await sim.serve_serial(path, baudrate=args.baud, parity=parity)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
        if keep is not None:
            keep.close()
    return 0
