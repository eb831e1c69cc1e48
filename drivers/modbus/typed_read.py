"""A typed read, shared by ``edge-agent read modbus`` and the technician page.

The registers come back raw; the page shows them beside every way a 32-bit value can be laid
over two registers (ABCD, CDAB, BADC, DCBA), because a meter's manual rarely says which one
it uses, and the right one is the one that reads as a plausible number.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from drivers.modbus.bus import BusPool, ModbusReadError
from drivers.modbus.config import BIT_TABLES, ModbusConfig

# Byte positions of each order, over the big-endian bytes A B C D of two registers (A: high byte of the first).
ORDERS = {"ABCD": (0, 1, 2, 3), "CDAB": (2, 3, 0, 1), "BADC": (1, 0, 3, 2), "DCBA": (3, 2, 1, 0)}
_REFERENCE_BASE = {"coil": 0, "discrete": 1, "input": 3, "holding": 4}
MAX_COUNT = {"holding": 125, "input": 125, "coil": 2000, "discrete": 2000}  # one request's limit (spec)


def port_config(port: str, unit: int, baud: int, parity: str, stopbits: int, timeout: float) -> ModbusConfig:
    """A one-off RTU connection's config (the read's own, not a site device's)."""
    return ModbusConfig.model_validate({
        "id": "read", "driver": "modbus", "transport": "rtu", "unit": unit, "timeout": timeout,
        "serial": {"port": port, "baudrate": baud, "parity": parity, "stopbits": stopbits},
        "points": [{"name": "probe", "table": "holding", "address": 0, "quantity": "counter"}],
    })  # fmt: skip


def where(config: ModbusConfig) -> str:
    """The port, or host:port, a config reaches its device by."""
    return config.serial.port if config.serial else f"{config.host}:{config.port}"


async def read_registers(
    config: ModbusConfig, table: str, address: int, count: int, unit: int, pool: BusPool | None = None
) -> list[int] | list[bool]:
    """``count`` registers (or bits) from ``address`` of ``table``, through ``pool``'s connection.

    A running device's pool shares its connection (and its turn on the bus); a pool of its own
    opens the port for this read and closes it after.

    Raises:
        ModbusReadError: timeout, exception response, garbled answer, or a port that does not open.
        ValueError: the port is open with other line settings (another device on the same bus).
    """
    pool = pool if pool is not None else BusPool()
    bus = pool.acquire(config)
    try:
        return await bus.read(table, address, count, unit)
    finally:
        pool.release(bus)


def read_failure(config: ModbusConfig, unit: int, exc: ModbusReadError) -> str:
    """A failed read in one line: ``unit 5 at /dev/ttyUSB0: timeout``."""
    return f"unit {unit} at {where(config)}: {exc.reason}"


def reference(table: str, address: int) -> str:
    """The 1-based Modicon reference of a zero-based PDU address: input 0 -> 30001, holding 72 -> 40073.

    Five digits while they suffice, six above (``465536``), as manuals write them.
    """
    base = _REFERENCE_BASE[table]
    number = address + 1
    return f"{base}{number:04d}" if number <= 9999 else f"{base}{number:05d}"


def word_orders(first: int, second: int) -> dict[str, dict[str, Any]]:
    """Two registers read as a 32-bit value in each order: its bytes in hex, float32, uint32 and int32."""
    raw = struct.pack(">HH", first, second)
    out: dict[str, dict[str, Any]] = {}
    for name, positions in ORDERS.items():
        data = bytes(raw[i] for i in positions)
        value = struct.unpack(">f", data)[0]
        out[name] = {
            "hex": data.hex(),
            "float32": float(f"{value:.7g}") if math.isfinite(value) else str(value),  # JSON carries no NaN
            "uint32": struct.unpack(">I", data)[0],
            "int32": struct.unpack(">i", data)[0],
        }
    return out


def typed(table: str, address: int, values: list[int] | list[bool]) -> dict[str, Any]:
    """A read's result for a person: each register in hex beside its reference, and each 32-bit pair in every order."""
    if table in BIT_TABLES:
        rows = [{"pdu": address + i, "reference": reference(table, address + i), "value": int(v)}
                for i, v in enumerate(values)]  # fmt: skip
        return {"registers": rows, "pairs": []}
    registers = [int(v) for v in values]
    rows = [{"pdu": address + i, "reference": reference(table, address + i), "hex": f"{r:04x}", "value": r}
            for i, r in enumerate(registers)]  # fmt: skip
    pairs = [{"pdu": address + i, "reference": reference(table, address + i),
              "orders": word_orders(registers[i], registers[i + 1])}
             for i in range(0, len(registers) - 1, 2)]  # fmt: skip
    return {"registers": rows, "pairs": pairs}
