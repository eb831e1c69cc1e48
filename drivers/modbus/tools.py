"""Technician commands: ``edge-agent profiles``, ``scan modbus``, ``read modbus``, ``simulate modbus``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import grp
import os
import sys
from pathlib import Path
from typing import Any

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


def _port_problem(port: str) -> str | None:
    """A specific, actionable reason why ``port`` cannot be opened, or None."""
    if not os.path.exists(port):
        by_id = sorted(Path("/dev/serial/by-id").glob("*")) if Path("/dev/serial/by-id").is_dir() else []
        hint = f"; adapters present: {', '.join(map(str, by_id))}" if by_id else "; is the USB adapter plugged in?"
        return f"serial port {port} not found{hint}"
    if not os.access(port, os.R_OK | os.W_OK):
        group = grp.getgrgid(os.stat(port).st_gid).gr_name
        return (f"permission denied on {port}: it belongs to group '{group}'; "
                f"run: sudo usermod -aG {group} $USER (then log in again)")  # fmt: skip
    return None


def _connection_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial port (RTU), e.g. /dev/ttyUSB0")
    where.add_argument("--host", help="TCP host (Modbus TCP), host or host:port")
    parser.add_argument("--rtu-over-tcp", action="store_true", help="RTU framing over TCP (serial gateways)")
    parser.add_argument("--baud", type=int, help="baud rate (RTU); scan tries common ones if omitted")
    parser.add_argument("--parity", choices=COMMON_PARITIES, help="parity (RTU); scan tries N, E, O if omitted")
    parser.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    parser.add_argument("--timeout", type=float, default=0.3, help="seconds per request")


def _device(args: argparse.Namespace, unit: int, baud: int | None, parity: str | None, **extra: Any) -> Any:
    from drivers.modbus.config import ModbusConfig

    raw: dict[str, Any] = {"id": "cli", "driver": "modbus", "unit": unit, "timeout": args.timeout, **extra}
    if args.port:
        raw |= {"transport": "rtu", "serial": {"port": args.port, "baudrate": baud or 9600,
                                               "parity": parity or "N", "stopbits": args.stopbits}}  # fmt: skip
    else:
        host, _, port = args.host.partition(":")
        raw |= {"transport": "rtu_over_tcp" if args.rtu_over_tcp else "tcp", "host": host, "port": int(port or 502)}
    raw.setdefault("points", [{"name": "probe", "table": "holding", "address": 0, "quantity": "counter"}])
    return ModbusConfig.model_validate(raw)


async def _probe(config: Any, table: str, address: int) -> str:
    """'ok', 'exception N' (it answered), or the failure reason."""
    from drivers.modbus.bus import BusPool, ModbusReadError

    pool = BusPool()
    bus = pool.acquire(config)
    try:
        await bus.read(table, address, 1, config.unit)
    except ModbusReadError as exc:
        return exc.reason
    finally:
        pool.release(bus)
    return "ok"


def scan_main(argv: list[str]) -> int:
    """Find which unit ids answer, trying common baud rates and parities on a serial port."""
    parser = argparse.ArgumentParser(prog="edge-agent scan modbus", description=scan_main.__doc__)
    _connection_args(parser)
    parser.add_argument("--units", default="1-247", help="unit ids to try, e.g. 1-10 or 1,2,5")
    parser.add_argument("--table", default="holding", choices=("holding", "input", "coil", "discrete"))
    parser.add_argument("--address", type=int, default=0, help="register to probe (zero-based)")
    args = parser.parse_args(argv)
    units = _units(args.units)
    if args.port and (problem := _port_problem(args.port)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    lines = ([(b, p) for b in ([args.baud] if args.baud else COMMON_BAUDS)
              for p in ([args.parity] if args.parity else COMMON_PARITIES)]
             if args.port else [(None, None)])  # fmt: skip
    found: list[tuple[int, int | None, str | None, str]] = []
    garbled = 0
    for baud, parity in lines:
        for unit in units:
            verdict = asyncio.run(_probe(_device(args, unit, baud, parity), args.table, args.address))
            if verdict == "ok" or verdict.startswith("exception"):
                found.append((unit, baud, parity, verdict))
            elif verdict.startswith("garbled"):
                garbled += 1
            elif verdict.startswith("cannot connect") and not args.port:
                print(f"error: {verdict}", file=sys.stderr)
                return 1
        if found and args.port:
            break  # one line setting answers; other settings would only garble
    if not found:
        hint = ""
        if garbled:
            hint = (f" ({garbled} garbled answers: wrong parity or baud rate suspected; "
                    "check the device's settings and A/B wiring)")  # fmt: skip
        print(f"nothing answers on {args.port or args.host}{hint}", file=sys.stderr)
        return 1
    print(f"{'UNIT':>4}  {'BAUD':>6}  {'PARITY':<6}  ANSWER")
    for unit, baud, parity, verdict in found:
        print(f"{unit:>4}  {baud or '-':>6}  {parity or '-':<6}  {verdict}")
    return 0


def _units(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
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
    if args.port and (problem := _port_problem(args.port)):
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
    from drivers.modbus.bus import BusPool, ModbusReadError
    from drivers.modbus.driver import decode_point

    span = max(p.address + p.registers for p in config.points) - address
    pool = BusPool()
    bus = pool.acquire(config)
    try:
        values = await bus.read(table, address, span, config.unit)
    except ModbusReadError as exc:
        where = config.serial.port if config.serial else f"{config.host}:{config.port}"
        print(f"error: unit {config.unit} at {where}: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        pool.release(bus)
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
    """Serve a profile's points with changing values on TCP or on a pseudo-terminal (RTU)."""
    parser = argparse.ArgumentParser(prog="edge-agent simulate modbus", description=simulate_main.__doc__)
    parser.add_argument("--profile", required=True, help="profile id (edge-agent profiles)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="serve Modbus TCP, e.g. 127.0.0.1:5020")
    where.add_argument(
        "--rtu",
        nargs="?",
        const="pty",
        metavar="PORT",
        help="serve RTU on a serial port, or on a new pseudo-terminal (prints its path)",
    )
    parser.add_argument("--units", default="1", help="unit ids to serve, e.g. 1-8")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--garble", action="store_true",
                        help="corrupt every answer's CRC: what a wrong baud rate or parity looks like")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_simulate(args))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"error: {args.tcp} is already in use", file=sys.stderr)
            return 1
        raise


async def _simulate(args: argparse.Namespace) -> int:
    from drivers.modbus.config import PointConfig
    from drivers.modbus.simulator import SimulatedUnit, Simulator

    try:
        profile = profile_store.load(args.profile)
    except profile_store.ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    defaults = profile.get("defaults") or {}
    points = [PointConfig.model_validate(p) for p in profile["points"]]
    units = [SimulatedUnit(u, points, byte_order=defaults.get("byte_order", "big"),
                           word_order=defaults.get("word_order", "big")) for u in _units(args.units)]  # fmt: skip
    for unit in units:
        unit.faults.corrupt_crc = args.garble
    sim = Simulator(units)
    keep: Any = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        await sim.serve_tcp(host or "127.0.0.1", int(port))
        print(f"serving {args.profile} units {args.units} on Modbus TCP {args.tcp}", flush=True)
    else:
        path = args.rtu
        if path == "pty":
            from drivers.modbus.pty import PtyPair

            keep = PtyPair()
            path = keep.device
            print(f"serving {args.profile} units {args.units} (RTU) on {path}; point the agent at "
                  f"serial.port: {keep.client}", flush=True)  # fmt: skip
        await sim.serve_serial(path, baudrate=args.baud)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
        if keep is not None:
            keep.close()
    return 0
