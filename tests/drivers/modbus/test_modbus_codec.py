"""Modbus decoding, read planning and config: pure functions checked against hand-computed values."""

from __future__ import annotations

import contextlib
import itertools
import math
import struct
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.config.model import parse_config
from agent.errors import ConfigError
from drivers.modbus import codec, profiles
from drivers.modbus.config import ModbusConfig, parse_modicon
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import plan, split
from tests.conftest import Recorder

# (registers as they arrive on the wire, type, byte_order, word_order, expected value).
# Worked by hand: float32 123.456 is 0x42F6E979; int32 -2 is 0xFFFFFFFE; 0x12345678 = 305419896.
HAND_COMPUTED = [
    ([0x1234], "uint16", "big", "big", 0x1234),
    ([0x3412], "uint16", "little", "big", 0x1234),
    ([0xFFFE], "int16", "big", "big", -2),
    ([0x8000], "int16", "big", "big", -32768),
    ([0x1234, 0x5678], "uint32", "big", "big", 305419896),
    ([0x5678, 0x1234], "uint32", "big", "little", 305419896),
    ([0x3412, 0x7856], "uint32", "little", "big", 305419896),
    ([0x7856, 0x3412], "uint32", "little", "little", 305419896),
    ([0xFFFF, 0xFFFE], "int32", "big", "big", -2),
    ([0xFFFE, 0xFFFF], "int32", "big", "little", -2),
    ([0x42F6, 0xE979], "float32", "big", "big", 123.456),
    ([0xE979, 0x42F6], "float32", "big", "little", 123.456),
    ([0xF642, 0x79E9], "float32", "little", "big", 123.456),
    ([0x4366, 0x0000], "float32", "big", "big", 230.0),
    ([0x0001, 0x0002, 0x0003, 0x0004], "uint64", "big", "big", 0x0001000200030004),
    ([0x0004, 0x0003, 0x0002, 0x0001], "uint64", "big", "little", 0x0001000200030004),
    ([0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], "int64", "big", "big", -1),
    # 230.5 as float64 is 0x406CD00000000000
    ([0x406C, 0xD000, 0x0000, 0x0000], "float64", "big", "big", 230.5),
    ([0x0000, 0x0000, 0xD000, 0x406C], "float64", "big", "little", 230.5),
]


@pytest.mark.parametrize(("registers", "type_", "byte_order", "word_order", "expected"), HAND_COMPUTED)
def test_decode_matches_hand_computed_values(registers, type_, byte_order, word_order, expected) -> None:
    value = codec.decode(registers, type_, byte_order=byte_order, word_order=word_order)
    if isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-6)
    else:
        assert value == expected
    # the driver's compiled decoder agrees, at an offset inside a larger read
    buffer = struct.pack(f">{len(registers) + 3}H", 0xDEAD, *registers, 0xBEEF, 0xF00D)
    compiled = codec.compile_decoder(type_, byte_order=byte_order, word_order=word_order)(buffer, 2)
    assert compiled == value
    # and the simulator's encoder writes exactly those registers back
    assert codec.encode(expected, type_, byte_order=byte_order, word_order=word_order) == registers


def test_strings_bitfields_and_not_available_floats() -> None:
    # "SDM630" = 0x53 0x44 0x4D 0x36 0x33 0x30, NUL padded
    assert codec.decode([0x5344, 0x4D36, 0x3330, 0x0000], "string") == "SDM630"
    assert codec.decode([0x4453, 0x364D, 0x3033], "string", byte_order="little") == "SDM630"
    assert [codec.decode([0b1010_0000_0000_0101], "bitfield", bit=b) for b in (0, 1, 2, 13, 15)] == [1, 0, 1, 1, 1]
    flags = struct.pack(">H", 0b1010_0000_0000_0101)
    assert [codec.compile_decoder("bitfield", bit=b)(flags, 0) for b in (0, 1, 2, 13, 15)] == [1, 0, 1, 1, 1]
    assert codec.compile_decoder("string", length=3)(struct.pack(">3H", 0x5344, 0x4D36, 0x3330), 0) == "SDM630"
    assert codec.compile_decoder("int16", scale=0.1, offset=-40)(struct.pack(">h", 655), 0) == 25.5
    with pytest.raises(ValueError, match="not available"):
        codec.compile_decoder("float32")(bytes.fromhex("7fc00000"), 0)
    with pytest.raises(ValueError, match="not available"):
        codec.decode([0x7FC0, 0x0000], "float32")  # NaN: meters say "no value" this way
    with pytest.raises(ValueError, match="needs 2 registers"):
        codec.decode([0x1234], "float32")


