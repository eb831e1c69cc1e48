"""``edge-agent scan modbus``: find the units on a bus, name their profiles, add them to a site file."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.devices.ports import port_problem
from drivers.modbus.rtu_line import Answer, RtuLine, SettingRefused
from drivers.modbus.scan import Hit, PortUnusable, Progress, open_line, refused_note, registers_answer, settings, sweep
from drivers.modbus.site_add import AddRefused, add_device, device_keys

DEFAULT_SITE = Path("/etc/edge-agent/site.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scan's own options (the connection's come from tools._connection_args)."""
    parser.add_argument("--units", default="1-247", help="unit ids to try, e.g. 1-10 or 1,2,5 (default 1-247)")
    parser.add_argument("--table", default="holding", choices=("holding", "input", "coil", "discrete"),
                        help="table probed (any answer counts, an exception too)")  # fmt: skip
    parser.add_argument("--address", type=int, default=0, help="register to probe (zero-based)")
    parser.add_argument("--first", action="store_true", help="stop at the first unit found")
    parser.add_argument("--expect", type=int, metavar="N", help="stop once N units are found")
    parser.add_argument("--add-to", type=Path, metavar="FILE", help="add each unit found with its profile to "
                        "this site file (validated, FILE.bak kept)")  # fmt: skip


class TcpProber:
    """Probes over Modbus TCP (or RTU over TCP): one connection for every unit."""

    def __init__(self, make_config: Any) -> None:
        """``make_config(unit)``: the device config the connection is opened with."""
        from drivers.modbus.bus import BusPool

        self.loop = asyncio.new_event_loop()
        self.pool = BusPool()

        async def acquire() -> Any:  # pymodbus makes its client inside a running loop
            return self.pool.acquire(make_config(1))

        self.bus = self.loop.run_until_complete(acquire())
        self.failure: str | None = None

    def read(self, unit: int, table: str, address: int, count: int) -> Answer:
        """One read through the shared connection."""
        from drivers.modbus.bus import ModbusReadError

        try:
            registers = self.loop.run_until_complete(self.bus.read(table, address, count, unit))
        except ModbusReadError as exc:
            if exc.link:
                self.failure = exc.reason
                raise
            if exc.exception_code is not None:
                return Answer(exc.reason)
            return Answer("garbled" if exc.garbled else "silent")
        return registers_answer([int(r) for r in registers])

    def identify(self, unit: int) -> dict[int, str] | None:
        """FC 43/14 through pymodbus, if the unit (or gateway) answers it."""
        try:
            response = self.loop.run_until_complete(
                self.bus.client.read_device_information(read_code=1, object_id=0, device_id=unit)
            )
        except Exception:  # no answer or a refusal: nothing to identify by
            return None
        if response.isError():
            return None
        return {int(k): bytes(v).decode("latin-1").strip() for k, v in response.information.items()}

    def close(self) -> None:
        """Close the connection and the loop."""
        self.pool.release(self.bus)
        self.loop.close()


def run_scan(args: argparse.Namespace, units: list[int], make_config: Any) -> int:
    """Sweep, print hits as found and progress each second, then add them and name the next command."""
    if args.first:
        args.expect = 1
    where = args.port or args.host
    prober: RtuLine | TcpProber
    try:
        prober = open_line(args.port, args.stopbits, args.timeout) if args.port else TcpProber(make_config)
    except PortUnusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = settings(args.baud, args.parity) if args.port else None
    state = Progress()
    started = time.monotonic()
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(state, stop, started, where), daemon=True)
    print(f"{'UNIT':>4}  {'BAUD':>6}  {'PARITY':<6}  {'PROFILE':<18}  ANSWER", flush=True)
    interrupted = refused = False
    ticker.start()
    try:
        configure = prober.configure if isinstance(prober, RtuLine) else None
        probe = (args.table, args.address)
        for hit in sweep(prober, units, lines, probe, stopbits=args.stopbits, expect=args.expect,
                         configure=configure, progress=state):  # fmt: skip
            print(f"{hit.unit:>4}  {hit.baud or '-':>6}  {hit.parity or '-':<6}  {hit.profile or '-':<18}  "
                  f"{hit.verdict}\n{'':>6}profile: {hit.evidence}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
    except SettingRefused as exc:
        print(f"error: {port_problem(args.port, exc.error, exc.setting)}", file=sys.stderr)
        refused = True
    except Exception:  # a TCP link failure: its reason is the message
        failure = getattr(prober, "failure", None)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        ticker.join()
        prober.close()
    seconds = time.monotonic() - started
    found = state.found
    note = " (interrupted)" if interrupted else ""
    if state.refused:
        print(refused_note(args.port, state.refused), file=sys.stderr)
    print(f"{len(found)} unit(s) found on {where} in {seconds:.1f} s, {state.done} probes{note}", file=sys.stderr)
    if refused and not found:
        return 1
    if not found:
        hint = "; check power, wiring (A/B) and termination"
        if state.garbled:
            hint = (f"; {state.garbled} garbled answers: wrong parity or baud rate suspected, check the device's "
                    "settings and the A/B wiring")  # fmt: skip
        print(f"nothing answers on {where}{hint}", file=sys.stderr)
        return 130 if interrupted else 1
    return _offer(args, found)


def _tick(state: Progress, stop: threading.Event, started: float, where: str) -> None:
    """A progress line a second on stderr, so a long sweep is never silent."""
    while not stop.wait(1.0):
        print(f"scan {where} {state.setting}: unit {state.unit}, {state.done}/{state.total} probes, "
              f"{len(state.found)} found, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)  # fmt: skip


def _offer(args: argparse.Namespace, found: list[Hit]) -> int:
    """Add the hits to a site file (``--add-to``, or asked on a terminal); print the next command."""
    target: Path | None = args.add_to
    matched = [h for h in found if h.profile]
    if target is None and matched and sys.stdin.isatty() and sys.stdout.isatty():
        answer = input(f"add {len(matched)} unit(s) to a site file? path [{DEFAULT_SITE}], n to skip: ").strip()
        target = None if answer.lower() in ("n", "no") else Path(answer or DEFAULT_SITE)
    if target is None:
        hit = found[0]
        line = f" --baud {hit.baud} --parity {hit.parity}" if hit.baud else ""
        where = f"--port {args.port}" if args.port else f"--host {args.host}"
        print(f"next: edge-agent scan modbus {where}{line} --units {hit.unit} --add-to {DEFAULT_SITE}"
              f"   (adds it to the site file)")  # fmt: skip
        return 0
    for hit in found:
        if hit.profile is None:
            print(f"unit {hit.unit}: not added: no known profile matches (edge-agent profiles lists them; "
                  "add its points by hand)", file=sys.stderr)  # fmt: skip
            continue
        try:
            backup = add_device(target, _device_keys(args, hit))
        except AddRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        kept = f" (previous file kept as {backup})" if backup.exists() else ""
        print(f"added unit {hit.unit} ({hit.profile}) to {target}{kept}")
    print(f"next: edge-agent validate -c {target}")
    return 0


def _device_keys(args: argparse.Namespace, hit: Hit) -> dict[str, Any]:
    assert hit.profile is not None
    return device_keys(hit.profile, hit.unit, port=args.port, baud=hit.baud, parity=hit.parity,
                       stopbits=hit.stopbits, host=args.host, rtu_over_tcp=args.rtu_over_tcp)  # fmt: skip
