"""Registers <-> values for every point type, byte order and word order.

Modbus carries each 16-bit register big-endian. Devices differ in how they lay a wider value
across registers: ``word_order: big`` puts the high word first (the Modbus convention, e.g.
Eastron), ``little`` the low word first (many PLCs); ``byte_order: little`` swaps the two bytes
inside each register (rare, "byte-swapped" devices).

A float32 register becomes the shortest decimal that reads back as the same float32
(:func:`shortest_float32`): 230.1, not 230.10000610351562, the same float widened to 64 bits.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

# Re-exported: every float32 the codec decodes goes through it.
from agent.contract.floats import shortest_float32 as shortest_float32

_FORMATS = {
    "int16": ">h", "uint16": ">H", "bitfield": ">H", "int32": ">i", "uint32": ">I", "float32": ">f",
    "int64": ">q", "uint64": ">Q", "float64": ">d",
}  # fmt: skip


def _to_bytes(registers: list[int], byte_order: str, word_order: str) -> bytes:
    words = list(reversed(registers)) if word_order == "little" else registers
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    if byte_order == "little":
        raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
    return raw


def _from_bytes(raw: bytes, byte_order: str, word_order: str) -> list[int]:
    if byte_order == "little":
        raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return list(reversed(words)) if word_order == "little" else words


def decode(
    registers: list[int], type_: str, *, byte_order: str = "big", word_order: str = "big", bit: int | None = None
) -> float | int | str:
    """The raw value of ``registers`` read as ``type_`` (before scale and offset).

    Raises:
        ValueError: wrong register count for the type, or a float that is NaN/infinite
            (devices use those to say "not available"; callers report the point as bad).
    """
    if type_ == "string":
        # Strings are byte sequences in register order; only the byte order applies.
        return _to_bytes(registers, byte_order, "big").rstrip(b"\x00 ").decode("latin-1")
    fmt = _FORMATS[type_]
    need = struct.calcsize(fmt) // 2
    if len(registers) != need:
        raise ValueError(f"{type_} needs {need} registers, got {len(registers)}")
    (value,) = struct.unpack(fmt, _to_bytes(registers, byte_order, word_order))
    if type_ == "bitfield":
        return (int(value) >> (bit or 0)) & 1
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(not_available(type_, value))
    if type_ == "float32":
        return shortest_float32(value)
    return value  # type: ignore[no-any-return]


def not_available(type_: str, value: float) -> str:
    """Why a NaN or infinite float is no reading: devices use them to say "not available"."""
    return f"{type_} is {value} (device says not available)"


def encode(
    value: float | int | str, type_: str, *, byte_order: str = "big", word_order: str = "big", length: int | None = None
) -> list[int]:
    """Registers that :func:`decode` reads back as ``value`` (the simulator's half).

    Raises:
        struct.error: the value does not fit the type.
    """
    if type_ == "string":
        raw = str(value).encode("latin-1")[: 2 * (length or 1)].ljust(2 * (length or 1), b"\x00")
        return _from_bytes(raw, byte_order, "big")
    fmt = _FORMATS[type_]
    packed = struct.pack(fmt, value if fmt[-1] in "fd" else int(value))
    return _from_bytes(packed, byte_order, word_order)


# What each integer type holds: a write outside it is refused, never wrapped or clamped.
INT_RANGES: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}  # fmt: skip
NUMERIC_TYPES = (*INT_RANGES, "float32", "float64")


class OutOfRange(ValueError):
    """The value does not fit the point's type once scaled."""


def encode_scaled(
    value: float | int,
    type_: str,
    *,
    byte_order: str = "big",
    word_order: str = "big",
    scale: float = 1.0,
    offset: float = 0.0,
) -> list[int]:
    """Registers that :func:`compile_decoder` (same type, orders, scale, offset) reads as ``value``.

    ``value`` is in engineering units: the raw value is ``(value - offset) / scale``. An integer
    type takes the nearest whole raw value, since the device cannot hold a finer step than one
    ``scale``; integers are kept exact when no scaling applies (64-bit counters exceed a float).

    Raises:
        ValueError: a type that is not a number (string, bitfield), a value that is not a finite
            number, ``scale`` 0, or a raw value outside the type's range.
    """
    if type_ not in NUMERIC_TYPES:
        raise ValueError(f"{type_} points hold no single number to write")
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if scale == 0:
        raise ValueError("scale 0 cannot be inverted")
    raw: float | int = value if (scale, offset) == (1.0, 0.0) else (value - offset) / scale
    shown = f"{value} (raw {raw:g})" if raw != value else f"{value}"
    if not math.isfinite(raw):  # a huge value over a tiny scale
        raise OutOfRange(f"{shown} is out of range for {type_}")
    if type_ in INT_RANGES:
        low, high = INT_RANGES[type_]
        raw = raw if isinstance(raw, int) else round(raw)
        if not low <= raw <= high:
            raise OutOfRange(f"{shown} is out of range for {type_} ({low}..{high})")
    try:
        return encode(raw, type_, byte_order=byte_order, word_order=word_order)
    except (OverflowError, struct.error) as exc:  # float32 beyond +-3.4e38
        raise OutOfRange(f"{shown} is out of range for {type_}") from exc


Decoder = Callable[[bytes, int], "float | int | str"]


def compile_decoder(
    type_: str,
    *,
    byte_order: str = "big",
    word_order: str = "big",
    bit: int | None = None,
    length: int = 1,
    scale: float = 1.0,
    offset: float = 0.0,
) -> Decoder:
    """A function ``(buffer, byte_offset) -> value`` for one point, prepared once at plan time.

    ``buffer`` is a request's registers packed big-endian (as they came off the wire). The
    common layout (big/big) is one ``struct`` call; other orders go through :func:`decode`.
    The value is scaled; the same errors as :func:`decode` are raised.
    """
    width = 2 * (length if type_ == "string" else struct.calcsize(_FORMATS[type_]) // 2)
    identity = scale == 1.0 and offset == 0.0

    def scaled(raw: float | int) -> float | int:
        return raw if identity else round(raw * scale + offset, 9)

    if type_ == "string" or byte_order != "big" or word_order != "big":
        words = struct.Struct(f">{width // 2}H").unpack_from

        def general(buffer: bytes, at: int) -> float | int | str:
            raw = decode(list(words(buffer, at)), type_, byte_order=byte_order, word_order=word_order, bit=bit)
            return raw if isinstance(raw, str) else scaled(raw)

        return general
    unpack = struct.Struct(_FORMATS[type_]).unpack_from
    if type_ == "bitfield":
        shift = bit or 0
        return lambda buffer, at: scaled((unpack(buffer, at)[0] >> shift) & 1)
    if type_.startswith("float"):
        single = type_ == "float32"

        def floating(buffer: bytes, at: int) -> float | int:
            (value,) = unpack(buffer, at)
            if not math.isfinite(value):
                raise ValueError(not_available(type_, value))
            return scaled(shortest_float32(value) if single else value)

        return floating
    return lambda buffer, at: scaled(unpack(buffer, at)[0])


BlockDecoder = Callable[[bytes], Sequence[float | int]]


def compile_block(layout: list[tuple[int, str]], count: int) -> BlockDecoder | None:
    """One ``struct`` call for a whole read of big/big numbers, prepared once per read.

    ``layout`` is each point's (register offset in the read, type), in address order; the
    result unpacks a read's bytes into the points' raw values (before scale, NaN not checked;
    float32 as :func:`shortest_float32`, as the per-point decoders give them).
    None when a point needs its own decoder (strings, bitfields, overlapping points).
    """
    parts, at = [">"], 0
    for offset, type_ in layout:
        if type_ in ("string", "bitfield") or offset < at:
            return None
        if offset > at:
            parts.append(f"{2 * (offset - at)}x")
        code = _FORMATS[type_]
        parts.append(code[1])
        at = offset + struct.calcsize(code) // 2
    if at > count:
        return None
    unpack = struct.Struct("".join(parts)).unpack_from
    singles = [i for i, (_, type_) in enumerate(layout) if type_ == "float32"]
    if not singles:
        return unpack

    def block(buffer: bytes) -> list[float | int]:
        values = list(unpack(buffer))
        for i in singles:
            if math.isfinite(values[i]):  # NaN and inf stay, for the caller's "not available"
                values[i] = shortest_float32(values[i])
        return values

    return block