@given(
    st.sampled_from(["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
    st.data(),
)
def test_encode_decode_round_trip(type_: str, byte_order: str, word_order: str, data: st.DataObject) -> None:
    bits = int("".join(c for c in type_ if c.isdigit()))
    if type_.startswith("float"):
        value: float | int = data.draw(st.floats(allow_nan=False, allow_infinity=False, width=bits))
    elif type_.startswith("u"):
        value = data.draw(st.integers(0, 2**bits - 1))
    else:
        value = data.draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    registers = codec.encode(value, type_, byte_order=byte_order, word_order=word_order)
    assert len(registers) == bits // 16 and all(0 <= r <= 0xFFFF for r in registers)
    back = codec.decode(registers, type_, byte_order=byte_order, word_order=word_order)
    if type_ == "float32":  # the shortest decimal that is the same float32, written back as the same registers
        assert codec.encode(back, type_, byte_order=byte_order, word_order=word_order) == registers
    else:
        assert back == value


# Scales and offsets as profiles use them: 0.1 V, 0.001 kW per W, m3/s shown as m3/h, a -40 degC origin.
SCALES = [1.0, 0.1, 0.01, 0.001, 0.0001, 10.0, 3600.0, -1.0, 0.5]
OFFSETS = [0.0, -40.0, 273.15, 1000.0]
INTEGER_TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64"]


def _read_back(registers: list[int], type_: str, byte_order: str, word_order: str, scale: float,
               offset: float) -> float | int | str:  # fmt: skip
    """What the driver decodes from ``registers``: its compiled decoder, inside a larger read."""
    decoder = codec.compile_decoder(type_, byte_order=byte_order, word_order=word_order, scale=scale, offset=offset)
    return decoder(struct.pack(f">{len(registers) + 2}H", 0xDEAD, *registers, 0xBEEF), 2)


@given(
    st.sampled_from(INTEGER_TYPES),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
    st.sampled_from(SCALES),
    st.sampled_from(OFFSETS),
    st.data(),
)
def test_encode_scaled_round_trips_every_raw_integer(
    type_: str, byte_order: str, word_order: str, scale: float, offset: float, data: st.DataObject
) -> None:
    """A value the device can hold (raw * scale + offset) is written as exactly that raw value."""
    low, high = codec.INT_RANGES[type_]
    if (scale, offset) != (1.0, 0.0):  # engineering values are floats: keep raw within their 53-bit precision
        low, high = max(low, -(2**50)), min(high, 2**50)
    raw = data.draw(st.integers(low, high))
    value = raw if (scale, offset) == (1.0, 0.0) else raw * scale + offset
    registers = codec.encode_scaled(value, type_, byte_order=byte_order, word_order=word_order, scale=scale,
                                    offset=offset)  # fmt: skip
    assert registers == codec.encode(raw, type_, byte_order=byte_order, word_order=word_order)
    back = _read_back(registers, type_, byte_order, word_order, scale, offset)
    assert back == value if isinstance(value, int) else math.isclose(back, value, rel_tol=1e-9, abs_tol=1e-6)


@given(
    st.sampled_from([*INTEGER_TYPES, "float32", "float64"]),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
    st.sampled_from(SCALES),
    st.sampled_from(OFFSETS),
    st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70),
)
def test_encode_scaled_either_refuses_or_is_read_back_within_one_step(
    type_: str, byte_order: str, word_order: str, scale: float, offset: float, value: float | int
) -> None:
    """Any number: refused as out of range, or decoded back to within half a step of the device's resolution."""
    refused: str | None = None
    try:
        registers = codec.encode_scaled(value, type_, byte_order=byte_order, word_order=word_order, scale=scale,
                                        offset=offset)  # fmt: skip
    except ValueError as exc:
        refused = str(exc)
    if refused is not None:
        assert "out of range" in refused
        raw = value if (scale, offset) == (1.0, 0.0) else (value - offset) / scale
        if type_ in codec.INT_RANGES:
            low, high = codec.INT_RANGES[type_]
            assert not low - 0.5 <= raw <= high + 0.5, f"{value} refused, yet raw {raw} fits {type_}"
        else:
            assert abs(raw) > (3.4e38 if type_ == "float32" else 1.7e308), f"{value} refused, yet raw {raw} fits"
        return
    assert len(registers) == struct.calcsize(codec._FORMATS[type_]) // 2 and all(0 <= r <= 0xFFFF for r in registers)
    back = _read_back(registers, type_, byte_order, word_order, scale, offset)
    assert isinstance(back, int | float)
    if type_ in codec.INT_RANGES:
        tolerance = abs(scale) / 2 + 1e-9 * max(1.0, abs(value))
    else:
        tolerance = 1e-6 * max(abs(value), abs(offset), 1e-30 * abs(scale)) + 1e-9
    assert abs(back - value) <= tolerance, (value, back)


def test_encode_scaled_refuses_what_a_register_cannot_hold() -> None:
    assert codec.encode_scaled(21.5, "int16", scale=0.1, offset=-40) == [615]
    assert codec.encode_scaled(2**64 - 1, "uint64") == [0xFFFF] * 4  # exact: no detour through a float
    assert codec.encode_scaled(True, "uint16") == [1]
    for value, type_, keys, message in [
        (32768, "int16", {}, r"32768 is out of range for int16 \(-32768\.\.32767\)"),
        (-0.6, "uint16", {}, r"-0\.6 is out of range for uint16"),  # rounds to -1
        (7000.1, "uint16", {"scale": 0.1}, r"7000\.1 \(raw 70001\) is out of range for uint16 \(0\.\.65535\)"),
        (3.5e38, "float32", {}, "out of range for float32"),
        (float("inf"), "float64", {}, "inf is not a finite number"),
        ("12", "int32", {}, "'12' is not a number"),
        (1, "int16", {"scale": 0.0}, "scale 0 cannot be inverted"),
        (1, "string", {}, "string points hold no single number"),
        (1, "bitfield", {}, "bitfield points hold no single number"),
    ]:
        with pytest.raises(ValueError, match=message):
            codec.encode_scaled(value, type_, **keys)


# ---- float32 values: the shortest decimal that is the register's value (issue 13) --------------
def _f32(bits: int) -> float:
    return float(struct.unpack(">f", bits.to_bytes(4, "big"))[0])


def _reads_back_as(candidate: Decimal, bits: bytes) -> bool:
    """Whether the decimal, parsed as a Python float and narrowed to float32, has those bits."""
    try:
        return struct.pack(">f", float(candidate)) == bits
    except OverflowError:  # rounds past the largest float32
        return False


def _check_shortest(register: float, published: float) -> None:
    """``published`` gives ``register``'s float32 bits back, and no decimal with fewer digits does.

    The decimals that read back as one float32 form an interval around it, so if any with
    ``k`` significant digits did, the nearest ``k``-digit one below or above the register's exact
    value would: checking those two, in exact decimal arithmetic, covers them all.
    """
    bits = struct.pack(">f", register)
    assert struct.pack(">f", published) == bits, (register, published)
    if register == 0:
        assert published == 0 and math.copysign(1, published) == math.copysign(1, register)
        return
    digits = len(Decimal(repr(published)).normalize().as_tuple().digits)
    assert digits <= 9, (register, published)  # nine always suffice for a float32
    if digits == 1:
        return
    exact = Decimal(register)  # the register's value, exactly
    step = Decimal(1).scaleb(exact.adjusted() - (digits - 2))  # one unit in the last of digits - 1 places
    for rounding in (ROUND_FLOOR, ROUND_CEILING):
        shorter = exact.quantize(step, rounding=rounding)
        assert len(shorter.normalize().as_tuple().digits) < digits
        assert not _reads_back_as(shorter, bits), f"{register!r} published as {published!r}, yet {shorter} reads back"


@example(bits=0x4366199A)  # 230.1, the voltage: 230.10000610351562 when widened
@example(bits=0x3F800000)  # 1.0
@example(bits=0x00000001)  # the smallest subnormal, 1e-45
@example(bits=0x7F7FFFFF)  # the largest float32, 3.4028235e38
@example(bits=0x80000000)  # -0.0
@given(st.integers(0, 2**32 - 1))
def test_a_float32_is_published_as_the_shortest_decimal_that_reads_back_as_its_bits(bits: int) -> None:
    register = _f32(bits)
    if not math.isfinite(register):
        assert codec.shortest_float32(register) is register or math.isnan(register)  # NaN and inf: not numbers
        return
    _check_shortest(register, codec.shortest_float32(register))


def test_shortest_float32_at_every_power_of_two_and_of_ten_and_their_neighbours() -> None:
    """Where the gap below a float32 is half the gap above (a power of two), and around powers of ten.

    The fast path (1e-4 <= |value| < 1e6) takes its digit count from log10 and treats powers of
    two like any value: every one of those cases is checked here, not sampled.
    """
    patterns = [exponent << 23 | mantissa for exponent in range(256)
                for mantissa in (0, 1, 2, 0x7FFFFF, 0x7FFFFE, 0x400000, 0x4CCCCD)]  # fmt: skip
    for k in range(-45, 39):
        (nearest,) = struct.unpack(">I", struct.pack(">f", float(f"1e{k}")))
        patterns += [nearest + delta for delta in range(-3, 4)]
    for pattern in patterns:
        for sign in (0, 1 << 31):
            register = _f32((pattern | sign) & 0xFFFFFFFF)
            if math.isfinite(register):
                _check_shortest(register, codec.shortest_float32(register))


def test_every_decode_path_publishes_float32_registers_as_their_shortest_decimal() -> None:
    """230.1 in a float32 register is 230.1, not 230.10000610351562, whichever path decodes it."""
    registers = [0x4366, 0x199A]  # float32 230.1, big/big
    buffer = struct.pack(">4H", 0xDEAD, *registers, 0xBEEF)
    for value in (
        codec.decode(registers, "float32"),
        codec.decode(registers[::-1], "float32", word_order="little"),
        codec.compile_decoder("float32")(buffer, 2),
        codec.compile_decoder("float32", word_order="little")(struct.pack(">2H", *registers[::-1]), 0),
        codec.compile_decoder("float32", byte_order="little")(struct.pack("<2H", *registers), 0),
    ):
        assert repr(value) == "230.1"
    block = codec.compile_block([(1, "float32"), (3, "uint16")], 4)
    assert block is not None
    assert [repr(v) for v in block(buffer)] == ["230.1", "48879"]
    # Scaled: 270.7 W read as kW is 0.2707, not 0.270700012.
    assert codec.compile_decoder("float32", scale=0.001)(struct.pack(">f", 270.7), 0) == 0.2707
    # A float64 keeps all it has: the device sent those digits.
    assert codec.decode(list(struct.unpack(">4H", struct.pack(">d", 230.10000610351562))), "float64") == (
        230.10000610351562
    )


@given(st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=6), st.sampled_from(list(codec._FORMATS)))
def test_decode_never_fails_other_than_by_value_error(registers: list[int], type_: str) -> None:
    with contextlib.suppress(ValueError):
        codec.decode(registers, type_, bit=3)


