"""The Modbus driver against real pymodbus servers: TCP, RTU on pseudo-terminals, injected faults."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from agent.contract.events import METER_READING, Reading
from agent.contract.schemas import EVENT_MODELS, CloudEvent
from agent.devices.runner import DeviceRunner
from agent.observability.logs import REPEAT_WINDOW_ENV, setup_logging
from drivers.modbus import PLUGIN, profiles
from drivers.modbus.bus import MISMATCH, POOL
from drivers.modbus.config import ModbusConfig, PointConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.pty import PtyPair
from drivers.modbus.simulator import SimulatedUnit, Simulator
from tests.conftest import ROOT, Recorder, free_port, wait_for, write_config
from tests.modbus_helpers import measurements, rtu_unit, run, tcp_unit

POINTS = [
    {"name": "voltage", "table": "input", "address": 0, "type": "float32", "quantity": "voltage", "phase": "L1"},
    {"name": "energy", "table": "input", "address": 2, "type": "uint32", "scale": 0.01, "quantity": "active_energy"},
    {"name": "power", "table": "holding", "address": 10, "type": "int16", "scale": 0.001, "quantity": "active_power",
     "unit": "kW"},
    {"name": "bay", "table": "discrete", "address": 3, "type": "bool", "bay": "P-07"},
    {"name": "people", "table": "holding", "address": 20, "type": "uint16", "area": "north"},
]  # fmt: skip


def tcp_device(port: int, **keys: Any) -> ModbusConfig:
    return ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "127.0.0.1", "port": port,
                                        "timeout": "300ms", "points": POINTS, **keys})  # fmt: skip


def test_simulator_addressing_matches_hand_computed_registers() -> None:
    """Zero-based protocol addresses end to end, read by a plain pymodbus client."""

    async def body() -> None:
        port = free_port()
        point = PointConfig(name="v", table="input", address=7, type="float32", quantity="voltage")
        unit = SimulatedUnit(3, [point])
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        unit.set(point, 230.0)  # 230.0 = 0x43660000
        unit.set_registers("holding", 100, [0xBEEF])
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
        try:
            assert await client.connect()
            got = await client.read_input_registers(6, count=3, device_id=3)
            assert got.registers == [0, 0x4366, 0x0000]  # address 7 and 8, nothing at 6
            got = await client.read_holding_registers(100, count=1, device_id=3)
            assert got.registers == [0xBEEF]
        finally:
            client.close()
            await sim.stop()

    run(body)


def test_driver_reads_decodes_and_maps_every_role() -> None:
    async def body() -> None:
        port = free_port()
        config = tcp_device(port)
        unit = SimulatedUnit(1, config.points)
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        pts = {p.name: p for p in config.points}
        unit.set(pts["voltage"], 231.5)
        unit.set_registers("input", 2, [0x0001, 0xE240])  # 123456 -> 1234.56 kWh
        unit.set_registers("holding", 10, [0xFC18])  # -1000 W -> -1.0 kW (exporting)
        unit.set(pts["bay"], 1)
        unit.set(pts["people"], 4)
        ctx = Recorder()
        driver = ModbusDriver(config, ctx)
        await driver.start()
        try:
            readings = await driver.poll(driver.requests)
            m = measurements(readings)
            assert m["voltage"] == {"quantity": "voltage", "value": 231.5, "unit": "V", "quality": "good",
                                    "point": "voltage", "phase": "L1"}  # fmt: skip
            assert m["energy"]["value"] == pytest.approx(1234.56) and m["energy"]["unit"] == "kWh"
            assert m["power"]["value"] == pytest.approx(-1.0) and m["power"]["unit"] == "kW"
            assert readings is not None
            bay = next(r.data for r in readings if r.type == "city.parking.occupancy")
            assert bay["bay"] == "P-07" and bay["occupied"] is True
            area = next(r.data for r in readings if r.type == "city.crosswalk.presence")
            assert (area["area"], area["count"], area["max_count"]) == ("north", 4, 4)
            for r in readings:  # every event is valid against the published contract
                EVENT_MODELS[r.type].model_validate(r.data)
            assert ctx.outcomes == ["ok"]
            # input 0..3 in one read; holding 10 and 20 are 9 apart, past max_gap 8: two reads
            assert [(r.table, r.address, r.count) for r in driver.requests] == [
                ("discrete", 3, 1),
                ("holding", 10, 1),
                ("holding", 20, 1),
                ("input", 0, 4),
            ]
        finally:
            await driver.stop()
            await sim.stop()

    run(body)


def test_report_on_change_with_deadband_and_periodic_full_report() -> None:
    async def body() -> None:
        port = free_port()
        config = tcp_device(port, deadband=0.5, full_report="1s")
        unit = SimulatedUnit(1, config.points)
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        pts = {p.name: p for p in config.points}
        driver = ModbusDriver(config, Recorder())
        await driver.start()
        try:
            first = await driver.poll(driver.requests)
            assert len(measurements(first)) == 3  # the first poll reports everything
            assert await driver.poll(driver.requests) is None  # nothing moved: no event at all
            unit.set(pts["voltage"], 500.0)
            moved = measurements(await driver.poll(driver.requests))
            assert set(moved) == {"voltage"}
            old = moved["voltage"]["value"]
            unit.set(pts["voltage"], old + 0.25)  # inside the deadband
            assert await driver.poll(driver.requests) is None
            unit.set(pts["bay"], 1 - int(bool(driver._good["bay"])))  # a bay flip is always an event
            flipped = await driver.poll(driver.requests)
            assert flipped is not None and [r.type for r in flipped] == ["city.parking.occupancy"]
            await asyncio.sleep(1.05)
            full = await driver.poll(driver.requests)
            assert len(measurements(full)) == 3  # full report after full_report, changed or not
        finally:
            await driver.stop()
            await sim.stop()

    run(body)


def test_faults_give_quality_and_reasons_and_the_device_recovers() -> None:
    async def body() -> None:
        port = free_port()
        config = tcp_device(port)
        unit = SimulatedUnit(1, config.points)
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        ctx = Recorder()
        driver = ModbusDriver(config, ctx)
        await driver.start()
        try:
            assert measurements(await driver.poll(driver.requests))["voltage"]["quality"] == "good"
            unit.faults.exception = 2
            assert await driver.poll(driver.requests) is None
            assert ctx.outcomes[-1] == "exception 2 (illegal data address)"
            unit.faults.exception = None
            unit.faults.delay = 1.0  # past the 300 ms timeout
            t0 = time.monotonic()
            assert await driver.poll(driver.requests) is None
            spent = time.monotonic() - t0
            assert ctx.outcomes[-1] == "timeout"
            assert spent < 0.6, f"a silent device must cost one timeout per poll, not one per request ({spent:.2f}s)"
            unit.faults.delay = 0
            await asyncio.sleep(1.0)  # let the late answer arrive and be discarded
            back = measurements(await driver.poll(driver.requests))
            assert back["voltage"]["quality"] == "good" and ctx.outcomes[-1] == "ok"
            # server gone: connection refused, then it returns on the same port
            await sim.stop()
            assert await driver.poll(driver.requests) is None
            assert "connect" in ctx.outcomes[-1] or ctx.outcomes[-1] == "connection lost", ctx.outcomes
            assert await driver.poll(driver.requests) is None
            assert ctx.outcomes[-1].startswith("cannot connect to 127.0.0.1:")
            sim2 = Simulator([SimulatedUnit(1, config.points)], period=3600)
            await sim2.serve_tcp("127.0.0.1", port)
            try:
                again = measurements(await driver.poll(driver.requests))
                assert again["voltage"]["quality"] == "good" and ctx.outcomes[-1] == "ok"
            finally:
                await sim2.stop()
        finally:
            await driver.stop()

    run(body)


def test_one_failing_request_marks_its_points_stale_or_bad_and_keeps_the_rest() -> None:
    async def body() -> None:
        port = free_port()
        points = [*POINTS, {"name": "serial_no", "table": "holding", "address": 300, "type": "string", "length": 4,
                            "quantity": "counter"}]  # fmt: skip
        config = tcp_device(port, points=points)
        unit = SimulatedUnit(1, config.points, strict=True)
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        driver = ModbusDriver(config, Recorder())
        await driver.start()
        try:
            assert measurements(await driver.poll(driver.requests))["serial_no"]["quality"] == "good"
            del unit.tables["holding"].values[303]  # the device stops answering that block
            m = measurements(await driver.poll(driver.requests))
            assert m["voltage"]["quality"] == "good"
            assert m["serial_no"]["quality"] == "stale" and m["serial_no"]["value"] == "SIM-0001"
            assert m["serial_no"]["reason"] == "exception 2 (illegal data address)"
            fresh = ModbusDriver(config, Recorder())  # never saw a good value: bad, null
            fresh._bus = driver._bus
            m = measurements(await fresh.poll(fresh.requests))
            assert m["serial_no"]["quality"] == "bad" and m["serial_no"]["value"] is None
        finally:
            await driver.stop()
            await sim.stop()

    run(body)


# Two runs of registers with a hole (4, 5) between them: planned as one read of 0..9.
HOLEY = [
    {"name": "voltage", "table": "holding", "address": 0, "type": "float32", "quantity": "voltage"},
    {"name": "current", "table": "holding", "address": 2, "type": "float32", "quantity": "current"},
    {"name": "power", "table": "holding", "address": 6, "type": "float32", "quantity": "active_power", "unit": "kW"},
    {"name": "frequency", "table": "holding", "address": 8, "type": "float32", "quantity": "frequency"},
]  # fmt: skip


def _polls_with_unit(points: list[dict[str, Any]], check: Any, *, strict: bool, **faults: Any) -> None:
    async def body() -> None:
        async with tcp_unit(lambda port: tcp_device(port, points=points)) as (driver, unit, _):
            unit.strict = strict
            for name, value in faults.items():
                setattr(unit.faults, name, value)
            await check(driver, unit)

    run(body)


def test_a_merged_read_the_unit_refuses_is_split_at_its_holes_and_the_poll_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def check(driver: ModbusDriver, unit: SimulatedUnit) -> None:
        assert [(r.address, r.count) for r in driver.requests] == [(0, 10)]
        m = measurements(await driver.poll(driver.requests))
        assert {k: v["quality"] for k, v in m.items()} == dict.fromkeys(("voltage", "current", "power", "frequency"),
                                                                         "good")  # fmt: skip
        assert driver.context.outcomes == ["ok"]  # type: ignore[attr-defined]
        assert driver.stats["requests"] == 3 and driver.stats["splits"] == 1  # refused 0..9, then 0..3 and 6..9
        warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warning) == 1 and "device m" in warning[0] and "holding 0..9" in warning[0], warning
        assert "2 requests (0..3, 6..9)" in warning[0] and "max_gap: 0" in warning[0], warning
        m = measurements(await driver.poll(driver.requests))
        assert all(v["quality"] == "good" for v in m.values())
        assert driver.stats["requests"] == 5 and driver.stats["failed_requests"] == 1  # the split plan is kept

    _polls_with_unit(HOLEY, check, strict=True)


def test_a_unit_that_reads_holes_keeps_the_merged_read() -> None:
    async def check(driver: ModbusDriver, unit: SimulatedUnit) -> None:
        for _ in range(2):
            assert all(v["quality"] == "good" for v in measurements(await driver.poll(driver.requests)).values())
        assert driver.stats["requests"] == 2 and driver.stats["splits"] == 0

    _polls_with_unit(HOLEY, check, strict=False)


def test_a_unit_taking_fewer_registers_per_read_gets_one_read_per_point() -> None:
    async def check(driver: ModbusDriver, unit: SimulatedUnit) -> None:
        m = measurements(await driver.poll(driver.requests))  # 0..3 refused with exception 3 (no hole to cut)
        assert [v["quality"] for v in m.values()] == ["good", "good"]
        assert driver.stats["requests"] == 3 and driver.stats["splits"] == 1
        await driver.poll(driver.requests)
        assert driver.stats["requests"] == 5

    _polls_with_unit(HOLEY[:2], check, strict=False, max_count=2)


def test_one_address_the_unit_lacks_makes_only_that_point_bad() -> None:
    async def check(driver: ModbusDriver, unit: SimulatedUnit) -> None:
        del unit.tables["holding"].values[2]  # a typo in the config: the unit has no register 2
        m = measurements(await driver.poll(driver.requests))
        assert m["voltage"]["quality"] == "good"
        assert m["current"]["quality"] == "bad" and m["current"]["reason"] == "exception 2 (illegal data address)"
        assert driver.context.outcomes == ["ok"]  # type: ignore[attr-defined]
        await driver.poll(driver.requests)
        assert driver.stats["requests"] == 3 + 2  # 0..3 refused, then 0..1 and 2..3; then those two

    _polls_with_unit(HOLEY[:2], check, strict=True)


def test_a_unit_refusing_every_read_leaves_the_plan_as_it_was() -> None:
    async def check(driver: ModbusDriver, unit: SimulatedUnit) -> None:
        assert await driver.poll(driver.requests) is None  # say, while the unit boots
        assert driver.context.outcomes == ["exception 2 (illegal data address)"]  # type: ignore[attr-defined]
        assert driver.stats["splits"] == 0
        unit.faults.exception = None
        before = driver.stats["requests"]
        assert measurements(await driver.poll(driver.requests))["frequency"]["quality"] == "good"
        assert driver.stats["requests"] == before + 1

    _polls_with_unit(HOLEY, check, strict=False, exception=2)


def rtu_device(port: str, unit: int, **keys: Any) -> ModbusConfig:
    return ModbusConfig.model_validate({
        "id": f"u{unit}", "driver": "modbus", "transport": "rtu", "unit": unit, "timeout": "250ms",
        "serial": {"port": port, "baudrate": 19200}, "points": POINTS[:3], **keys,
    })  # fmt: skip


def test_rtu_bus_shared_by_units_one_silent_costs_only_its_timeout() -> None:
    async def body() -> None:
        line = PtyPair()
        configs = [rtu_device(line.client, u) for u in (1, 2, 3, 4)]
        sim = Simulator([SimulatedUnit(u, configs[0].points) for u in (1, 2, 3)], period=3600)  # 4 is not there
        await sim.serve_serial(line.device, baudrate=19200)
        ctxs = [Recorder(c.id) for c in configs]
        drivers = [ModbusDriver(c, x) for c, x in zip(configs, ctxs, strict=True)]
        for d in drivers:
            await d.start()
        try:
            assert len({id(d._bus) for d in drivers}) == 1, "units on one port must share one bus"
            for _ in range(3):
                t0 = time.monotonic()
                results = await asyncio.gather(*(d.poll(d.requests) for d in drivers))
                spent = time.monotonic() - t0
                assert all(measurements(r)["voltage"]["quality"] == "good" for r in results[:3])
                assert results[3] is None and ctxs[3].outcomes[-1] == "timeout"
                # three good units (2 requests each) plus one timeout, strictly one at a time
                assert spent < 0.25 + 0.6, f"{spent:.2f}s"
            assert [x.outcomes for x in ctxs[:3]] == [["ok"] * 3] * 3
            # Between an answer and the next request the line stays silent for 3.5 characters
            # (11 bits each at 19200 baud: 2.0 ms).
            frames = list(sim.frames)
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames) if a[1] and not b[1]]
            assert len(gaps) >= 10 and min(gaps) >= 3.5 * 11 / 19200 * 0.9, sorted(gaps)[:3]
        finally:
            for d in drivers:
                await d.stop()
            await sim.stop()
            line.close()

    run(body)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"corrupt_crc": True}, "garbled answer (bad CRC or framing; wrong baud rate or parity?)"),
        ({"garbage": b"\x07\xff\x13"}, None),
        ({"truncate": 3}, "garbled answer (bad CRC or framing; wrong baud rate or parity?)"),
        ({"silent": True}, "timeout"),
    ],
)
def test_rtu_frame_faults_are_survived(fault: dict[str, Any], reason: str | None) -> None:
    """Corrupt CRC, garbage before the answer, a short frame, no answer: reported, then recovered."""

    async def body() -> None:
        async with rtu_unit(lambda port: rtu_device(port, 1)) as (driver, unit, ctx):
            assert measurements(await driver.poll(driver.requests))["voltage"]["quality"] == "good"
            for key, value in fault.items():
                setattr(unit.faults, key, value)
            outcome = await driver.poll(driver.requests)
            if reason is None:  # pymodbus's framer skips leading garbage and finds the frame
                assert measurements(outcome)["voltage"]["quality"] == "good"
            else:
                assert outcome is None and ctx.outcomes[-1] == reason
            for key in fault:
                setattr(unit.faults, key, type(getattr(unit.faults, key))())
            await asyncio.sleep(0.3)
            recovered = None
            for _ in range(3):  # the first poll after a fault may still meet leftovers of it
                recovered = await driver.poll(driver.requests)
                if recovered:
                    break
            assert measurements(recovered)["voltage"]["quality"] == "good"
            assert ctx.outcomes[-1] == "ok"

    run(body)


async def _until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("transport", "fault", "reason", "label", "answer"),
    [
        # RS-485 noise, or the wrong baud rate or parity: frames whose CRC is wrong
        ("rtu", "corrupt_crc", "garbled answer (bad CRC or framing; wrong baud rate or parity?)", "bad_checksum",
         r"9 bytes, no valid frame in them: 01 04 04( [0-9a-f]{2}){6}"),
        # A TCP gateway that answers with a byte count past the frame's end: pymodbus raises while
        # decoding it, inside the connection's data_received (asyncio logged that with a traceback)
        ("tcp", "overcount", "garbled answer (no valid frame)", "bad_frames",
         r"13 bytes, does not decode: 00 [0-9a-f]{2} 00 00 00 07 01 04 06( [0-9a-f]{2}){4}"),
    ],
    ids=["rtu-bad-crc", "tcp-byte-count-past-the-end"],
)  # fmt: skip
def test_garbled_answers_are_one_counted_line_per_device_and_the_device_recovers(
    monkeypatch: pytest.MonkeyPatch, transport: str, fault: str, reason: str, label: str, answer: str
) -> None:
    """Issue 12: no tracebacks for malformed answers; one line per device and window, counted; then recovery."""
    monkeypatch.setenv(REPEAT_WINDOW_ENV, "1s")
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = setup_logging(stream=stream, fmt="text")
    readings: list[Reading] = []

    async def body() -> None:
        line = PtyPair() if transport == "rtu" else None
        port = free_port()
        where: dict[str, Any] = {"transport": "rtu", "serial": {"port": line.client, "baudrate": 19200}} if line \
            else {"host": "127.0.0.1", "port": port}  # fmt: skip
        config = ModbusConfig.model_validate({"id": "meter-1", "driver": "modbus", "interval": "200ms",
                                              "timeout": "300ms", "points": POINTS[:1], **where})  # fmt: skip
        unit = SimulatedUnit(1, config.points)
        sim = Simulator([unit], period=3600)
        if line is not None:
            await sim.serve_serial(line.device, baudrate=19200)
        else:
            await sim.serve_tcp("127.0.0.1", port)
        runner = DeviceRunner(config, PLUGIN, lambda _device, reading: readings.append(reading))
        task = asyncio.create_task(runner.run())
        try:
            await _until(lambda: runner.status == "online", 5, "the device online")
            setattr(unit.faults, fault, True)
            before = runner.polls_failed
            await _until(lambda: runner.polls_failed >= before + 10, 15, "ten polls with garbled answers")
            setattr(unit.faults, fault, False)
            del readings[:]
            await _until(lambda: runner.status == "online" and any(
                r.type == METER_READING and r.data["measurements"][0]["quality"] == "good" for r in readings), 10,
                "the device back online with good values")  # fmt: skip
            garbled = runner.telemetry.failures
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sim.stop()
            if line is not None:
                line.close()
        text = stream.getvalue()
        assert "Traceback" not in text, text
        assert f"device meter-1 offline: {reason}" in text
        assert set(garbled) == {label}, garbled  # every garbled answer counted as such, none as a lost link
        lines = [ln for ln in text.splitlines() if f"device meter-1: {reason} from unit 1: " in ln]
        assert lines and all(re.search(answer, ln) for ln in lines), text
        counts = [int(m.group(1)) for ln in lines if (m := re.search(r"\(repeated (\d+) times in the last 1 s\)$", ln))]
        assert counts, f"no counted line: {lines}"
        # one line per window: the first at once, then one a second with the count of the others
        assert len(lines) <= garbled[label] // 2 and len(lines) + sum(counts) <= garbled[label], (lines, garbled)

    try:
        run(body)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("strict", [False, True], ids=["holes-read-as-0", "holes-refused"])
@pytest.mark.parametrize("name", sorted(n for n, p in profiles.available().items() if p.parent == profiles.BUILTIN_DIR))
def test_each_shipped_profile_is_read_from_a_simulator(name: str, strict: bool) -> None:
    # Whether a meter answers for registers its manual does not list is rarely documented: the
    # first poll must read every point either way (a refused merged read is split at once).
    async def body() -> None:
        port = free_port()
        config = ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "127.0.0.1", "port": port,
                                              "profile": name, "unit": 1, "timeout": "1s"})  # fmt: skip
        unit = SimulatedUnit(1, config.points, byte_order=config.byte_order, word_order=config.word_order,
                             strict=strict)  # fmt: skip
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        ctx = Recorder()
        driver = ModbusDriver(config, ctx)
        await driver.start()
        try:
            readings = await driver.poll(driver.requests)
            assert ctx.outcomes == ["ok"]
            assert readings is not None
            m = measurements(readings)
            quantity_points = [p for p in config.points if p.quantity is not None]
            assert {k for k, v in m.items() if v["quality"] == "good"} == {p.name for p in quantity_points}
            for point in quantity_points:
                expected = unit.signals[config.points.index(point)]
                assert expected.point.name == point.name
            for r in readings:
                EVENT_MODELS[r.type].model_validate(r.data)
            voltages = [v["value"] for v in m.values() if v["quantity"] == "voltage"]
            assert all(200 < v < 260 for v in voltages), voltages  # decoded in volts, not raw counts
        finally:
            await driver.stop()
            await sim.stop()

    run(body)


def test_shared_port_with_different_line_settings_is_refused_for_that_device_only() -> None:
    a = rtu_device("/dev/ttyFAKE0", 1)
    b = ModbusConfig.model_validate({**a.model_dump(), "id": "b", "unit": 2,
                                     "serial": {"port": "/dev/ttyFAKE0", "baudrate": 9600}})  # fmt: skip

    async def body() -> None:
        bus = POOL.acquire(a)
        try:
            with pytest.raises(ValueError, match="same baudrate, parity and stop bits"):
                POOL.acquire(b)
        finally:
            POOL.release(bus)

    run(body)


# ---- through the whole agent, and the technician's commands ----------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, check=False)  # fmt: skip


@pytest.fixture
def simulated_sdm630() -> Any:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630",
                             "--tcp", f"127.0.0.1:{port}", "--units", "1-3"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    lines = []
    while not lines or "serving" not in lines[-1]:
        lines.append(proc.stdout.readline())
        assert lines[-1], f"the simulator exited: {''.join(lines)}"
    assert f"127.0.0.1:{port}" in lines[-1], lines
    yield port
    proc.terminate()
    proc.wait(5)


def test_agent_publishes_profile_readings_and_status_from_a_simulated_meter(
    tmp_path: Path, broker, subscriber_factory, agent_factory, simulated_sdm630: int
) -> None:
    sub = subscriber_factory(broker.port)
    devices = (
        f"  - {{id: sdm-1, driver: modbus, host: 127.0.0.1, port: {simulated_sdm630}, unit: 1, profile: "
        "eastron-sdm630, interval: 200ms, timeout: 300ms}\n"
        f"  - {{id: sdm-9, driver: modbus, host: 127.0.0.1, port: {simulated_sdm630}, unit: 9, profile: "
        "eastron-sdm630, interval: 200ms, timeout: 300ms, offline_after: 2}\n"
    )
    agent = agent_factory(write_config(tmp_path / "site.yaml", port=broker.port, devices=devices))
    wait_for(lambda: len(sub.seqs("sdm-1", "city.meter.reading")) >= 5, 30, "meter readings")
    wait_for(lambda: sub.seqs("sdm-9", "city.device.status"), 30, "the absent unit's offline status")
    events = sub.snapshot()
    for e in events:
        if e["type"].startswith("city."):
            CloudEvent.model_validate(e)
            EVENT_MODELS[e["type"]].model_validate(e["data"])
    readings = [e for e in events if e["device"] == "sdm-1" and e["type"] == "city.meter.reading"]
    quantities = {m["quantity"] for m in readings[-1]["data"]["measurements"]}
    assert {"voltage", "current", "active_power", "frequency", "active_energy"} <= quantities
    energy = [next(m["value"] for m in r["data"]["measurements"] if m["point"] == "active_energy_import")
              for r in readings]  # fmt: skip
    assert energy == sorted(energy) and energy[-1] > energy[0], "energy counters only increase"
    status = next(e for e in events if e["device"] == "sdm-9" and e["type"] == "city.device.status")
    assert status["data"]["status"] == "offline"
    assert "exception 11" in status["data"]["reason"] or "timeout" in status["data"]["reason"], status["data"]
    assert agent.proc is not None and agent.proc.poll() is None


def test_cli_profiles_scan_and_read(simulated_sdm630: int) -> None:
    listed = _cli("profiles")
    assert listed.returncode == 0, listed.stderr
    assert "eastron-sdm630" in listed.stdout and "Eastron" in listed.stdout
    scan = _cli("scan", "modbus", "--host", f"127.0.0.1:{simulated_sdm630}", "--units", "1-5", "--table", "input")
    assert scan.returncode == 0, scan.stderr
    rows = [line.split() for line in scan.stdout.splitlines()[1:] if line[:4].strip().isdigit()]
    answering = {int(r[0]): r[3] for r in rows if r[4] == "ok"}
    # units 4, 5: the gateway answers "exception 11"; each unit's registers match the profile served
    assert answering == dict.fromkeys((1, 2, 3), "eastron-sdm630"), scan.stdout
    voltage = next(p for p in profiles.load("eastron-sdm630")["points"] if p.get("quantity") == "voltage")
    read = _cli("read", "modbus", "--host", f"127.0.0.1:{simulated_sdm630}", "--unit", "2",
                "--address", str(30001 + voltage["address"]), "--count", "1", "--type", "float32")  # fmt: skip
    assert read.returncode == 0, read.stderr
    value = float(read.stdout.splitlines()[1].split()[-1])
    assert 200 < value < 260, read.stdout


def test_cli_errors_are_specific(tmp_path: Path) -> None:
    missing = _cli("read", "modbus", "--port", str(tmp_path / "ttyUSB7"), "--address", "30001")
    assert missing.returncode == 1 and f"serial port {tmp_path / 'ttyUSB7'} not found" in missing.stderr
    nobody = _cli("scan", "modbus", "--host", f"127.0.0.1:{free_port()}", "--units", "1")
    assert nobody.returncode == 1 and "cannot connect to 127.0.0.1:" in nobody.stderr
    bad = _cli("read", "modbus", "--host", "127.0.0.1", "--address", "20001")
    assert bad.returncode == 2 and "not a Modicon address" not in bad.stderr and "start with 0, 1, 3 or 4" in bad.stderr
    usage = _cli("scan")
    assert (
        usage.returncode == 2
        and "usage: edge-agent scan {" in usage.stderr
        and "modbus" in usage.stderr.split("{", 1)[1]
    )


def test_permission_denied_names_the_group_to_join(tmp_path: Path) -> None:
    """Run as an unprivileged user against a port owned by root:dialout, mode 0660."""
    import grp
    import os
    import pwd

    from agent.devices.ports import port_problem

    line = PtyPair()
    try:
        dialout = grp.getgrnam("dialout").gr_gid
        os.chown(line.client, 0, dialout)
        os.chmod(line.client, 0o660)
        nobody = pwd.getpwnam("nobody")
        # Fork after the imports (the interpreter's files may not be readable by nobody) and drop
        # to nobody in the child: root passes every access check.
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                os.write(write_end, str(port_problem(line.client)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        out = os.read(read_end, 4096).decode()
        os.waitpid(pid, 0)
        os.close(read_end)
        assert f"permission denied on {line.client}" in out and "sudo usermod -aG dialout" in out, out
    finally:
        line.close()


@pytest.mark.parametrize("garble", [False, True])
def test_rtu_simulator_on_a_pty_and_a_scan_of_it(garble: bool) -> None:
    flags = ["--garble"] if garble else []
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm120",
                             "--rtu", "--units", "5", *flags], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        client_port = line.rsplit("serial.port: ", 1)[1].strip()
        scan = _cli("scan", "modbus", "--port", client_port, "--units", "4-6", "--baud", "9600", "--parity", "N",
                    "--table", "input")  # fmt: skip
        if garble:
            assert scan.returncode == 1
            assert "nothing answers" in scan.stderr and "wrong parity or baud rate suspected" in scan.stderr
        else:
            assert scan.returncode == 0, scan.stderr
            assert [r.split()[0] for r in scan.stdout.splitlines()[1:] if r[:4].strip().isdigit()] == ["5"], scan.stdout
    finally:
        proc.terminate()
        proc.wait(5)


def test_usb_adapter_unplugged_and_plugged_back(tmp_path: Path) -> None:
    """The device path (a /dev/serial/by-id style symlink) vanishes, then returns on a new tty."""

    async def body() -> None:
        link = tmp_path / "usb-FTDI_RS485-if00-port0"
        line = PtyPair()
        link.symlink_to(line.client)
        config = rtu_device(str(link), 1)
        sim = Simulator([SimulatedUnit(1, config.points)], period=3600)
        await sim.serve_serial(line.device, baudrate=19200)
        ctx = Recorder()
        driver = ModbusDriver(config, ctx)
        await driver.start()
        try:
            assert measurements(await driver.poll(driver.requests))["voltage"]["quality"] == "good"
            # unplug: the tty goes away and so does its by-id link
            await sim.stop()
            line.close()
            link.unlink()
            for _ in range(3):
                assert await driver.poll(driver.requests) is None
            gone = f"cannot connect to {link}: serial port {link} not found; "
            assert ctx.outcomes[-1].startswith(gone), ctx.outcomes
            # plug back in: a new tty behind the same by-id name
            line = PtyPair()
            link.symlink_to(line.client)
            sim = Simulator([SimulatedUnit(1, config.points)], period=3600)
            await sim.serve_serial(line.device, baudrate=19200)
            back = measurements(await driver.poll(driver.requests))
            assert back["voltage"]["quality"] == "good" and ctx.outcomes[-1] == "ok"
        finally:
            await driver.stop()
            await sim.stop()
            line.close()

    run(body)


def test_a_device_waiting_for_an_answer_stops_when_cancelled() -> None:
    """Reload, removal and shutdown cancel the device's task; pymodbus must not swallow that."""

    async def body() -> None:
        port = free_port()
        config = tcp_device(port, timeout="2s")
        unit = SimulatedUnit(1, config.points)
        unit.faults.delay = 1.5  # the answer is on its way when the device is stopped
        sim = Simulator([unit], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        driver = ModbusDriver(config, Recorder())
        await driver.start()

        async def consume() -> None:
            async for _ in driver.stream():
                pass

        task = asyncio.create_task(consume())
        try:
            while sim.requests == 0:  # wait until a read is on the wire, its answer 1.5 s away
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=1.0)
            assert task in done and task.cancelled(), "the device kept running after it was cancelled"
        finally:
            task.cancel()
            await driver.stop()
            await sim.stop()

    run(body)


