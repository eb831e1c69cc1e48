"""The serial driver: checksums, frame parsers under noise, config errors, and the driver on real ptys.

The end-to-end tests run the real agent and a real Mosquitto broker; the sensor is the
driver's own simulator writing to a pseudo-terminal the agent opens like a USB adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest
import serial
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.model import parse_config
from agent.devices.runner import DeviceRunner
from agent.errors import ConfigError, DriverStartupError
from drivers.serial import PLUGIN
from drivers.serial.checksums import FUNCTIONS, checksum_bytes
from drivers.serial.config import FramingConfig, SerialConfig
from drivers.serial.driver import SerialDriver, make_parser
from drivers.serial.faults import FaultLog
from drivers.serial.framing import BadFrame, BinaryParser, Frame, LineParser, float32_fields
from drivers.serial.mapping import scaled
from drivers.serial.simulator import PtySink, Simulator
from tests.conftest import ROOT, Mosquitto, wait_for, write_config
from tests.serial_helpers import Feeder, RunningDriver, config_for, device_lines, feed_chunked, summary

CHECK_INPUT = b"123456789"


# ---- checksums ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("crc16-modbus", 0x4B37),  # CRC RevEng catalogue, CRC-16/MODBUS check value
        ("crc8", 0xF4),  # CRC RevEng catalogue, CRC-8/SMBUS (poly 0x07, init 0) check value
        ("sum8", 0xDD),  # 0x31 + ... + 0x39 = 0x1DD
        ("xor", 0x31),  # 0x31 ^ ... ^ 0x39
    ],
)
def test_checksums_match_published_check_values(name, check) -> None:
    assert FUNCTIONS[name](CHECK_INPUT) == check


def test_crc16_modbus_is_sent_low_byte_first() -> None:
    # The classic Modbus RTU request "unit 1, read 10 holding registers from 0": 01 03 00 00 00 0A C5 CD.
    assert checksum_bytes("crc16-modbus", bytes.fromhex("01030000000A")) == bytes.fromhex("C5CD")


def _crc16_modbus_bitwise(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _crc8_bitwise(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


@given(st.binary(max_size=64))
def test_table_driven_crcs_equal_their_bitwise_definitions(data: bytes) -> None:
    assert FUNCTIONS["crc16-modbus"](data) == _crc16_modbus_bitwise(data)
    assert FUNCTIONS["crc8"](data) == _crc8_bitwise(data)


# ---- line framing ---------------------------------------------------------------------------
LINE = FramingConfig(kind="line", pattern=r"T=(?P<t>-?\d+\.\d+);H=(?P<h>\d+)")


@pytest.mark.parametrize("sizes", [[], [1], [3, 7, 2]])
def test_line_frames_are_parsed_whatever_the_chunking(sizes) -> None:
    data = b"T=21.5;H=40\r\nT=-3.25;H=99\n\r\nT=0.0;H=1\r\n"
    frames, faults = summary(feed_chunked(LineParser(LINE), data, sizes))
    assert frames == [{"t": "21.5", "h": "40"}, {"t": "-3.25", "h": "99"}, {"t": "0.0", "h": "1"}]
    assert faults == {}


@pytest.mark.parametrize("sizes", [[], [1], [5, 11]])
def test_line_noise_is_resynchronised_and_counted_exactly(sizes) -> None:
    data = (
        b"T=21.5;H=40\r\n"
        b"\x07\xfe\xffT=21.6;H=41\r\n"  # garbage before a frame: no_sync, and the frame
        b"T=21.7;H=4T=21.8;H=42\r\n"  # a cut-off frame glued to the next one: no_sync, and the frame
        b"T=2\xff1.9;H=43\r\n"  # a damaged byte inside: undecodable
        b"T=abc;H=44\r\n"  # text that does not match: mismatch
        + b"x" * 600
        + b"\r\n"  # longer than max_line (512): no_sync
        + b"T=22.0;H=45\r\n"
    )
    frames, faults = summary(feed_chunked(LineParser(LINE), data, sizes))
    assert [f["t"] for f in frames] == ["21.5", "21.6", "21.8", "22.0"]
    assert faults == {"no_sync": 3, "undecodable": 1, "mismatch": 1}


def test_line_resync_can_be_turned_off() -> None:
    strict = LINE.model_copy(update={"resync": False})
    frames, faults = summary(LineParser(strict).feed(b"\xfeT=21.6;H=41\nzT=21.7;H=42\nT=21.8;H=43\n"))
    assert [f["t"] for f in frames] == ["21.8"]
    assert faults == {"undecodable": 1, "mismatch": 1}


# ---- binary framing -------------------------------------------------------------------------
def _frame(sync: bytes, payload: bytes, checksum: str, over: str = "payload") -> bytes:
    covered = sync + payload if over == "sync+payload" else payload
    return sync + payload + checksum_bytes(checksum, covered)  # type: ignore[arg-type]


@pytest.mark.parametrize("checksum", ["sum8", "xor", "crc16-modbus", "crc8", "none"])
@pytest.mark.parametrize("over", ["payload", "sync+payload"])
def test_binary_frames_are_parsed_with_each_checksum(checksum, over) -> None:
    framing = FramingConfig(kind="binary", sync="AA55", layout="<hH", checksum=checksum, checksum_over=over)
    # 0x55AA packs little-endian as AA 55: a sync inside a good frame must not confuse the parser.
    payloads = [struct.pack("<hH", -1234, 65000), struct.pack("<hH", 7, 0x55AA)]
    data = b"".join(_frame(b"\xaa\x55", p, checksum, over) for p in payloads)
    assert summary(feed_chunked(BinaryParser(framing), data, [1])) == ([{0: -1234, 1: 65000}, {0: 7, 1: 0x55AA}], {})


@pytest.mark.parametrize(
    ("wire", "checksum", "over", "byteorder"),
    [
        ("AA55 0102 03", "sum8", "payload", "little"),  # 01 + 02
        ("AA55 0102 02", "sum8", "sync+payload", "little"),  # AA + 55 + 01 + 02 = 0x102
        ("AA55 0102 03", "xor", "payload", "little"),
        ("AA55 0102 FC", "xor", "sync+payload", "little"),  # AA ^ 55 ^ 01 ^ 02
        ("AA55 0102 1B", "crc8", "payload", "little"),
        ("AA55 0102 81E1", "crc16-modbus", "payload", "little"),
        ("AA55 0102 E181", "crc16-modbus", "payload", "big"),
    ],
)
def test_binary_checksum_coverage_and_byte_order_follow_the_config(wire, checksum, over, byteorder) -> None:
    framing = FramingConfig(
        kind="binary", sync="AA55", layout="<BB", checksum=checksum, checksum_over=over, checksum_byteorder=byteorder
    )
    data = bytes.fromhex(wire)
    assert summary(BinaryParser(framing).feed(data)) == ([{0: 1, 1: 2}], {})
    damaged = data[:-1] + bytes([data[-1] ^ 0x40])
    assert summary(BinaryParser(framing).feed(damaged)) == ([], {"bad_checksum": 1})


def test_crc_values_used_above_are_the_published_algorithms() -> None:
    # The literal CRCs in the previous test, recomputed bit by bit from the definitions.
    assert _crc8_bitwise(b"\x01\x02") == 0x1B
    assert _crc16_modbus_bitwise(b"\x01\x02") == 0xE181


BINARY = FramingConfig(kind="binary", sync="AA55", layout="<hH", checksum="crc16-modbus")


def _good(n: int) -> bytes:
    return _frame(b"\xaa\x55", struct.pack("<hH", n, 1000 + n), "crc16-modbus")


@pytest.mark.parametrize("sizes", [[], [1], [3, 5, 7]])
def test_binary_noise_is_resynchronised_and_counted_exactly(sizes) -> None:
    g = [_good(n) for n in range(6)]
    corrupt = g[1][:-1] + bytes([g[1][-1] ^ 0x01])
    # 21930 is 0x55AA, packed little-endian as AA 55: a sync inside the damaged frame.
    inner_sync = _frame(b"\xaa\x55", struct.pack("<hH", 21930, 7), "crc16-modbus")
    inner_sync_corrupt = inner_sync[:-1] + bytes([inner_sync[-1] ^ 0x01])
    data = (
        g[0]
        + b"\x01\x02\x03"  # garbage: no_sync
        + g[1]
        + corrupt  # bad_checksum
        + g[2]
        + g[3][:5]  # cut off, the good one follows inside its length: bad_checksum
        + g[3]
        + b"\x00\x00\x00"  # garbage: no_sync
        + corrupt  # bad_checksum
        + b"\x11\x12"  # garbage beyond the damaged frame's length: no_sync
        + g[4]
        + inner_sync_corrupt  # bad_checksum, once: the sync inside it is part of the same damage
        + g[5]
    )
    frames, faults = summary(feed_chunked(BinaryParser(BINARY), data, sizes))
    assert [f[0] for f in frames] == [0, 1, 2, 3, 4, 5]
    assert faults == {"no_sync": 3, "bad_checksum": 4}


SIM_CASES = [
    ("line", "crc16-modbus", "meter"),
    ("binary", "crc16-modbus", "meter"),
    ("binary", "sum8", "parking"),
    ("binary", "xor", "crosswalk"),
    ("binary", "crc8", "meter"),
]


@pytest.mark.parametrize(("kind", "checksum", "emits"), SIM_CASES)
def test_simulated_noise_is_counted_exactly_and_every_good_frame_decoded(kind, checksum, emits) -> None:
    sim = Simulator(emits, kind, checksum=checksum, noise=0.3, seed=7)
    data = b"".join(sim.slot() for _ in range(1000))
    config = config_for(sim, "/dev/null")
    rng = random.Random(1)
    results = feed_chunked(make_parser(config), data, [rng.randint(1, 40) for _ in range(100)])
    frames, faults = summary(results)
    assert faults == {reason: n for reason, n in sim.ledger.expected().items() if n}
    assert sim.ledger.faults["garbage"] > 50 and sim.ledger.faults["corrupt"] > 50
    decoded = [{f.quantity: scaled(frame[config.field_key(f)], f) for f in config.fields} for frame in frames]
    assert decoded == sim.truth


# ---- properties of the parsers --------------------------------------------------------------
PROPERTY_FRAMINGS = {
    "line": LINE,
    # A weak checksum makes false candidates pass sometimes: more paths to exercise.
    "binary": FramingConfig(kind="binary", sync="AA", layout="<BH", checksum="sum8"),
    "binary-crc": BINARY,
}
chunkings = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20)


def _norm(results: list) -> list:
    return [("frame", r.values) if isinstance(r, Frame) else ("bad", r.reason) for r in results]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(PROPERTY_FRAMINGS)), data=st.binary(max_size=3000), sizes=chunkings)
def test_random_bytes_never_crash_a_parser_nor_fill_its_buffer(kind, data, sizes) -> None:
    framing = PROPERTY_FRAMINGS[kind]
    parser = LineParser(framing) if framing.kind == "line" else BinaryParser(framing)
    results = feed_chunked(parser, data, sizes)
    assert all(isinstance(r, Frame | BadFrame) for r in results)
    assert len(results) <= len(data)
    bound = framing.max_line + len(framing.terminator) if framing.kind == "line" else framing.frame_length
    assert parser.buffered <= bound


def _stream_parts(kind: str) -> st.SearchStrategy[bytes]:
    """Valid frames, damaged copies and raw noise, for the framing ``kind``."""
    if kind == "line":
        good = st.builds(
            lambda t, h: f"T={t / 100:.2f};H={h}\r\n".encode(), st.integers(-9999, 9999), st.integers(0, 99)
        )
    else:
        framing = PROPERTY_FRAMINGS[kind]
        assert framing.layout is not None
        assert framing.checksum is not None
        layout, checksum, sync = framing.layout, framing.checksum, framing.sync_bytes
        good = st.builds(
            lambda a, b: _frame(sync, struct.pack(layout, a, b), checksum), st.integers(0, 255), st.integers(0, 65535)
        )
    cut = st.tuples(good, st.integers(1, 20)).map(lambda gc: gc[0][: gc[1]])
    return st.one_of(good, cut, st.binary(min_size=1, max_size=20))


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(PROPERTY_FRAMINGS)))
    return kind, b"".join(draw(st.lists(_stream_parts(kind), max_size=30)))


@settings(max_examples=150, deadline=None)
@given(stream=streams(), sizes=chunkings)
def test_parsing_does_not_depend_on_how_the_stream_is_chunked(stream, sizes) -> None:
    kind, data = stream
    framing = PROPERTY_FRAMINGS[kind]
    make = LineParser if framing.kind == "line" else BinaryParser
    assert _norm(feed_chunked(make(framing), data, sizes)) == _norm(make(framing).feed(data))


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(sorted(PROPERTY_FRAMINGS)),
    values=st.tuples(st.integers(0, 255), st.integers(0, 65535)),
    noise=st.binary(max_size=200),
    tail=st.binary(max_size=200),
    sizes=chunkings,
)
def test_a_valid_frame_in_random_noise_is_found(kind, values, noise, tail, sizes) -> None:
    framing = PROPERTY_FRAMINGS[kind]
    if framing.kind == "line":
        # Noise of bytes that are no ASCII text (so no tail of it can look like a frame) and no terminator.
        noise = bytes(b | 0x80 for b in noise)
        frame = f"T={values[0] / 10:.1f};H={values[1]}\n".encode()
        expected: dict = {"t": f"{values[0] / 10:.1f}", "h": str(values[1])}
        parser = LineParser(framing)
    else:
        # Noise without the sync's first byte: no false frame can start in it.
        noise = noise.replace(framing.sync_bytes[:1], b"")
        assert framing.layout is not None
        assert framing.checksum is not None
        frame = _frame(framing.sync_bytes, struct.pack(framing.layout, *values), framing.checksum)
        expected = {0: values[0], 1: values[1]}
        parser = BinaryParser(framing)
    results = feed_chunked(parser, noise + frame + tail, sizes)
    first = next(i for i, r in enumerate(results) if isinstance(r, Frame))
    assert results[first].values == expected
    assert [r.reason for r in results[:first]] == (["no_sync"] if noise else [])


# ---- configuration ------------------------------------------------------------------------
SITE = """\
gateway: {{id: gw-1}}
buffer: {{path: {buffer}}}
devices:
{devices}"""


def _problems(tmp_path: Path, devices: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(SITE.format(buffer=tmp_path / "b.db", devices=devices), tmp_path / "site.yaml")
    return caught.value.problems


@pytest.mark.parametrize(
    ("device", "where", "message"),
    [
        (
            "framing: {kind: line, pattern: 'T=(?P<t>\\d+'}",
            "devices[0].framing.pattern",
            "not a valid regular expression",
        ),
        ("framing: {kind: line, pattern: 'T=(\\d+)'}", "devices[0].framing.pattern", "has no named groups"),
        (
            "framing: {kind: binary, sync: AA55, layout: '<hH', length: 9, checksum: crc8}",
            "devices[0].framing",
            "length 9 does not match the layout: sync 2 + payload 4 ('<hH') + checksum 1 (crc8) = 7 bytes",
        ),
        (
            "framing: {kind: binary, sync: AA55, layout: '<hH', checksum: crc32}",
            "devices[0].framing.checksum",
            "'crc32'",
        ),
        (
            "framing: {kind: binary, sync: AA55, layout: '<hZ', checksum: xor}",
            "devices[0].framing.layout",
            "not a valid struct",
        ),
        ("framing: {kind: binary, sync: AA55, layout: 'hH', checksum: xor}", "devices[0].framing.layout", "byte order"),
        ("framing: {kind: binary, sync: AA55, layout: '<4s', checksum: xor}", "devices[0].framing.layout", "number"),
        ("framing: {kind: binary, sync: 0x55, layout: '<H', checksum: xor}", "devices[0].framing.sync", "quoted hex"),
        ("framing: {kind: binary, sync: AZ, layout: '<H', checksum: xor}", "devices[0].framing.sync", "not hex"),
        ("framing: {kind: binary, layout: '<H'}", "devices[0].framing", "kind: binary needs sync, checksum"),
        (
            "framing: {kind: binary, pattern: 'x', sync: AA, layout: '<H', checksum: xor}",
            "devices[0].framing.pattern",
            "not used with kind: binary",
        ),
        (
            "framing: {kind: line, pattern: 'T=(?P<t>\\d+)', encoding: klingon}",
            "devices[0].framing.encoding",
            "unknown encoding",
        ),
        ("framing: {kind: line, pattern: 'T=(?P<t>\\d+)'}\n    parity: X", "devices[0].parity", "'X'"),
        ("framing: {kind: line, pattern: 'T=(?P<t>\\d+)'}\n    baud: 9600", "devices[0].baud", "unknown key"),
    ],
)
def test_config_errors_name_the_key_and_say_what_is_wrong(tmp_path, device, where, message) -> None:
    devices = (
        f"  - id: s1\n    driver: serial\n    port: /dev/ttyUSB0\n    {device}\n"
        "    fields: [{name: t, quantity: x}]\n"
    )
    problems = _problems(tmp_path, devices)
    assert any(f": {where}: " in p and message in p for p in problems), problems


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "fields: [{name: tt, quantity: temperature}]",
            "fields[0] name 'tt' is not a named group of the pattern (its groups: t)",
        ),
        ("fields: [{name: t, quantity: occupied}]\n    emits: parking", "emits: parking needs `bay`"),
        (
            "fields: [{name: t, quantity: temperature}]\n    emits: parking\n    bay: A1",
            "needs a field with quantity: occupied",
        ),
        (
            "fields: [{name: t, quantity: occupied}, {name: t, quantity: rain}]\n    emits: parking\n    bay: A1",
            "'rain' would be dropped",
        ),
        ("fields: [{name: t, quantity: count}]\n    emits: crosswalk", "emits: crosswalk needs `area`"),
        ("fields: [{name: t, quantity: temperature}]\n    bay: A1", "bay: only used with emits: parking"),
    ],
)
def test_fields_and_emits_are_checked_against_the_framing(tmp_path, extra, message) -> None:
    devices = (
        "  - id: s1\n    driver: serial\n    port: /dev/ttyUSB0\n"
        f"    framing: {{kind: line, pattern: 'T=(?P<t>\\d+)'}}\n    {extra}\n"
    )
    problems = _problems(tmp_path, devices)
    assert any(message in p for p in problems), problems


def test_binary_field_names_are_value_indexes(tmp_path) -> None:
    devices = (
        "  - id: s1\n    driver: serial\n    port: /dev/ttyUSB0\n"
        "    framing: {kind: binary, sync: AA55, layout: '<hxH', checksum: sum8}\n"
        "    fields: [{name: 2, quantity: temperature}]\n"
    )
    problems = _problems(tmp_path, devices)
    assert any("fields[0] name 2 must be the index of a value of layout '<hxH': 0 to 1" in p for p in problems)


def test_defaults_and_escapes(tmp_path) -> None:
    text = SITE.format(
        buffer=tmp_path / "b.db",
        devices="  - {id: s1, driver: serial, port: /dev/ttyUSB0, fields: [{name: t, quantity: temperature}],\n"
        "     framing: {kind: line, pattern: 'T=(?P<t>\\d+)', terminator: '\\r\\n'}}\n",
    )
    device = parse_config(text, tmp_path / "site.yaml").devices[0]
    assert isinstance(device, SerialConfig)
    assert (device.baudrate, device.parity, device.stopbits, device.bytesize) == (9600, "N", 1, 8)
    assert device.framing.terminator == "\r\n"  # single-quoted YAML keeps backslashes; we unescape
    assert (device.emits, device.interval, device.offline_after, device.reconnect_max) == ("meter", 1.0, 3, 10.0)


def test_the_example_config_validates_and_the_driver_is_listed() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", "config/examples/serial-sensor.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "2 devices" in run.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "agent", "drivers"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert re.search(r"^serial\s+Sensors streaming", listed.stdout, re.M), listed.stdout


# ---- the fault log --------------------------------------------------------------------------
def test_faults_are_counted_exactly_but_logged_at_most_once_a_minute(caplog) -> None:
    log = logging.getLogger("test.serial.faults")
    faults = FaultLog("s1", log)
    with caplog.at_level(logging.WARNING, logger="test.serial.faults"):
        for i in range(1000):
            faults.record("bad_checksum", f"frame {i}", now=i * 0.05)  # 1000 in 50 s
        faults.record("no_sync", "garbage", now=50.0)
        assert len(caplog.records) == 2  # the first of each kind, at once
        faults.flush(now=59.9)
        assert len(caplog.records) == 2
        faults.flush(now=60.0)
        assert len(caplog.records) == 3
        assert "999 bad frame(s) (bad_checksum) in the last 60s, 1000 of this kind and 1001 bad in total" in (
            caplog.records[-1].getMessage()
        )
        faults.flush(now=200.0)
        faults.flush(now=300.0)
        assert len(caplog.records) == 3  # nothing new, nothing said
    assert faults.totals == {"bad_checksum": 1000, "no_sync": 1}


# ---- the driver on a real pty ---------------------------------------------------------------
@pytest.fixture
def pty_sink(tmp_path):
    sinks: list[PtySink] = []

    def make(link: Path | None = None) -> PtySink:
        sinks.append(PtySink(link))
        return sinks[-1]

    yield make
    for s in sinks:
        s.close()


@pytest.mark.parametrize(("kind", "checksum", "emits"), [("line", "none", "meter"), ("binary", "crc8", "parking"),
                                                          ("binary", "crc16-modbus", "crosswalk")])  # fmt: skip
def test_the_driver_reports_every_good_frame_and_counts_the_bad_ones(pty_sink, kind, checksum, emits) -> None:
    sim = Simulator(emits, kind, checksum=checksum, noise=0.25, seed=11)
    sink = pty_sink()
    running = RunningDriver(config_for(sim, sink.path))
    try:
        feeder = Feeder(sim, sink, rate=2000, slots=300)
        wait_for(lambda: len(running.snapshot()) >= sim.ledger.good and feeder.sent == 300, 10, "every good frame")
        expected = sim.ledger.expected()
        # The bad slots after the last good frame are still being read: wait for their counts too.
        wait_for(lambda: all(running.driver.stats[k] >= n for k, n in expected.items()), 10, "every bad frame counted")
        readings = running.snapshot()
        assert len(readings) == sim.ledger.good
        if emits == "meter":
            got = [{m["quantity"]: m["value"] for m in r.data["measurements"]} for r in readings]
            assert all(m["quality"] == "good" for r in readings for m in r.data["measurements"])
        elif emits == "parking":
            got = [{"occupied": float(r.data["occupied"]), "confidence": r.data["confidence"]} for r in readings]
            assert {r.data["bay"] for r in readings} == {"A1"}
        else:
            got = [{"count": float(r.data["count"])} for r in readings]
            assert all(r.data["max_count"] >= r.data["count"] for r in readings)
        assert got == sim.truth
        stats = running.driver.stats
        assert {k: stats[k] for k in expected} == expected
        assert stats["frames"] == sim.ledger.good
        assert stats["bad_frames"] == sum(expected.values()) > 0
        assert running.status_list() == ["online"]
    finally:
        running.close()


def test_silence_and_garbage_take_the_device_offline_with_the_reason(pty_sink) -> None:
    sim = Simulator("meter", "binary", seed=3)
    sink = pty_sink()
    running = RunningDriver(config_for(sim, sink.path, interval="100ms", offline_after=2))
    try:
        wait_for(lambda: running.statuses, 5, "a status while silent")
        assert running.statuses[0]["status"] == "offline"
        assert "no data on" in running.statuses[0]["reason"]
        assert running.statuses[0]["consecutive_failures"] == 2
        assert sink.write(sim.slot())
        wait_for(lambda: running.status_list() == ["offline", "online"], 5, "online with a good frame")
        stop = threading.Event()

        def garbage() -> None:
            while not stop.is_set():
                sink.write(b"\x01\x02\x03\x04")
                time.sleep(0.01)

        noise = threading.Thread(target=garbage, daemon=True)
        noise.start()
        try:
            wait_for(lambda: running.status_list() == ["offline", "online", "offline"], 5, "offline on garbage")
        finally:
            stop.set()
            noise.join()
        assert "only bad ones (no_sync 1)" in running.statuses[-1]["reason"]
    finally:
        running.close()


def test_a_missing_port_is_a_startup_error_with_a_hint(tmp_path) -> None:
    config = config_for(Simulator(), str(tmp_path / "ttyUSB9"))
    driver = SerialDriver(config, DeviceRunner(config, PLUGIN, lambda *_: None))
    with pytest.raises(DriverStartupError, match=r"cannot open .*ttyUSB9: .*(plugged in|adapters present)"):
        asyncio.run(driver.start())


def test_stop_is_prompt_while_a_read_is_blocked(pty_sink) -> None:
    running = RunningDriver(config_for(Simulator(), pty_sink().path))
    started = time.monotonic()
    running.close()
    assert time.monotonic() - started < 1.0
    assert running.driver._reader._thread is not None
    assert not running.driver._reader._thread.is_alive()


# ---- the simulator as a technician runs it --------------------------------------------------
def _run_simulator(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "simulate", "serial", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_simulate_writes_to_a_port_and_its_ledger_matches_what_the_parser_counts() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = _run_simulator(
            "--port", os.ttyname(slave), "--framing", "binary", "--checksum", "crc8", "--emits", "parking",
            "--noise", "0.3", "--seed", "5", "--rate", "300", "--seconds", "1.5",
        )  # fmt: skip
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        time.sleep(0.2)  # the last bytes through the pty
    finally:
        os.close(slave)
        os.close(master)
        reader.join(2)
    device = yaml.safe_load(out.split("\n", 1)[1])[0]
    config = SerialConfig.model_validate(device)
    ledger = re.search(r"(\d+) good frames.*agent should count: no_sync (\d+), bad_checksum (\d+)", err)
    assert ledger, err
    good, no_sync, bad_checksum = map(int, ledger.groups())
    frames, faults = summary(make_parser(config).feed(bytes(received)))
    assert len(frames) == good > 100
    assert faults == {"no_sync": no_sync, "bad_checksum": bad_checksum}


def test_simulate_pty_prints_the_port_and_streams_on_it(tmp_path) -> None:
    link = tmp_path / "ttySIM0"
    proc = _run_simulator("--pty", "--link", str(link), "--rate", "50", "--seconds", "3")
    try:
        assert proc.stdout is not None
        header = proc.stdout.readline()
        assert f"on {link}" in header
        config_text = ""
        while not config_text.rstrip().endswith("emits: meter"):
            config_text += proc.stdout.readline()
        config = SerialConfig.model_validate(yaml.safe_load(config_text)[0])
        assert config.port == str(link)
        assert link.is_symlink()
        with serial.Serial(str(link), timeout=0.2) as port:
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(summary(make_parser(config).feed(data))[0]) < 5:
                data += port.read(256)
        frames, _ = summary(make_parser(config).feed(data))
        assert len(frames) >= 5
        assert set(frames[0]) == {"temperature", "humidity", "pressure"}
        assert proc.wait(10) == 0
        assert not link.exists()  # cleaned up
    finally:
        proc.kill()
        proc.wait()


# ---- end to end: the real agent, a real broker ----------------------------------------------
def _events(sub, device: str, event_type: str) -> list[dict]:
    return sorted(
        (e for e in sub.snapshot() if e["device"] == device and e["type"] == event_type), key=lambda e: e["seq"]
    )


def _statuses(sub, device: str) -> list[dict]:
    return [e["data"] for e in _events(sub, device, "city.device.status")]


def test_frames_on_serial_ports_arrive_as_events_on_mqtt(
    tmp_path, broker: Mosquitto, subscriber_factory, agent_factory, pty_sink
) -> None:
    env = Simulator("meter", "line", noise=0.2, seed=21)
    bay = Simulator("parking", "binary", checksum="crc16-modbus", noise=0.2, seed=22)
    env_pty, bay_pty = pty_sink(tmp_path / "ttyENV"), pty_sink(tmp_path / "ttyBAY")
    devices = device_lines(env, "env-1", str(tmp_path / "ttyENV"))
    devices += device_lines(bay, "bay-1", str(tmp_path / "ttyBAY"))
    sub = subscriber_factory(broker.port)
    agent = agent_factory(write_config(tmp_path / "site.yaml", port=broker.port, devices=devices))
    wait_for(lambda: agent.output().count(" open (9600 8N1)") == 2, 20, "the agent to open both ports")

    feeders = [Feeder(env, env_pty, rate=100, slots=150), Feeder(bay, bay_pty, rate=100, slots=150)]
    wait_for(
        lambda: (
            len(_events(sub, "env-1", "city.meter.reading")) >= env.ledger.good
            and len(_events(sub, "bay-1", "city.parking.occupancy")) >= bay.ledger.good
            and all(f.sent == 150 for f in feeders)
        ),
        20,
        "every good frame as an event",
    )
    meter = _events(sub, "env-1", "city.meter.reading")
    assert [{m["quantity"]: m["value"] for m in e["data"]["measurements"]} for e in meter] == env.truth
    assert {m["unit"] for e in meter for m in e["data"]["measurements"]} == {"degC", "%", "bar"}
    parking = _events(sub, "bay-1", "city.parking.occupancy")
    assert [
        {"occupied": float(e["data"]["occupied"]), "confidence": e["data"]["confidence"]} for e in parking
    ] == bay.truth
    flips = [e for prev, e in itertools.pairwise(parking) if e["data"]["occupied"] != prev["data"]["occupied"]]
    assert flips and all(e["data"]["since"] == e["time"] for e in flips)  # since: when the state changed
    assert [s["status"] for s in _statuses(sub, "env-1")] == ["online"]

    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    for device, sim in (("env-1", env), ("bay-1", bay)):
        closed = re.search(rf"device {device}: closed .* after (\d+) frames, (\d+) bad \(([^)]*)\)", agent.output())
        assert closed, agent.output()[-2000:]
        counted = dict((k, int(v)) for k, v in (part.split() for part in closed.group(3).split(", ")))
        assert int(closed.group(1)) == sim.ledger.good
        assert counted == {k: v for k, v in sim.ledger.expected().items() if v}
        assert int(closed.group(2)) == sum(counted.values())


def test_an_unplugged_adapter_goes_offline_and_comes_back_online(
    tmp_path, broker: Mosquitto, subscriber_factory, agent_factory, pty_sink
) -> None:
    link = tmp_path / "ttyUSB0"  # stands in for /dev/serial/by-id/...: gone when unplugged
    sim = Simulator("crosswalk", "binary", checksum="crc16-modbus", seed=31)
    first = pty_sink(link)
    devices = device_lines(sim, "cross-1", str(link), interval="300ms", offline_after=2, reconnect_max="300ms")
    sub = subscriber_factory(broker.port)
    agent = agent_factory(write_config(tmp_path / "site.yaml", port=broker.port, devices=devices))
    wait_for(lambda: f"{link} open" in agent.output(), 20, "the agent to open the port")
    feeder = Feeder(sim, first, rate=20)
    wait_for(lambda: len(_events(sub, "cross-1", "city.crosswalk.presence")) >= 5, 10, "first events")
    assert [s["status"] for s in _statuses(sub, "cross-1")] == ["online"]

    feeder.stop()
    first.close()  # unplugged: the pty and the link are gone
    offline = wait_for(
        lambda: next((s for s in _statuses(sub, "cross-1") if s["status"] == "offline"), None), 10, "offline status"
    )
    assert f"port {link} gone" in offline["reason"]
    assert offline["consecutive_failures"] == 2
    time.sleep(1.0)  # a few failed reopen attempts
    assert "cannot reopen" in agent.output()

    before = len(_events(sub, "cross-1", "city.crosswalk.presence"))
    sim.truth.clear()
    second = pty_sink(link)  # plugged back in: a new device node behind the same path
    wait_for(lambda: "open again" in agent.output(), 10, "the agent to reopen the port")
    feeder = Feeder(sim, second, rate=20, slots=10)
    wait_for(lambda: [s["status"] for s in _statuses(sub, "cross-1")] == ["online", "offline", "online"], 10, "online")
    wait_for(lambda: len(_events(sub, "cross-1", "city.crosswalk.presence")) >= before + 10, 10, "events again")
    after = _events(sub, "cross-1", "city.crosswalk.presence")[before:]
    assert [{"count": float(e["data"]["count"])} for e in after] == sim.truth
    feeder.stop()


def test_binary_float32_fields_are_published_as_their_shortest_decimal() -> None:
    # A float32 holding 230.1 widens to 230.10000610351562; the frame's own precision is 230.1.
    framing = FramingConfig(kind="binary", sync="AA55", layout="<2fxhd", checksum="sum8")
    payload = struct.pack("<2fxhd", 230.1, -0.3, 7, 0.1)
    (frame,) = BinaryParser(framing).feed(_frame(b"\xaa\x55", payload, "sum8"))
    assert isinstance(frame, Frame)
    assert frame.values == {0: 230.1, 1: -0.3, 2: 7, 3: 0.1}  # float64 (d) keeps every digit it has
    assert repr(frame.values[0]) == "230.1"
    assert float32_fields("<2fxhd") == (0, 1)
    assert float32_fields(">4s3f?") == (1, 2, 3)