def test_modicon_numbers() -> None:
    assert parse_modicon("30001") == ("input", 0)
    assert parse_modicon("40073") == ("holding", 72)
    assert parse_modicon("00001") == ("coil", 0)
    assert parse_modicon("10008") == ("discrete", 7)
    assert parse_modicon("365536") == ("input", 65535)
    for bad in ("20001", "40000", "abc", "4001"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_modicon(bad)


def _device(points: list[dict], **keys) -> ModbusConfig:
    return ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "10.0.0.5", "points": points, **keys})


def _p(name: str, address: int, type_: str = "float32", table: str = "input", **kw) -> dict:
    return {"name": name, "table": table, "address": address, "type": type_, "quantity": "voltage", **kw}


def test_planner_coalesces_adjacent_points_and_respects_limits() -> None:
    device = _device([_p("a", 0), _p("b", 2), _p("c", 6), _p("d", 40), _p("e", 0, "uint16", "holding")])
    got = [(r.table, r.address, r.count, [p.name for p in r.points]) for r in plan(device)]
    # a,b,c within the gap of 8 -> one read of 0..7; d is 32 registers further -> its own read
    assert got == [("holding", 0, 1, ["e"]), ("input", 0, 8, ["a", "b", "c"]), ("input", 40, 2, ["d"])]
    strict = _device([_p("a", 0), _p("b", 2), _p("c", 6)], max_gap=0)
    assert [(r.address, r.count) for r in plan(strict)] == [(0, 4), (6, 2)]
    small = _device([_p(f"p{i}", 2 * i) for i in range(100)], max_registers=50)
    assert [(r.address, r.count) for r in plan(small)] == [(0, 50), (50, 50), (100, 50), (150, 50)]
    full = _device([_p(f"p{i}", 2 * i) for i in range(100)])
    assert [(r.address, r.count) for r in plan(full)] == [(0, 124), (124, 76)]  # 125 max, floats not split


