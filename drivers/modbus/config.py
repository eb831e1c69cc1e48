"""Config keys of the ``modbus`` driver: transport, points, and profile resolution."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from agent.contract.vocabulary import QUANTITY_UNITS
from agent.devices.api import DeviceConfig, Duration, StrictModel
from agent.devices.ports import missing
from drivers.modbus.profiles import ProfileError, apply_profile, available

Table = Literal["holding", "input", "coil", "discrete"]
ValueType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string", "bitfield", "bool"
]
Order = Literal["big", "little"]

# Registers each type spans; string spans ``length``.
TYPE_REGISTERS: dict[str, int] = {
    "int16": 1, "uint16": 1, "bitfield": 1, "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
}  # fmt: skip
BIT_TABLES = ("coil", "discrete")
WRITABLE_TABLES = ("coil", "holding")  # input registers and discrete inputs are read-only by protocol
UNWRITABLE_TYPES = ("string", "bitfield")
WriteFunction = Literal[5, 6, 15, 16]
ALL_WRITE_FUNCTIONS: tuple[WriteFunction, ...] = (5, 6, 15, 16)
PROTOCOL_MAX_REGISTERS = 125  # Modbus: one read of holding/input registers returns at most 125
_MODICON_LEAD = {"discrete": "1", "input": "3", "holding": "4"}  # a Modicon reference's first digit per table
PROTOCOL_MAX_BITS = 2000  # ... and of coils/discrete inputs at most 2000


class PointConfig(StrictModel):
    """One value read from the device and what it means in an event."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Point name, unique on the device.")
    table: Table = Field(default="holding", description="holding, input (registers), coil, discrete (bits).")
    address: int = Field(ge=0, le=65535, description="Zero-based protocol address (input register 30001 is 0).")
    type: ValueType = Field(default="uint16", description="How the registers decode; coils/discrete are bool.")
    length: int | None = Field(default=None, ge=1, le=125, description="Registers of a string.")
    bit: int | None = Field(default=None, ge=0, le=15, description="Bit of the register (bitfield).")
    byte_order: Order | None = Field(default=None, description="Bytes within a register (default: device's).")
    word_order: Order | None = Field(default=None, description="Registers of a 32/64-bit value (default: device's).")
    scale: float = Field(default=1.0, description="value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="value = raw * scale + offset.")
    unit: str | None = Field(default=None, description="Unit; defaults to the quantity's unit.")
    quantity: str | None = Field(default=None, description="Meter quantity from the vocabulary (docs/events.md).")
    phase: Literal["L1", "L2", "L3", "N"] | None = Field(default=None, description="Phase, when per phase.")
    bay: str | None = Field(default=None, description="This point is a parking bay's occupied flag.")
    area: str | None = Field(default=None, description="This point is a crosswalk area's person count.")
    interval: Duration | None = Field(default=None, gt=0, description="Poll interval (default: device's).")
    deadband: float | None = Field(
        default=None, ge=0, description="Report only changes larger than this (default: device's)."
    )
    writable: bool = Field(
        default=False,
        description="OPC UA clients may write it (coil or holding; also list it in uplink.opcua.writable).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PointConfig:
        roles = [k for k in ("quantity", "bay", "area") if getattr(self, k) is not None]
        if len(roles) != 1:
            raise ValueError(f"point {self.name!r}: give exactly one of quantity, bay, area (got {roles or 'none'})")
        if self.quantity is not None and self.quantity not in QUANTITY_UNITS:
            raise ValueError(
                f"point {self.name!r}: unknown quantity {self.quantity!r} (one of: {', '.join(sorted(QUANTITY_UNITS))})"
            )
        if self.table in BIT_TABLES and self.type != "bool":
            raise ValueError(f"point {self.name!r}: a {self.table} is a single bit; use type: bool")
        if self.table not in BIT_TABLES and self.type == "bool":
            raise ValueError(f"point {self.name!r}: type bool is for coil/discrete; use bitfield with bit: N")
        if (self.type == "string") != (self.length is not None):
            raise ValueError(f"point {self.name!r}: length is required for, and only for, type string")
        if (self.type == "bitfield") != (self.bit is not None):
            raise ValueError(f"point {self.name!r}: bit is required for, and only for, type bitfield")
        if self.address + self.registers > 65536:
            raise ValueError(f"point {self.name!r}: runs past address 65535")
        if self.writable and self.table not in WRITABLE_TABLES:
            raise ValueError(f"point {self.name!r}: {self.table} points cannot be writable (Modbus writes only "
                             f"coils and holding registers)")  # fmt: skip
        if self.writable and self.type in UNWRITABLE_TYPES:
            # A bitfield shares its register with other flags (a write would need a read-modify-write
            # that races the device); a string is an identifier, not a setpoint.
            raise ValueError(f"point {self.name!r}: {self.type} points cannot be writable")
        return self

    @property
    def registers(self) -> int:
        """Registers (or bits) this point spans."""
        if self.table in BIT_TABLES:
            return 1
        return self.length if self.type == "string" and self.length else TYPE_REGISTERS.get(self.type, 1)

    @property
    def event_unit(self) -> str:
        """The unit events carry: the configured one, else the vocabulary's."""
        if self.unit is not None:
            return self.unit
        return QUANTITY_UNITS.get(self.quantity or "", "")


class SerialSettings(StrictModel):
    """An RS-485 port. Devices naming the same port share it (one request at a time)."""

    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
    baudrate: int = Field(default=9600, description="Bits per second.")
    parity: Literal["N", "E", "O"] = Field(default="N", description="N, E or O.")
    stopbits: Literal[1, 2] = Field(default=1, description="1 or 2.")
    bytesize: Literal[7, 8] = Field(default=8, description="Data bits.")

    @model_validator(mode="after")
    def _rate(self) -> SerialSettings:
        if self.baudrate not in (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200):
            raise ValueError(f"unusual baudrate {self.baudrate} (1200 ... 115200)")
        return self


class ModbusConfig(DeviceConfig):
    """A Modbus TCP, RTU (RS-485) or RTU-over-TCP device: a meter, an I/O module, a detector."""

    driver: Literal["modbus"] = Field(description="Modbus device.")
    transport: Literal["tcp", "rtu", "rtu_over_tcp"] = Field(
        default="tcp", description="tcp (host, port), rtu (serial), rtu_over_tcp (a serial gateway's TCP port)."
    )
    host: str | None = Field(default=None, description="Device or gateway address (tcp, rtu_over_tcp).")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port (tcp, rtu_over_tcp).")
    serial: SerialSettings | None = Field(default=None, description="Serial port settings (rtu).")
    unit: int = Field(default=1, ge=0, le=255, description="Unit (slave) id. Serial: 1..247.")
    timeout: Duration = Field(default=1.0, gt=0, le=60, description="Per request; a silent device costs this.")
    profile: str | None = Field(default=None, description="Device profile id (edge-agent profiles).")
    exclude: list[str] = Field(default_factory=list, description="Profile points to leave out.")
    points: list[PointConfig] = Field(default_factory=list, description="Points (after the profile's).")
    kind: Literal["meter", "io"] = Field(default="meter", description="meter or io (from the profile).")
    byte_order: Order = Field(default="big", description="Bytes within a register.")
    word_order: Order = Field(default="big", description="Registers of 32/64-bit values (big: high word first).")
    max_registers: int = Field(default=125, ge=1, le=125, description="Most registers per request.")
    max_bits: int = Field(default=2000, ge=1, le=2000, description="Most coils/inputs per request.")
    max_gap: int = Field(
        default=8,
        ge=0,
        le=124,
        description=(
            "Unused registers a merged request may span. A unit that refuses such a read"
            " (exception 2 or 3) has it split, at once and for the rest of the run."
        ),
    )
    deadband: float | None = Field(
        default=None, ge=0, description="Report a point only when it moved more than this (null: every poll)."
    )
    full_report: Duration = Field(
        default=300.0, gt=0, description="Report every point at least this often, changed or not."
    )
    write_functions: list[WriteFunction] | None = Field(
        default=None,
        min_length=1,
        description="Write function codes the device implements, from its manual (null: 5, 6, 15 and 16). "
        "A coil is written with 5 (else 15), one register with 6 (else 16), several with 16.",
    )

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not data.get("profile") or not _mergeable(data):
            return data  # nothing to merge, or keys of the wrong type that their own checks name
        base_dir = (info.context or {}).get("base_dir")
        try:
            return apply_profile(data, base_dir)
        except ProfileError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _transport(self) -> ModbusConfig:
        if self.transport == "rtu":
            if self.serial is None:
                raise ValueError("transport rtu needs serial: {port: /dev/ttyUSB0, baudrate: 9600, ...}")
            if not 1 <= self.unit <= 247:
                raise ValueError(f"unit {self.unit}: serial unit ids are 1..247")
        elif not self.host:
            raise ValueError(f"transport {self.transport} needs host")
        if not self.points:
            raise ValueError("no points: give a profile or a points list")
        dupes = sorted(n for n, count in Counter(p.name for p in self.points).items() if count > 1)
        if dupes:
            raise ValueError(f"duplicate point names: {', '.join(dupes)}")
        for point in self.points:
            if point.writable and self.write_function(point) is None:
                raise ValueError(
                    f"point {point.name!r} is writable but none of write_functions {self.write_functions} writes "
                    f"a {point.table} of {point.registers} register(s) (a coil needs 5 or 15, one register 6 or "
                    f"16, several 16)"
                )
        return self

    def write_function(self, point: PointConfig) -> WriteFunction | None:
        """The function code that writes ``point`` on this device (None if the device has none for it).

        The single-item functions (05, 06) come first: every device that writes has them except
        those whose manual lists only the multiple-item ones (Schneider iEM3000: 03, 16 and 43/14).
        """
        offered = self.write_functions or ALL_WRITE_FUNCTIONS
        if point.table == "coil":
            wanted: tuple[WriteFunction, ...] = (5, 15)
        elif point.registers == 1:
            wanted = (6, 16)
        else:
            wanted = (16,)
        return next((f for f in wanted if f in offered), None)

    def device_paths(self) -> list[str]:
        """The RS-485 port of an RTU device; TCP devices need no local device file."""
        if self.transport == "rtu" and self.serial is not None:
            return [self.serial.port]
        return []

    def warnings(self, field: str) -> list[str]:
        """A serial port not there (yet), and addresses that look like Modicon references (30225)."""
        out = []
        if self.transport == "rtu" and self.serial is not None and not os.path.exists(self.serial.port):
            out.append(f"{field}.serial.port: {missing(self.serial.port)} (the agent waits for it)")
        for point in self.points:
            lead = _MODICON_LEAD.get(point.table)
            if lead is not None and 10001 <= point.address <= 49999 and str(point.address)[0] == lead:
                zero_based = point.address % 10000 - 1
                out.append(f"{field} ({self.id}) point {point.name}: address {point.address} looks like a Modicon "
                           f"reference ({lead}xxxx = {point.table} register {point.address % 10000}); addresses "
                           f"here are zero-based PDU addresses: if the manual says {point.address}, write "
                           f"address: {zero_based}")  # fmt: skip
        return out

    def profile_files(self, base_dir: Path | None) -> dict[str, Path | None]:
        """The profile merged into this device, and the file the search finds for it now."""
        if self.profile is None:
            return {}
        return {self.profile: available(base_dir).get(self.profile)}

    def bus_key(self) -> str:
        """Devices with the same key share one connection and take turns."""
        if self.transport == "rtu" and self.serial is not None:
            return f"rtu:{self.serial.port}"
        return f"{self.transport}:{self.host}:{self.port}"


def _mergeable(device: dict[str, Any]) -> bool:
    """Whether a profile can be merged into these raw keys: a profile name, and points and exclude
    that are lists (of mappings, of names) if given. Otherwise the keys' own checks report them."""
    points, exclude = device.get("points") or [], device.get("exclude") or []
    return (
        isinstance(device["profile"], str)
        and isinstance(points, list)
        and isinstance(exclude, list)
        and all(isinstance(name, str) for name in exclude)
    )


def parse_modicon(text: str) -> tuple[Table, int]:
    """``30001`` -> (input, 0); ``40073`` -> (holding, 72); ``1`` -> coil 0; ``10001`` -> discrete 0.

    Five- and six-digit Modicon numbers are both accepted (``300001``).
    """
    if not re.fullmatch(r"[0-4]\d{4,5}", text):
        raise ValueError(f"{text!r} is not a Modicon address such as 30001 or 40001")
    tables: dict[str, Table] = {"0": "coil", "1": "discrete", "3": "input", "4": "holding"}
    if text[0] not in tables:
        raise ValueError(f"{text!r}: Modicon addresses start with 0, 1, 3 or 4")
    number = int(text[1:])
    if number < 1:
        raise ValueError(f"{text!r}: Modicon numbers start at 1")
    return tables[text[0]], number - 1
