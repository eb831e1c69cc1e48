"""Frame checksums of serial sensors: sum8, xor, CRC-16/MODBUS and CRC-8 (SMBus).

Every function takes the covered bytes and returns the checksum as an unsigned integer;
:data:`SIZES` says how many bytes it takes on the wire. Check values (the checksum of
``b"123456789"``, as catalogued by the CRC RevEng project) are asserted by the tests:
CRC-16/MODBUS ``0x4B37``, CRC-8/SMBUS ``0xF4``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

ChecksumName = Literal["sum8", "xor", "crc16-modbus", "crc8", "none"]


def sum8(data: bytes) -> int:
    """Sum of the bytes modulo 256 (the most common checksum of cheap sensors)."""
    return sum(data) & 0xFF


def xor8(data: bytes) -> int:
    """XOR of the bytes (NMEA-style longitudinal parity)."""
    value = 0
    for byte in data:
        value ^= byte
    return value


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS: poly 0x8005 reflected, init 0xFFFF, no final XOR (sent low byte first)."""
    # pymodbus is already a dependency of the agent; its RTU framer holds a table-driven
    # CRC-16/MODBUS that every Modbus RTU deployment exercises, so we reuse it rather than
    # keep a second copy. Imported here because this module is also imported by the config
    # model, which must stay light (pymodbus takes ~0.1 s to import). Its result is
    # byte-swapped (ready to write big-endian), hence the swap back; the pin in pyproject
    # (<3.12) keeps this framer API stable, and the tests assert the published check value.
    from pymodbus.framer.rtu import FramerRTU

    swapped = FramerRTU.compute_CRC(data)
    return ((swapped & 0xFF) << 8) | (swapped >> 8)


def _crc8_table(poly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8_TABLE = _crc8_table(0x07)


def crc8(data: bytes) -> int:
    """CRC-8 (CRC-8/SMBUS): poly 0x07, init 0, not reflected, no final XOR."""
    crc = 0
    for byte in data:
        crc = _CRC8_TABLE[crc ^ byte]
    return crc


def _none(_data: bytes) -> int:
    return 0


FUNCTIONS: dict[ChecksumName, Callable[[bytes], int]] = {
    "sum8": sum8,
    "xor": xor8,
    "crc16-modbus": crc16_modbus,
    "crc8": crc8,
    "none": _none,
}
SIZES: dict[ChecksumName, int] = {"sum8": 1, "xor": 1, "crc16-modbus": 2, "crc8": 1, "none": 0}


def checksum_bytes(name: ChecksumName, data: bytes, byteorder: Literal["little", "big"] = "little") -> bytes:
    """The checksum of ``data`` as it appears on the wire (``b""`` for ``none``)."""
    return FUNCTIONS[name](data).to_bytes(SIZES[name], byteorder)