def test_planner_keeps_poll_intervals_apart() -> None:
    device = _device([_p("fast", 0, interval="1s"), _p("slow", 2, interval="1m"), _p("dflt", 4)], interval="5s")
    got = sorted((r.interval, r.address) for r in plan(device))
    assert got == [(1.0, 0), (5.0, 4), (60.0, 2)]


def test_a_refused_read_splits_at_its_holes_then_into_one_read_per_register_span() -> None:
    device = _device([_p("a", 0), _p("b", 2), _p("c", 6), _p("bit0", 8, "bitfield", bit=0),
                      _p("bit1", 8, "bitfield", bit=1)])  # fmt: skip
    (merged,) = plan(device)
    assert (merged.address, merged.count) == (0, 9)
    runs = split(merged)  # the hole 4..5 cut: 0..3 and 6..8
    assert [(r.address, r.count, [p.name for p in r.points]) for r in runs] == [
        (0, 4, ["a", "b"]), (6, 3, ["c", "bit0", "bit1"])
    ]  # fmt: skip
    spans = split(runs[1])  # no hole left: one read per span, the two bits of register 8 together
    assert [(r.address, r.count, [p.name for p in r.points]) for r in spans] == [
        (6, 2, ["c"]), (8, 1, ["bit0", "bit1"])
    ]  # fmt: skip
    assert split(spans[1]) == [spans[1]]  # one register: nothing smaller to try
    assert all(r.interval == merged.interval and r.table == "input" for r in runs + spans)


