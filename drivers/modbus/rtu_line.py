"""One RS-485 port opened once for a scan: raw RTU requests, answers read to their last byte or silence.

A scan asks 247 units, most of them absent, so its cost is the wait for each silent one. A
Modbus client per probe (open, configure, request, close) cost 0.4 s a unit; here the port
stays open across units and line settings, the wait is the answer's own length plus a short
turnaround, and an answer is taken as soon as its frame is complete.
"""

from __future__ import annotations

import struct
import termios
import time
from dataclasses import dataclass

import serial
from pymodbus.framer import FramerRTU

from drivers.modbus.bus import EXCEPTION_NAMES, inter_frame_gap

TURNAROUND = 0.035  # seconds a unit may take to start answering (meters: typically 5-30 ms)
_READ_FUNCTIONS = {"holding": 3, "input": 4, "coil": 1, "discrete": 2}


class SettingRefused(Exception):
    """The port refuses a line setting (a pseudo-terminal refuses parity: EINVAL)."""

    def __init__(self, setting: str, error: BaseException) -> None:
        super().__init__(setting)
        self.setting = setting
        self.error = error


@dataclass(frozen=True)
class Answer:
    """What came back for one request: ``verdict`` is ok, exception N (name), garbled, or silent."""

    verdict: str
    payload: bytes = b""  # the PDU's data after the function code (ok answers)

    @property
    def answered(self) -> bool:
        """Whether a unit is there: any valid frame from it, even an exception."""
        return self.verdict == "ok" or self.verdict.startswith("exception")


def crc(frame: bytes) -> bytes:
    """The RTU CRC of ``frame`` as sent (low byte first)."""
    return int(FramerRTU.compute_CRC(frame)).to_bytes(2, "big")


def setting_name(baud: int, parity: str, stopbits: int) -> str:
    """``9600 8N1``: how manuals and adapters name a line setting."""
    return f"{baud} 8{parity}{stopbits}"


class RtuLine:
    """The port, opened once; :meth:`configure` changes baud and parity on the open port."""

    def __init__(self, port: str, stopbits: int = 1, timeout: float | None = None) -> None:
        """Open ``port`` (exclusively, as the agent does). Raises OSError or termios.error as the port does."""
        self.port = port
        self.stopbits = stopbits
        self.timeout = timeout  # seconds to wait for an answer to start; None: turnaround + its length
        self.serial = serial.Serial(port, 9600, parity="N", stopbits=stopbits, timeout=0, exclusive=True)
        self.baud, self.parity = 9600, "N"

    def configure(self, baud: int, parity: str) -> None:
        """Switch the open port to ``baud`` and ``parity``.

        Raises:
            SettingRefused: the port refuses it (pyserial restores nothing, so the next try starts clean).
        """
        try:
            self.serial.baudrate = baud
            self.serial.parity = parity
        except (termios.error, OSError, ValueError) as exc:
            raise SettingRefused(setting_name(baud, parity, self.stopbits), exc) from exc
        self.baud, self.parity = baud, parity

    def close(self) -> None:
        """Close the port."""
        self.serial.close()

    def _char_time(self) -> float:
        return (10 if self.parity == "N" else 11) / self.baud

    def exchange(self, unit: int, pdu: bytes, expected: int) -> Answer:
        """Send ``pdu`` to ``unit``; its answer, taken as soon as a frame of ``expected`` bytes (or an
        exception frame) is complete, else when the line falls silent."""
        frame = bytes([unit]) + pdu
        self.serial.reset_input_buffer()
        self.serial.write(frame + crc(frame))
        self.serial.flush()  # tcdrain: the wait below starts once the request is on the line
        wait = self.timeout if self.timeout is not None else TURNAROUND + expected * self._char_time()
        self.serial.timeout = wait
        got = self.serial.read(1)
        if not got:
            return Answer("silent")
        # Between the bytes of one frame there is at most 1.5 characters; allow the 3.5 of a frame's end.
        self.serial.timeout = max(inter_frame_gap(self.baud), 0.005)
        deadline = time.monotonic() + wait + expected * self._char_time()
        while time.monotonic() < deadline:
            answer = _complete(got, unit, pdu[0], expected)
            if answer is not None:
                return answer
            more = self.serial.read(256)
            if not more:
                break
            got += more
        return _complete(got, unit, pdu[0], expected) or Answer("garbled")

    def read(self, unit: int, table: str, address: int, count: int) -> Answer:
        """Registers (or bits) ``address``.. of ``table``; an ok answer's payload holds the byte count and data."""
        function = _READ_FUNCTIONS[table]
        size = -(-count // 8) if function in (1, 2) else 2 * count
        return self.exchange(unit, struct.pack(">BHH", function, address, count), 5 + size)

    def identify(self, unit: int) -> dict[int, str] | None:
        """FC 43/14 basic device identification (vendor, product code, revision), if the unit answers it."""
        answer = self.exchange(unit, bytes([0x2B, 0x0E, 0x01, 0x00]), 64)
        if answer.verdict != "ok":
            return None
        return parse_identification(answer.payload)


def parse_identification(data: bytes) -> dict[int, str] | None:
    """Objects of a FC 43/14 answer after its function code: MEI type, read code, conformity, more,
    next object, count, then (id, length, value) each."""
    if len(data) < 6 or data[0] != 0x0E:
        return None
    objects: dict[int, str] = {}
    at = 6
    for _ in range(data[5]):
        if at + 2 > len(data):
            return None
        oid, size = data[at], data[at + 1]
        objects[oid] = data[at + 2 : at + 2 + size].decode("latin-1").strip()
        at += 2 + size
    return objects


def _complete(got: bytes, unit: int, function: int, expected: int) -> Answer | None:
    """The answer in ``got`` if it holds a whole valid frame from ``unit``, else None."""
    if len(got) >= 5 and got[0] == unit and got[1] == function | 0x80 and got[3:5] == crc(got[:3]):
        code = got[2]
        return Answer(f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})")
    if function == 0x2B:  # device identification: variable length, ends where its CRC checks
        for end in range(8, len(got) + 1):
            if got[0] == unit and got[1] == function and got[end - 2 : end] == crc(got[: end - 2]):
                return Answer("ok", got[2 : end - 2])
        return None
    if (
        len(got) >= expected
        and got[0] == unit
        and got[1] == function
        and got[expected - 2 : expected] == crc(got[: expected - 2])
    ):
        return Answer("ok", got[2 : expected - 2])
    return None
