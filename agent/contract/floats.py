"""Float32 values as a person would write them: the shortest decimal that reads back as the same bits.

A float32 (a Modbus register pair, an OPC UA Float, a serial frame's ``f`` field) widened to a
Python float carries digits the device never had: 230.1 becomes 230.10000610351562. Every
driver publishes float32 values through :func:`shortest_float32`, so MQTT, OPC UA and the
technician tools all show 230.1.
"""

from __future__ import annotations

import functools
import math
import struct
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

_FLOAT32 = struct.Struct(">f")
_pack32 = _FLOAT32.pack
_POW10 = [10.0**k for k in range(23)]  # exact doubles
_LARGEST_FLOAT32 = 3.4028234663852886e38


def shortest_float32(value: float) -> float:
    """A float32 ``value`` (widened to a Python float) as the shortest decimal that reads back as it.

    Widened, a float32 register holding 230.1 is 230.10000610351562: digits the device never had.
    The result is the float of the decimal with the fewest significant digits (at most nine) that,
    narrowed back to float32, gives the same bits; its repr is that decimal (230.1). NaN,
    infinities and zeros come back as they are.
    """
    size = abs(value)
    if not 1e-4 <= size < 1e6:
        return _shortest_by_format(value)
    # Meter readings, fast: candidates are the nearest decimals with so many places. value * 10**n
    # is exact here (a 24-bit significand times 5**n, n <= 12, fits in 53 bits), so round() picks
    # the nearest, and r / 10**n is the float of that decimal (exact operands, one rounding).
    # floor(log10) is exact too: no float32 in this range is within 1e-15 of a power of ten but
    # the powers themselves. Powers of two here need no care of their own (test_modbus_codec).
    bits = _pack32(value)
    places = 6 - math.floor(math.log10(size))  # for seven significant digits
    scale = _POW10[places]
    seven = round(value * scale) / scale
    if _pack32(seven) == bits:
        scale = _POW10[places - 1]
        six = round(value * scale) / scale  # or fewer: trailing zeros are no digits of a float
        return six if _pack32(six) == bits else seven
    scale = _POW10[places + 1]
    eight = round(value * scale) / scale
    if _pack32(eight) == bits:
        return eight
    scale = _POW10[places + 2]
    nine = round(value * scale) / scale
    return nine if _pack32(nine) == bits else _shortest_by_format(value)  # nine digits always do


def _shortest_by_format(value: float) -> float:
    """:func:`shortest_float32` for any float32, through correctly rounded formatting (slower)."""
    if not math.isfinite(value) or value == 0 or abs(value) > _LARGEST_FLOAT32:
        return value
    bits = _pack32(value)
    if bits.endswith(b"\0\0") and not bits[1] & 0x7F:
        return _shortest_power_of_two(value)
    low, high = (1, 9) if abs(value) < 1.2e-38 else (6, 9)  # subnormals keep fewer digits
    while low < high:  # the fewest digits that read back (more digits never stop reading back)
        digits = (low + high) // 2
        candidate = float(f"{value:.{digits}g}")
        try:
            ok = _FLOAT32.pack(candidate) == bits
        except OverflowError:  # past the largest float32
            ok = False
        if ok:
            high = digits
        else:
            low = digits + 1
    return float(f"{value:.{low}g}")


@functools.cache
def _shortest_power_of_two(value: float) -> float:
    """:func:`shortest_float32` of a power of two, whose gap below is half its gap above.

    The nearest decimal with so many digits may then lie below, outside the narrow half, while
    one above reads back: so both neighbours are tried, in exact decimal arithmetic.
    """
    bits, exact = _FLOAT32.pack(value), Decimal(value)
    for digits in range(1, 10):
        step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
        fits = []
        for rounding in (ROUND_FLOOR, ROUND_CEILING):
            candidate = float(exact.quantize(step, rounding=rounding))
            if abs(candidate) <= _LARGEST_FLOAT32 and _FLOAT32.pack(candidate) == bits:
                fits.append(candidate)
        if fits:
            return min(fits, key=lambda c: abs(Decimal(c) - exact))
    return value