def _valid(requests, config: ModbusConfig) -> None:
    seen = []
    for r in requests:
        limit = config.max_bits if r.table in ("coil", "discrete") else config.max_registers
        assert r.count <= limit
        ordered = sorted(r.points, key=lambda p: p.address)
        for point in ordered:
            assert r.address <= point.address and point.address + point.registers <= r.end
        for left, right in itertools.pairwise(ordered):
            assert right.address - (left.address + left.registers) <= config.max_gap
        seen += [p.name for p in r.points]
    assert sorted(seen) == sorted(p.name for p in config.points)  # every point read exactly once


def _fewest_requests(points: list[tuple[int, int]], limit: int, gap: int) -> int:
    """Brute force: fewest runs of address-sorted points with span <= limit and holes <= gap."""
    points = sorted(points)
    best = [0] + [10**9] * len(points)
    for i in range(1, len(points) + 1):
        for j in range(i):
            run = points[j:i]
            span = max(a + n for a, n in run) - run[0][0]
            holes = all(b[0] - (a[0] + a[1]) <= gap for a, b in itertools.pairwise(run))
            if span <= limit and holes:
                best[i] = min(best[i], best[j] + 1)
    return best[-1]


@given(
    st.lists(
        st.tuples(st.integers(0, 300), st.sampled_from([1, 2, 4])), min_size=1, max_size=12, unique_by=lambda t: t[0]
    ),
    st.integers(4, 40),
    st.integers(0, 10),
)
def test_planner_is_valid_and_uses_the_fewest_requests(points: list[tuple[int, int]], limit: int, gap: int) -> None:
    # Non-overlapping points, as real register maps are.
    laid: list[tuple[int, int]] = []
    for address, width in sorted(points):
        if not laid or address >= laid[-1][0] + laid[-1][1]:
            laid.append((address, width))
    types = {1: "uint16", 2: "float32", 4: "float64"}
    config = _device([_p(f"p{i}", a, types[w]) for i, (a, w) in enumerate(laid)], max_registers=limit, max_gap=gap)
    requests = plan(config)
    _valid(requests, config)
    assert len(requests) == _fewest_requests(laid, limit, gap)