def test_devices_start_at_different_phases_of_their_interval() -> None:
    async def body() -> None:
        port = free_port()
        sim = Simulator([SimulatedUnit(1, tcp_device(port).points)], period=3600)
        await sim.serve_tcp("127.0.0.1", port)
        firsts: dict[str, float] = {}
        drivers = []

        recorders: list[Recorder] = []

        async def first_poll(device_id: str) -> None:
            recorders.append(Recorder(device_id))
            driver = ModbusDriver(tcp_device(port, id=device_id), recorders[-1])
            drivers.append(driver)
            await driver.start()
            t0 = time.monotonic()
            async for _ in driver.stream():
                firsts[device_id] = time.monotonic() - t0
                return

        try:
            await asyncio.gather(*(first_poll(f"meter-{i}") for i in range(20)))
        finally:
            for d in drivers:
                await d.stop()
            await sim.stop()
        assert all(r.outcomes == ["ok"] for r in recorders), [r.outcomes for r in recorders]  # waiting is no failure
        offsets = sorted(firsts.values())
        assert offsets[-1] < 1.2  # within one interval
        assert offsets[-1] - offsets[0] > 0.5, offsets  # spread, not one burst

    run(body)


def test_a_late_answer_is_never_taken_for_the_next_request() -> None:
    """A unit answering after the timeout: its answer lands while the next request waits.

    The unit's two requests differ in function (04 input, 03 holding) and size (4 and 1
    registers): a stale answer must be refused, never decoded as the holding register.
    """

    async def body() -> None:
        async with rtu_unit(lambda port: rtu_device(port, 1)) as (driver, unit, ctx):
            truth = measurements(await driver.poll(driver.requests))["power"]["value"]
            unit.faults.delay = 0.35  # past the 250 ms timeout, within the next request's wait
            for _ in range(3):
                outcome = await driver.poll(driver.requests)
                power = measurements(outcome)["power"] if outcome else None
                if power is not None and power["quality"] == "good":
                    assert power["value"] == pytest.approx(truth, abs=0.5), "a stale answer was decoded"
            assert {"timeout", MISMATCH} & set(ctx.outcomes), ctx.outcomes

    run(body)
