"""``scan modbus``'s sweep: which units answer, at which line setting, and which profile each one matches.

Sweeps go frequency-first: every unit at the likeliest setting (9600 8N1, the factory default of
most meters), then every unit at the next one, so the common case ends after one pass. A
setting at which units answered ends the sweep (one RS-485 bus has one setting), unless
``expect`` asks for more units than were found.
"""

from __future__ import annotations

import math
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from agent.devices.ports import is_pty, port_problem
from drivers.modbus import codec
from drivers.modbus import profiles as profile_store
from drivers.modbus.rtu_line import Answer, RtuLine, SettingRefused, setting_name

# Line settings by how often meters leave the factory or are set so (likeliest first).
LIKELY = [(9600, "N"), (9600, "E"), (19200, "N"), (19200, "E"), (38400, "N"), (4800, "N"), (2400, "N"),
          (115200, "N"), (57600, "N"), (9600, "O"), (19200, "O"), (38400, "E"), (4800, "E"), (2400, "E")]  # fmt: skip
SAMPLED = 6  # points of a profile read to match it: spread over its map, first and last included
# Values a quantity can take on a live device (0: a phase or channel not wired).
PLAUSIBLE = {"voltage": (50.0, 1000.0), "frequency": (40.0, 70.0), "power_factor": (-1.0, 1.0)}


class Prober(Protocol):
    """A connection a scan asks through: a raw RTU line, or a Modbus TCP / gateway connection."""

    def read(self, unit: int, table: str, address: int, count: int) -> Answer:
        """One read request and its answer."""

    def identify(self, unit: int) -> dict[int, str] | None:
        """FC 43/14 basic identification objects (0 vendor, 1 product code, 2 revision), if answered."""


@dataclass
class Hit:
    """A unit that answered, where, and what it looks like."""

    unit: int
    baud: int | None
    parity: str | None
    stopbits: int
    verdict: str
    profile: str | None = None
    evidence: str = ""  # why the profile matched (sampled registers, identification)

    @property
    def setting(self) -> str:
        """``9600 8N1``, or ``-`` over TCP."""
        return setting_name(self.baud, self.parity, self.stopbits) if self.baud and self.parity else "-"


@dataclass
class Progress:
    """Where a sweep is, for the progress line."""

    setting: str = "-"
    unit: int = 0
    done: int = 0
    total: int = 0
    found: list[Hit] = field(default_factory=list)
    garbled: int = 0
    refused: list[str] = field(default_factory=list)  # settings the port refused, skipped

    def as_dict(self) -> dict[str, Any]:
        """The progress as plain data (the page's progress line and hits)."""
        return {"setting": self.setting, "unit": self.unit, "done": self.done, "total": self.total,
                "found": [asdict(h) | {"setting": h.setting} for h in list(self.found)],
                "garbled": self.garbled, "refused": list(self.refused)}  # fmt: skip


class PortUnusable(Exception):
    """The port cannot be opened for a scan; the message names the cause and its fix."""


def open_line(port: str, stopbits: int = 1, timeout: float | None = None) -> RtuLine:
    """``port`` opened once for a sweep.

    Raises:
        PortUnusable: missing, forbidden, busy, or refused, in the words of ``read`` and ``doctor``.
    """
    if problem := port_problem(port):
        raise PortUnusable(problem)
    try:
        return RtuLine(port, stopbits, timeout)
    except (OSError, termios.error) as exc:
        raise PortUnusable(port_problem(port, exc) or str(exc)) from exc


def refused_note(port: str, refused: list[str]) -> str:
    """The line naming the settings a port refused and why they were skipped."""
    why = "a pseudo-terminal has no parity bit" if is_pty(port) else "the adapter does not support them"
    return f"skipped settings {port} refuses: {', '.join(refused)} ({why})"


def settings(baud: int | None, parity: str | None) -> list[tuple[int, str]]:
    """The line settings to sweep, likeliest first; a given baud or parity keeps only those."""
    out = [(b, p) for b, p in LIKELY if baud in (None, b) and parity in (None, p)]
    if baud is not None and parity is not None and not out:
        out = [(baud, parity)]
    elif not out:  # an unusual baud rate: the parities in their usual order
        out = [(baud or 9600, p) for p in ("N", "E", "O") if parity in (None, p)]
    return out