_WIDTHS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4}


@given(
    st.lists(st.tuples(st.sampled_from(sorted(_WIDTHS)), st.integers(0, 3), st.sampled_from([1.0, 0.1, 0.001])),
             min_size=1, max_size=10),
    st.lists(st.integers(0, 0xFFFF), min_size=200, max_size=200),
    st.sampled_from(["big", "little"]),
)  # fmt: skip
def test_a_whole_read_decodes_exactly_as_its_points_one_by_one(
    layout: list[tuple[str, int, float]], registers: list[int], word_order: str
) -> None:
    points, address = [], 0
    for i, (type_, hole, scale) in enumerate(layout):
        address += hole
        points.append(_p(f"p{i}", address, type_, "holding", scale=scale, offset=1.5 if i % 2 else 0.0))
        address += _WIDTHS[type_]
    registers[0:4] = [0x7FC0, 0, 0, 0]  # NaN as a float32 or float64 when a float point sits there
    config = _device(points, word_order=word_order)
    driver = ModbusDriver(config, Recorder())
    for read in driver.requests:
        values = registers[read.address : read.end]
        buffer = struct.pack(f">{len(values)}H", *values)
        one_by_one = [driver._decode_point(p, buffer, p.address - read.address) for p in read.points]
        assert driver._decode(read, values) == one_by_one
        assert (read.block is not None) == (word_order == "big")  # big/big takes the one-struct path


def test_every_shipped_profile_loads_cites_its_manual_and_plans_within_its_limits() -> None:
    shipped = {name: path for name, path in profiles.available().items() if path.parent == profiles.BUILTIN_DIR}
    assert len(shipped) >= 5, f"expected at least five shipped profiles, found {sorted(shipped)}"
    for name in shipped:
        device = ModbusConfig.model_validate(
            {"id": "m", "driver": "modbus", "transport": "rtu", "profile": name, "serial": {"port": "/dev/ttyUSB0"}}
        )
        _valid(plan(device), device)
        profile = profiles.load(name)
        assert profile["manual"]["title"] and profile["manual"]["revision"], name
    # Coalescing on a profile without read limits of its own: the SDM630's 36 points in 4 reads.
    sdm630 = ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "h", "profile": "eastron-sdm630"})
    assert (len(sdm630.points), len(plan(sdm630))) == (36, 4)


SITE = """\
gateway: {id: gw-1}
uplink: {mqtt: {host: 127.0.0.1}}
devices:
"""


