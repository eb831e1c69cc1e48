"""Config keys of the ``serial`` driver: the port, how frames are delimited, what they mean.

Validation is pure (no port is opened) and every check names the key at fault, because the
first person to read these messages is a technician on site with a laptop.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections import Counter
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent.config.yaml_load import clip
from agent.contract.vocabulary import QUANTITY_UNITS
from agent.devices.api import DeviceConfig, Duration, StrictModel
from drivers.serial.checksums import SIZES, ChecksumName

EmitsName = Literal["meter", "parking", "crosswalk"]

# Quantities the structured event types understand; anything else would be silently dropped.
EVENT_QUANTITIES: dict[str, tuple[str, ...]] = {
    "parking": ("occupied", "confidence"),
    "crosswalk": ("count", "max_count"),
}
REQUIRED_QUANTITY = {"parking": "occupied", "crosswalk": "count"}
LINE_KEYS = ("pattern", "terminator", "encoding", "max_line", "resync")
BINARY_KEYS = ("sync", "layout", "length", "checksum", "checksum_over", "checksum_byteorder")
MAX_PAYLOAD = 4096  # bytes of a binary frame's payload (sensors send tens)


class FramingConfig(StrictModel):
    """How frames are cut out of the byte stream: text lines or fixed-length binary frames."""

    kind: Literal["line", "binary"] = Field(
        description="line: one frame per text line, parsed by `pattern`; binary: fixed-length frames after `sync`."
    )
    # ---- kind: line ----
    pattern: str | None = Field(
        default=None,
        description=(
            "kind line (required): regular expression with named groups, e.g. "
            r"'T=(?P<temperature>-?\d+\.\d+);H=(?P<humidity>\d+)'. The whole line must match "
            "(a trailing CR is dropped when the terminator is LF)."
        ),
    )
    terminator: str = Field(
        default="\n",
        min_length=1,
        description=r"kind line: end of a line; backslash escapes such as '\r\n' are understood.",
    )
    encoding: str = Field(default="ascii", description="kind line: text encoding of the line.")
    max_line: int = Field(
        default=512,
        ge=1,
        le=65536,
        description="kind line: longest line in bytes; a longer run without a terminator is noise (no_sync).",
    )
    resync: bool = Field(
        default=True,
        description=(
            "kind line: when a line does not match, take its longest matching tail (noise or a "
            "cut-off frame before it counts as no_sync). Start the pattern with a fixed marker "
            "(T=, $, ...) so that damage cannot look like a frame."
        ),
    )
    # ---- kind: binary ----
    sync: str | None = Field(
        default=None,
        description='kind binary (required): sync bytes that start every frame, as quoted hex, e.g. "AA55".',
    )
    layout: str | None = Field(
        default=None,
        description=(
            "kind binary (required): Python struct format of the payload between sync and checksum, "
            "starting with a byte order (< little-endian, > or ! big-endian), e.g. '<hHH'."
        ),
    )
    length: int | None = Field(
        default=None,
        ge=1,
        description="kind binary: total frame bytes incl. sync and checksum; default: computed, checked if given.",
    )
    checksum: ChecksumName | None = Field(
        default=None,
        description="kind binary (required): sum8, xor, crc16-modbus (CRC-16/MODBUS), crc8 (poly 0x07) or none.",
    )
    checksum_over: Literal["payload", "sync+payload"] = Field(
        default="payload", description="kind binary: bytes the checksum covers."
    )
    checksum_byteorder: Literal["little", "big"] = Field(
        default="little",
        description="kind binary: byte order of a 2-byte checksum (Modbus sends the CRC low byte first).",
    )

    @field_validator(*LINE_KEYS, *BINARY_KEYS, mode="before")
    @classmethod
    def _of_this_kind(cls, value: Any, info: ValidationInfo) -> Any:
        # Runs before the key's own checks: a pattern under kind: binary is a misplaced key,
        # not a bad regular expression.
        kind = info.data.get("kind")
        mine = LINE_KEYS if kind == "line" else BINARY_KEYS if kind == "binary" else ()
        if mine and info.field_name not in mine:
            raise ValueError(f"not used with kind: {kind} (its keys: {', '.join(mine)})")
        return value

    @field_validator("terminator")
    @classmethod
    def _unescape(cls, value: str) -> str:
        # Written in single quotes, YAML keeps '\n' as two characters; nobody means that.
        if "\\" in value:
            try:
                value = codecs.decode(value, "unicode_escape")
            except UnicodeDecodeError as exc:
                raise ValueError(f"bad escape in terminator {value!r}: {exc.reason}") from None
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r} (e.g. ascii, utf-8, latin-1)") from None
        return value

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if not compiled.groupindex:
            raise ValueError("the pattern has no named groups: name each value, e.g. (?P<temperature>-?\\d+\\.\\d)")
        return value

    @field_validator("sync", mode="before")
    @classmethod
    def _hex(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f'write the sync bytes as a quoted hex string, e.g. "AA55" (got {value!r})')
        text = value.strip().removeprefix("0x").removeprefix("0X").replace(" ", "")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f'sync {value!r} is not hex bytes, e.g. "AA55"') from None
        if not raw:
            raise ValueError("sync needs at least one byte")
        return raw.hex().upper()

    @field_validator("layout")
    @classmethod
    def _struct(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value[:1] not in ("<", ">", "!"):
            raise ValueError(
                f"layout {value!r} must start with a byte order: < (little-endian), > or ! (big-endian); "
                "without one, struct uses this machine's padding and sizes"
            )
        try:
            size = struct.calcsize(value)
            if size > MAX_PAYLOAD:
                raise ValueError(f"layout {clip(value)} is {size} bytes; a frame's payload is at most {MAX_PAYLOAD}")
            items = struct.unpack(value, bytes(size))
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"not a valid struct format {clip(value)}: {exc}") from None
        if not items:
            raise ValueError(f"layout {value!r} has no values (only pad bytes)")
        if any(isinstance(item, bytes) for item in items):
            raise ValueError(f"layout {value!r}: every item must be a number (c, s and p give bytes)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> FramingConfig:
        if self.kind == "line":
            if self.pattern is None:
                raise ValueError("kind: line needs `pattern` (a regular expression with named groups)")
            try:
                self.terminator.encode(self.encoding)
            except UnicodeEncodeError:
                raise ValueError(f"terminator {self.terminator!r} cannot be written in {self.encoding}") from None
            return self
        missing = [key for key in ("sync", "layout", "checksum") if getattr(self, key) is None]
        if missing:
            raise ValueError(f"kind: binary needs {', '.join(missing)}")
        if self.length is not None and self.length != self.frame_length:
            assert self.layout is not None
            assert self.checksum is not None
            raise ValueError(
                f"length {self.length} does not match the layout: sync {len(self.sync_bytes)} + payload "
                f"{struct.calcsize(self.layout)} ({self.layout!r}) + checksum {SIZES[self.checksum]} "
                f"({self.checksum}) = {self.frame_length} bytes"
            )
        return self

    # ---- derived values, for the parser ----
    @property
    def sync_bytes(self) -> bytes:
        """The sync as bytes (``b""`` for line framing)."""
        return bytes.fromhex(self.sync) if self.sync else b""

    @property
    def frame_length(self) -> int:
        """Total bytes of a binary frame: sync + payload + checksum."""
        if self.layout is None or self.checksum is None:
            return 0
        return len(self.sync_bytes) + struct.calcsize(self.layout) + SIZES[self.checksum]

    @property
    def item_count(self) -> int:
        """How many values the binary layout unpacks to (pad bytes give none)."""
        return len(struct.unpack(self.layout, bytes(struct.calcsize(self.layout)))) if self.layout else 0

    @property
    def group_names(self) -> list[str]:
        """Named groups of the line pattern, in order."""
        return list(re.compile(self.pattern).groupindex) if self.pattern else []


class FieldConfig(StrictModel):
    """One value of a frame and what it means in the event."""

    name: str | int = Field(
        description="Named group of the line pattern, or 0-based index of the value in the binary layout."
    )
    quantity: str = Field(
        min_length=1,
        description="What it measures: temperature, humidity, ... (meter); occupied, confidence (parking); "
        "count, max_count (crosswalk).",
    )
    unit: str | None = Field(
        default=None,
        description="Unit after scaling. emits meter: the vocabulary's unit for the quantity (the default; "
        "convert with scale/offset); otherwise free ('' for counts and flags).",
    )
    scale: float = Field(default=1.0, description="value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="Added after scaling.")


class SerialConfig(DeviceConfig):
    """A sensor streaming frames on a serial port (RS-232/RS-485/USB adapter)."""

    driver: Literal["serial"] = Field(description="Serial line protocol (streamed frames).")
    interval: Duration = Field(
        default=1.0,
        gt=0,
        description=(
            "Longest expected time between frames. Each interval without a valid frame counts as a "
            "failed poll, so the device goes offline after interval x offline_after of silence."
        ),
    )
    port: str = Field(
        min_length=1,
        description="Serial port path; prefer the stable /dev/serial/by-id/... name of a USB adapter.",
    )
    baudrate: int = Field(default=9600, gt=0, le=4_000_000, description="Line speed in bit/s.")
    parity: Literal["N", "E", "O"] = Field(default="N", description="Parity: N (none), E (even), O (odd).")
    stopbits: Literal[1, 2] = Field(default=1, description="Stop bits: 1 or 2.")
    bytesize: Literal[7, 8] = Field(default=8, description="Data bits: 7 or 8.")
    framing: FramingConfig = Field(
        description=(
            'How frames are delimited. {kind: line, pattern, terminator: "\\n", encoding: ascii, max_line: 512, '
            "resync: true} or {kind: binary, sync: hex, layout: struct format, checksum: "
            "sum8|xor|crc16-modbus|crc8|none, length (checked), checksum_over: payload|sync+payload, "
            "checksum_byteorder: little|big}."
        )
    )
    fields: list[FieldConfig] = Field(
        min_length=1,
        description="Frame values to report: each {name: group or index, quantity, unit: '', scale: 1, offset: 0}.",
    )
    emits: EmitsName = Field(
        default="meter",
        description=(
            "meter: city.meter.reading, one measurement per field; parking: city.parking.occupancy "
            "(needs bay and an occupied field, optional confidence 0..1, default 1); crosswalk: "
            "city.crosswalk.presence (needs area and a count field, optional max_count)."
        ),
    )
    bay: str | None = Field(default=None, min_length=1, description="Parking bay id (emits: parking).")
    area: str | None = Field(default=None, min_length=1, description="Waiting area id (emits: crosswalk).")
    window: Duration = Field(
        default=60.0,
        gt=0,
        description="emits crosswalk: max_count is the most people seen over this sliding window "
        "(unless the sensor sends a max_count field).",
    )
    reconnect_max: Duration = Field(
        default=10.0,
        gt=0,
        description="When the port disappears (adapter unplugged), retry opening it after 0.25 s, "
        "doubling up to this delay.",
    )

    @field_validator("fields")
    @classmethod
    def _fields_exist(cls, fields: list[FieldConfig], info: ValidationInfo) -> list[FieldConfig]:
        framing = info.data.get("framing")
        if not isinstance(framing, FramingConfig):
            return fields  # the framing's own error is reported; checking against it would mislead
        problems = []
        for index, field in enumerate(fields):
            name = field.name
            if framing.kind == "line":
                groups = framing.group_names
                if str(name) not in groups:
                    problems.append(
                        f"fields[{index}] name {name!r} is not a named group of the pattern "
                        f"(its groups: {', '.join(groups)})"
                    )
            else:
                count = framing.item_count
                if isinstance(name, str):
                    name = int(name) if name.isdigit() else name
                if not isinstance(name, int) or not 0 <= name < count:
                    problems.append(
                        f"fields[{index}] name {field.name!r} must be the index of a value of layout "
                        f"{framing.layout!r}: 0 to {count - 1}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return fields

    @model_validator(mode="after")
    def _emits_needs(self) -> SerialConfig:
        quantities = [f.quantity for f in self.fields]
        for key, emits in (("bay", "parking"), ("area", "crosswalk")):
            if getattr(self, key) is not None and self.emits != emits:
                raise ValueError(f"{key}: only used with emits: {emits} (this device emits {self.emits})")
        if self.emits == "meter":
            for index, f in enumerate(self.fields):
                if f.quantity not in QUANTITY_UNITS:
                    raise ValueError(
                        f"fields[{index}] quantity {f.quantity!r} is not in the vocabulary "
                        f"({', '.join(sorted(QUANTITY_UNITS))})"
                    )
                if f.unit is not None and f.unit != QUANTITY_UNITS[f.quantity]:
                    raise ValueError(
                        f"fields[{index}] unit {f.unit!r}: {f.quantity} is reported in "
                        f"{QUANTITY_UNITS[f.quantity] or 'no unit'!r}; convert with scale and offset"
                    )
            return self
        key = "bay" if self.emits == "parking" else "area"
        if getattr(self, key) is None:
            raise ValueError(f"emits: {self.emits} needs `{key}` (the {key} id reported in each event)")
        required = REQUIRED_QUANTITY[self.emits]
        allowed = EVENT_QUANTITIES[self.emits]
        if required not in quantities:
            raise ValueError(f"emits: {self.emits} needs a field with quantity: {required}")
        unknown = [q for q in quantities if q not in allowed]
        if unknown:
            raise ValueError(
                f"emits: {self.emits} carries only quantities {', '.join(allowed)}; "
                f"{', '.join(map(repr, unknown))} would be dropped (use emits: meter for other values)"
            )
        duplicated = sorted(q for q, count in Counter(quantities).items() if count > 1)
        if duplicated:
            raise ValueError(f"emits: {self.emits}: quantity {', '.join(duplicated)} given by more than one field")
        return self

    def device_paths(self) -> list[str]:
        """The serial port this sensor streams on."""
        return [self.port]

    def field_key(self, field: FieldConfig) -> str | int:
        """The key of ``field`` in a parsed frame: group name (line) or value index (binary)."""
        if self.framing.kind == "binary" and isinstance(field.name, str):
            return int(field.name)
        return field.name if self.framing.kind == "binary" else str(field.name)