def sweep(
    prober: Prober,
    units: list[int],
    lines: list[tuple[int, str]] | None,
    probe: tuple[str, int],
    *,
    stopbits: int = 1,
    expect: int | None = None,
    configure: Callable[[int, str], None] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Hit]:
    """Yield each answering unit as found. ``lines`` None: one pass (TCP); ``probe``: (table, address).

    ``stop``, once set, ends the sweep before its next probe (the page's Stop; the CLI has Ctrl-C).
    """
    state = progress or Progress()
    passes: list[tuple[int | None, str | None]] = list(lines) if lines else [(None, None)]
    state.total = len(passes) * len(units)
    table, address = probe
    for baud, parity in passes:
        if baud is not None and parity is not None and configure is not None:
            state.setting = setting_name(baud, parity, stopbits)
            try:
                configure(baud, parity)
            except SettingRefused:
                if len(passes) == 1:
                    raise  # the one setting asked for: the technician must hear why
                state.refused.append(state.setting)  # a pty refuses parity: the other settings may still answer
                state.done += len(units)
                continue
        found_here = 0
        for unit in units:
            if stop is not None and stop.is_set():
                return
            state.unit = unit
            answer = prober.read(unit, table, address, 1)
            state.done += 1
            if answer.verdict == "garbled":
                state.garbled += 1
            if not answer.answered:
                continue
            hit = Hit(unit, baud, parity, stopbits, answer.verdict)
            if answer.verdict.startswith(("exception 10 ", "exception 11 ")):
                hit.evidence = "a gateway answers for it: no device behind"
            else:
                hit.profile, hit.evidence = match_profile(prober, unit)
            state.found.append(hit)
            found_here += 1
            yield hit
            if expect is not None and len(state.found) >= expect:
                return
        if found_here and (expect is None or len(state.found) >= expect):
            return  # one bus, one setting: the others would only garble


def match_profile(prober: Prober, unit: int) -> tuple[str | None, str]:
    """The profile whose sampled registers the unit serves with plausible values, and why.

    FC 43/14 identification, where the unit answers it, picks among the profiles whose registers
    check out (vendor and model named in it). Otherwise the winner is the profile with the most
    registers verified, then the largest map (an SDM630 serves every SDM120 register; not the reverse).
    """
    identity = prober.identify(unit)
    named = " ".join(identity.values()).lower() if identity else ""
    best: tuple[tuple[int, int, int], str, str] | None = None
    for name in sorted(profile_store.available()):
        try:
            profile = profile_store.load(name)
        except profile_store.ProfileError:
            continue
        verified = _verify(prober, unit, profile)
        if verified is None:
            continue
        by_name = int(bool(named) and str(profile.get("vendor", "")).lower() in named
                      and _model_word(profile) in named)  # fmt: skip
        rank = (by_name, verified, len(profile["points"]))
        if best is None or rank > best[0]:
            why = f"{verified} sampled registers plausible"
            if by_name:
                why += f"; FC 43/14: {' '.join(identity.values()) if identity else ''}"
            best = (rank, name, why)
    if best is None:
        shown = f"; FC 43/14: {' '.join(identity.values())}" if identity else ""
        return None, f"no known profile matches{shown}"
    return best[1], best[2]


def _model_word(profile: dict[str, Any]) -> str:
    """The model's first word (``SDM630-Modbus V2`` -> ``sdm630``), as identification strings carry it."""
    return str(profile.get("model", "")).split()[0].split("-")[0].lower() if profile.get("model") else "\0"


def _verify(prober: Prober, unit: int, profile: dict[str, Any]) -> int | None:
    """How many sampled register points read back plausibly; None if any does not."""
    points = sorted((p for p in profile["points"] if p.get("table", "holding") in ("holding", "input")),
                    key=lambda p: (p.get("table", "holding"), int(p["address"])))  # fmt: skip
    if not points:
        return None  # bits alone (an I/O module) say nothing about which device it is
    step = max(1, math.ceil((len(points) - 1) / (SAMPLED - 1)))
    sample = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
    defaults = profile.get("defaults") or {}
    for point in sample:
        kind = point.get("type", "uint16")
        count = int(point.get("length") or codec_registers(kind))
        answer = prober.read(unit, point.get("table", "holding"), int(point["address"]), count)
        if answer.verdict != "ok" or len(answer.payload) < 1 + 2 * count:
            return None
        decoder = codec.compile_decoder(
            kind, byte_order=point.get("byte_order") or defaults.get("byte_order", "big"),
            word_order=point.get("word_order") or defaults.get("word_order", "big"), bit=point.get("bit"),
            length=count, scale=float(point.get("scale", 1.0)), offset=float(point.get("offset", 0.0)),
        )  # fmt: skip
        value = decoder(answer.payload[1 : 1 + 2 * count], 0)
        if not _plausible(point.get("quantity"), value):
            return None
    return len(sample)


def codec_registers(kind: str) -> int:
    """Registers a numeric type spans."""
    from drivers.modbus.config import TYPE_REGISTERS

    return TYPE_REGISTERS.get(kind, 1)


def _plausible(quantity: str | None, value: float | int | str) -> bool:
    if isinstance(value, str):
        return True
    if not math.isfinite(value):
        return False
    low, high = PLAUSIBLE.get(quantity or "", (-math.inf, math.inf))
    return value == 0 or low <= value <= high


def registers_answer(registers: list[int]) -> Answer:
    """An ok :class:`Answer` carrying ``registers`` (a TCP read), as an RTU one carries its bytes."""
    data = struct.pack(f">{len(registers)}H", *registers)
    return Answer("ok", bytes([len(data)]) + data)


def timed(func: Callable[[], Any]) -> tuple[Any, float]:
    """``func()`` and the seconds it took."""
    start = time.monotonic()
    return func(), time.monotonic() - start