def _problems(devices: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(SITE + devices, Path("/site/site.yaml"))
    return err.value.problems


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("  - {id: m1, driver: modbus, host: h, profile: nope-9000}\n", "unknown profile 'nope-9000'"),
        (
            "  - {id: m1, driver: modbus, transport: rtu, points: [{name: v, address: 0, quantity: voltage}]}\n",
            "transport rtu needs serial",
        ),
        (
            "  - {id: m1, driver: modbus, points: [{name: v, address: 0, quantity: voltage}]}\n",
            "transport tcp needs host",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0, quantity: volts}]}\n",
            "unknown quantity 'volts'",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0, type: bool, quantity: voltage}]}\n",
            "type bool is for coil/discrete",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0, table: coil, quantity: counter}]}\n",
            "single bit; use type: bool",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0, type: string, quantity: counter}]}\n",
            "length is required",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0}]}\n",
            "exactly one of quantity, bay, area",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 70000, quantity: voltage}]}\n",
            "less than or equal to 65535",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 65535, type: float32, "
            "quantity: voltage}]}\n",
            "runs past address 65535",
        ),
        ("  - {id: m1, driver: modbus, host: h, points: []}\n", "no points"),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0, quantity: voltage}, "
            "{name: v, address: 1, quantity: voltage}]}\n",
            "duplicate point names: v",
        ),
        (
            "  - {id: m1, driver: modbus, transport: rtu, serial: {port: /dev/ttyUSB0, baudrate: 9601}, "
            "points: [{name: v, address: 0, quantity: voltage}]}\n",
            "unusual baudrate 9601",
        ),
        (
            "  - {id: m1, driver: modbus, transport: rtu, unit: 248, serial: {port: /dev/ttyUSB0}, "
            "points: [{name: v, address: 0, quantity: voltage}]}\n",
            "serial unit ids are 1..247",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, profile: eastron-sdm630, exclude: [nosuchpoint]}\n",
            "lacks: ['nosuchpoint']",
        ),
        (
            "  - {id: m1, driver: modbus, host: h, points: [{name: v, address: 0, quantity: voltage, scael: 2}]}\n",
            "scael",
        ),
    ],
)
def test_bad_modbus_devices_are_refused_naming_the_field(device: str, expected: str) -> None:
    problems = _problems(device)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("/site/site.yaml:") and "devices[0]" in p for p in problems), problems


def test_a_profile_is_extended_overridden_and_trimmed_per_device(tmp_path: Path) -> None:
    base = ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "h", "profile": "eastron-sdm630"})
    names = [p.name for p in base.points]
    victim, tweaked = names[0], names[1]
    device = ModbusConfig.model_validate({
        "id": "m", "driver": "modbus", "host": "h", "profile": "eastron-sdm630", "exclude": [victim],
        "points": [{"name": tweaked, "deadband": 0.5}, _p("extra_temp", 900, quantity="temperature")],
    })  # fmt: skip
    got = {p.name: p for p in device.points}
    assert victim not in got and "extra_temp" in got
    assert got[tweaked].deadband == 0.5 and got[tweaked].address == base.points[1].address
    assert len(device.points) == len(base.points)  # one out, one in
    # A site's own profiles/ folder wins over the shipped one.
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "eastron-sdm630.yaml").write_text(
        "profile: eastron-sdm630\nmanual: {title: local, revision: '1'}\n"
        "points: [{name: only, table: input, address: 4, type: float32, quantity: voltage}]\n"
    )
    local = parse_config(SITE + "  - {id: m1, driver: modbus, host: h, profile: eastron-sdm630}\n",
                         tmp_path / "site.yaml")  # fmt: skip
    assert [p.name for p in local.devices[0].points] == ["only"]  # type: ignore[attr-defined]


def test_devices_sharing_a_bus_must_agree_on_line_settings_and_use_distinct_units() -> None:
    point = "points: [{name: v, address: 0, quantity: voltage}]"
    problems = _problems(
        f"  - {{id: a, driver: modbus, transport: rtu, unit: 1, serial: {{port: /dev/ttyUSB0}}, {point}}}\n"
        f"  - {{id: b, driver: modbus, transport: rtu, unit: 2, serial: {{port: /dev/ttyUSB0, parity: E}}, {point}}}\n"
        f"  - {{id: c, driver: modbus, transport: rtu, unit: 1, serial: {{port: /dev/ttyUSB0}}, {point}}}\n"
        f"  - {{id: d, driver: modbus, transport: rtu, unit: 1, serial: {{port: /dev/ttyUSB1}}, {point}}}\n"
        f"  - {{id: e, driver: modbus, host: 10.0.0.9, unit: 1, {point}}}\n"
    )
    assert problems == [
        "/site/site.yaml:5: devices[1].serial: /dev/ttyUSB0 is also used by devices[0] (a) with other line "
        "settings; one RS-485 bus has one baudrate, parity and stop bits",
        "/site/site.yaml:6: devices[2].unit: unit 1 on /dev/ttyUSB0 is also devices[0]; each unit on one bus "
        "needs its own id",
    ]
