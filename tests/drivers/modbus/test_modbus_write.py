"""Writes through the Modbus driver (what the OPC UA server's writable points call) against real
pymodbus servers: TCP, and RTU on a pseudo-terminal shared with polling units."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.errors import DriverWriteError
from drivers.modbus import codec
from drivers.modbus.config import ModbusConfig, PointConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.pty import PtyPair
from drivers.modbus.simulator import SimulatedUnit, Simulator
from tests.conftest import Recorder, free_port, wait_for
from tests.modbus_helpers import measurements, run, tcp_unit

POINTS = [
    # a temperature setpoint in 0.1 degC steps from -40: raw = (value + 40) / 0.1
    {"name": "setpoint", "table": "holding", "address": 30, "type": "int16", "scale": 0.1, "offset": -40,
     "quantity": "temperature", "writable": True},
    # a flow limit the device keeps in m3/s, low word first; events and writes use m3/h
    {"name": "flow_limit", "table": "holding", "address": 40, "type": "float32", "word_order": "little",
     "scale": 3600, "quantity": "flow", "writable": True},
    {"name": "counter_preset", "table": "holding", "address": 50, "type": "uint32", "quantity": "counter",
     "writable": True},
    {"name": "relay", "table": "coil", "address": 5, "type": "bool", "quantity": "digital_input", "writable": True},
    # read-only points of every other kind
    {"name": "power", "table": "holding", "address": 10, "type": "int16", "scale": 0.001, "quantity": "active_power",
     "unit": "kW"},
    {"name": "energy", "table": "input", "address": 2, "type": "uint32", "scale": 0.01, "quantity": "active_energy"},
    {"name": "bay", "table": "discrete", "address": 3, "type": "bool", "bay": "P-07"},
    {"name": "serial_no", "table": "holding", "address": 300, "type": "string", "length": 4, "quantity": "counter"},
    {"name": "alarm", "table": "holding", "address": 60, "type": "bitfield", "bit": 3, "quantity": "digital_input"},
]  # fmt: skip


def tcp_device(port: int, **keys: Any) -> ModbusConfig:
    return ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "127.0.0.1", "port": port,
                                        "timeout": "300ms", "points": POINTS, **keys})  # fmt: skip


def write_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "drivers.modbus.driver"]


def test_writes_use_the_right_function_and_encoding_and_the_next_poll_reports_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus.driver")

    async def body() -> None:
        # A deadband no write here crosses: the written points are reported all the same.
        async with tcp_unit(lambda port: tcp_device(port, deadband=1000, full_report="1h")) as (driver, unit, _sim):
            assert len(measurements(await driver.poll(driver.requests))) == 8  # first poll: every quantity
            assert await driver.poll(driver.requests) is None  # nothing moved past the deadband
            await driver.write("setpoint", 21.5)
            await driver.write("flow_limit", 11.7)
            await driver.write("counter_preset", 4_000_000_000)
            await driver.write("relay", True)
            assert unit.writes == [
                (6, 30, [615]),  # (21.5 + 40) / 0.1, one register: function 06
                (16, 40, codec.encode(11.7 / 3600, "float32", word_order="little")),  # two: function 16
                (16, 50, [0xEE6B, 0x2800]),  # 4 000 000 000 = 0xEE6B2800, high word first
                (5, 5, [True]),  # a coil: function 05
            ]
            unit.step(60.0)  # the simulator's signals move on; written points keep their value, as a device's do
            m = measurements(await driver.poll(driver.requests))
            assert set(m) == {"setpoint", "flow_limit", "counter_preset", "relay"}
            assert m["setpoint"]["value"] == 21.5 and m["setpoint"]["quality"] == "good"
            assert m["flow_limit"]["value"] == pytest.approx(11.7, rel=1e-6)
            assert m["counter_preset"]["value"] == 4_000_000_000
            assert m["relay"]["value"] == 1
            assert await driver.poll(driver.requests) is None  # reported once, then the deadband rules again
            assert (driver.stats["writes"], driver.stats["failed_writes"]) == (4, 0)
            # A coil also takes 0/1 as a number (OPC UA clients send Doubles).
            await driver.write("relay", 0.0)
            assert unit.writes[-1] == (5, 5, [False])
            assert measurements(await driver.poll(driver.requests))["relay"]["value"] == 0

    run(body)
    logs = write_logs(caplog)
    assert "device m: write setpoint = 21.5 (holding 30, function 6, [615]): ok" in logs
    assert "device m: write relay = True (coil 5, function 5, [1]): ok" in logs


@pytest.mark.parametrize(
    ("point", "value", "message"),
    [
        ("energy", 1, "point 'energy' is an input register: read-only in Modbus"),
        ("bay", True, "point 'bay' is a discrete input: read-only in Modbus"),
        ("serial_no", "SN-1", "point 'serial_no' is a string: not writable"),
        ("alarm", 1, "point 'alarm' is a bitfield: not writable"),
        ("power", 1.5, r"point 'power' is not writable \(set writable: true on the point to allow it\)"),
        ("nope", 1, "no point 'nope'"),
        ("setpoint", 3500, r"3500 \(raw 35400\) is out of range for int16 \(-32768\.\.32767\)"),
        ("counter_preset", -1, r"-1 is out of range for uint32 \(0\.\.4294967295\)"),
        ("counter_preset", 2**32, r"4294967296 is out of range for uint32 \(0\.\.4294967295\)"),
        ("flow_limit", 1e45, r"1e\+45 \(raw 2\.77778e\+41\) is out of range for float32"),
        ("flow_limit", float("nan"), "nan is not a finite number"),
        ("setpoint", "hot", "'hot' is not a number"),
        ("relay", 2, "a coil takes true/false \\(or 1/0\\), not 2"),
    ],
)
def test_writes_that_cannot_be_done_are_refused_before_anything_is_sent(
    point: str, value: Any, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus.driver")

    async def body() -> None:
        async with tcp_unit(tcp_device) as (driver, unit, sim):
            with pytest.raises(DriverWriteError, match=rf"^device m: cannot write {point} = .*: {message}$") as info:
                await driver.write(point, value)
            expected = (
                "not_writable" if "writable" in message or "read-only" in message or "no point" in message
                else "out_of_range" if "out of range" in message
                else "bad_value"
            )  # fmt: skip
            assert info.value.kind == expected
            assert sim.requests == 0 and unit.writes == [], "a refused write must not reach the device"

    run(body)
    assert [m for m in write_logs(caplog) if m.startswith(f"device m: write {point} = ") and " refused: " in m]


def test_a_device_that_refuses_or_does_not_answer_gives_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus.driver")

    async def body() -> None:
        async with tcp_unit(tcp_device, start=False) as (driver, unit, _sim):
            with pytest.raises(DriverWriteError, match="cannot write setpoint = 20: the device is not running") as info:
                await driver.write("setpoint", 20)
            assert info.value.kind == "unavailable"
            await driver.start()
            before = measurements(await driver.poll(driver.requests))["setpoint"]["value"]
            unit.faults.refuse_writes = 3  # the device answers: exception 3, illegal data value
            with pytest.raises(DriverWriteError, match=r"^device m: write setpoint = 25\.0 failed: exception 3 "
                                                       r"\(illegal data value\)$") as info:  # fmt: skip
                await driver.write("setpoint", 25.0)
            assert info.value.kind == "out_of_range"
            assert unit.writes == []
            assert measurements(await driver.poll(driver.requests))["setpoint"]["value"] == before
            unit.faults.refuse_writes = None
            unit.faults.delay = 1.0  # applied, but the echo comes after the 300 ms timeout
            timeout = r"failed: timeout \(the device may or may not have applied"
            with pytest.raises(DriverWriteError, match=timeout) as info:
                await driver.write("setpoint", 26.0)
            assert info.value.kind == "timeout"
            unit.faults.delay = 0
            await asyncio.sleep(1.0)  # let the late echo arrive and be discarded
            await driver.write("setpoint", 27.0)
            assert measurements(await driver.poll(driver.requests))["setpoint"]["value"] == 27.0
            assert (driver.stats["writes"], driver.stats["failed_writes"]) == (3, 2)

    run(body)
    logs = write_logs(caplog)
    assert ("device m: write setpoint = 25.0 (holding 30, function 6, [650]) failed: exception 3 "
            "(illegal data value)") in logs  # fmt: skip
    assert "device m: write setpoint = 27.0 (holding 30, function 6, [670]): ok" in logs


def test_write_functions_follow_the_device_manual() -> None:
    """A device whose manual lists only 15/16 (e.g. Schneider iEM3000: 03, 16) gets those, even for one item."""

    async def body() -> None:
        async with tcp_unit(lambda port: tcp_device(port, write_functions=[15, 16])) as (driver, unit, _sim):
            await driver.write("setpoint", -40)
            await driver.write("relay", 1)
            assert unit.writes == [(16, 30, [0]), (15, 5, [True])]
            m = measurements(await driver.poll(driver.requests))
            assert (m["setpoint"]["value"], m["relay"]["value"]) == (-40, 1)

    run(body)


def _device(points: list[dict[str, Any]], **keys: Any) -> ModbusConfig:
    return ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "h", "points": points, **keys})


def test_only_coils_and_holding_registers_can_be_marked_writable_and_the_default_is_read_only() -> None:
    assert not any(p.writable for p in _device([dict(p, writable=False) for p in POINTS]).points)
    assert _device([{"name": "sp", "address": 1, "quantity": "temperature"}]).points[0].writable is False
    refused = [
        ({"name": "v", "table": "input", "address": 0, "quantity": "voltage", "writable": True},
         "input points cannot be writable \\(Modbus writes only coils and holding registers\\)"),
        ({"name": "b", "table": "discrete", "address": 0, "type": "bool", "bay": "A1", "writable": True},
         "discrete points cannot be writable"),
        ({"name": "s", "address": 0, "type": "string", "length": 2, "quantity": "counter", "writable": True},
         "string points cannot be writable"),
        ({"name": "f", "address": 0, "type": "bitfield", "bit": 0, "quantity": "digital_input", "writable": True},
         "bitfield points cannot be writable"),
    ]  # fmt: skip
    for point, message in refused:
        with pytest.raises(ValidationError, match=message):
            _device([point])
    # A profile's input registers stay read-only whatever the site says.
    with pytest.raises(ValidationError, match="'voltage_l1': input points cannot be writable"):
        ModbusConfig.model_validate({"id": "m", "driver": "modbus", "host": "h", "profile": "eastron-sdm630",
                                     "points": [{"name": "voltage_l1", "writable": True}]})  # fmt: skip


def test_a_writable_point_needs_a_function_the_device_offers() -> None:
    wide = {"name": "limit", "address": 0, "type": "float32", "quantity": "flow", "writable": True}
    with pytest.raises(ValidationError, match=r"'limit' is writable but none of write_functions \[6\] writes a "
                                              r"holding of 2 register"):  # fmt: skip
        _device([wide], write_functions=[6])
    coil = {"name": "relay", "table": "coil", "address": 0, "type": "bool", "quantity": "digital_input",
            "writable": True}  # fmt: skip
    with pytest.raises(ValidationError, match="'relay' is writable but none of write_functions"):
        _device([coil], write_functions=[6, 16])
    with pytest.raises(ValidationError, match=r"write_functions\.0"):
        _device([coil], write_functions=[3])
    # Read-only points never need one, and the defaults cover every kind.
    assert _device([dict(wide, writable=False)], write_functions=[6]).write_functions == [6]
    device = _device([wide, coil])
    assert [device.write_function(p) for p in device.points] == [16, 5]


def rtu_device(port: str, unit: int) -> ModbusConfig:
    return ModbusConfig.model_validate({
        "id": f"u{unit}", "driver": "modbus", "transport": "rtu", "unit": unit, "timeout": "250ms",
        "serial": {"port": port, "baudrate": 19200}, "points": POINTS[:5],
    })  # fmt: skip


def test_rtu_writes_take_their_turn_on_the_bus_shared_with_polling_units() -> None:
    async def body() -> None:
        line = PtyPair()
        configs = [rtu_device(line.client, u) for u in (1, 2, 3)]
        units = [SimulatedUnit(u, configs[0].points) for u in (1, 2, 3)]
        sim = Simulator(units, period=3600)
        await sim.serve_serial(line.device, baudrate=19200)
        drivers = [ModbusDriver(c, Recorder(c.id)) for c in configs]
        for d in drivers:
            await d.start()
        try:
            assert len({id(d._bus) for d in drivers}) == 1
            assert all(await asyncio.gather(*(d.poll(d.requests) for d in drivers)))  # connected, all answer
            units[2].faults.refuse_writes = 2  # unit 3 refuses writes: exception 2
            started = time.monotonic()
            for value in (18.0, 19.5, 21.0):
                results = await asyncio.gather(
                    drivers[0].poll(drivers[0].requests),
                    drivers[1].write("setpoint", value),
                    drivers[1].write("relay", value > 20),
                    drivers[2].write("flow_limit", value),
                    drivers[2].poll(drivers[2].requests),
                    return_exceptions=True,
                )
                assert measurements(results[0])["power"]["quality"] == "good"
                assert results[1:3] == [None, None]
                assert isinstance(results[3], DriverWriteError)
                assert str(results[3]).endswith("failed: exception 2 (illegal data address)")
                assert measurements(results[4])["flow_limit"]["quality"] == "good"
            assert time.monotonic() - started < 3.0
            assert [w[:2] for w in units[1].writes] == [(6, 30), (5, 5)] * 3 and units[2].writes == []
            m = measurements(await drivers[1].poll(drivers[1].requests))
            assert (m["setpoint"]["value"], m["relay"]["value"]) == (21.0, 1)
            # One request at a time: every request met its own answer before the next went out
            # (bytes of one frame may arrive in pieces, so runs of one direction count once) ...
            turns = [(sending, [t for t, _ in run]) for sending, run in itertools.groupby(sim.frames, lambda f: f[1])]
            sent = sum(d.stats["requests"] + d.stats["writes"] for d in drivers)
            assert [s for s, _ in turns] == [False, True] * sent
            # ... and after each answer the line stayed silent 3.5 characters (11 bits at 19200: 2.0 ms).
            gaps = [b[1][0] - a[1][-1] for a, b in itertools.pairwise(turns) if a[0] and not b[0]]
            assert len(gaps) == sent - 1 and min(gaps) >= 3.5 * 11 / 19200 * 0.9, sorted(gaps)[:3]
        finally:
            for d in drivers:
                await d.stop()
            await sim.stop()
            line.close()

    run(body)


def test_a_scada_write_over_opcua_reaches_the_meter_through_the_agent(
    tmp_path: Path, broker: Any, subscriber_factory: Any, agent_factory: Any
) -> None:
    """uplink.opcua -> runtime -> Modbus driver -> a real pymodbus server, and back as events."""
    from asyncua import Client, ua

    modbus_port, opcua_port = free_port(), free_port()
    unit = SimulatedUnit(1, [PointConfig.model_validate(p) for p in POINTS[:2] + POINTS[4:5]])
    sim = Simulator([unit], period=3600)
    loop = asyncio.new_event_loop()
    server = threading.Thread(target=loop.run_forever, daemon=True)
    server.start()
    asyncio.run_coroutine_threadsafe(sim.serve_tcp("127.0.0.1", modbus_port), loop).result(10)
    (tmp_path / "users").write_text("scada:hmi-pass\n")
    points = ", ".join(json.dumps(p) for p in POINTS[:2] + POINTS[4:5])
    site = tmp_path / "site.yaml"
    site.write_text(
        "gateway: {id: gw-test}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1}}\n"
        f"  opcua: {{enabled: true, listen: 'opc.tcp://127.0.0.1:{opcua_port}', security_policies: [None],"
        " users_file: users, publish_interval: 50ms, writable: [{device: boiler, point: setpoint}]}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\n"
        "devices:\n"
        f"  - {{id: boiler, driver: modbus, host: 127.0.0.1, port: {modbus_port}, interval: 200ms,"
        f" points: [{points}]}}\n"
    )
    sub = subscriber_factory(broker.port)
    agent = agent_factory(site)

    def setpoints() -> list[float]:
        return [
            m["value"]
            for e in sub.snapshot()
            if e.get("device") == "boiler" and e["type"] == "city.meter.reading"
            for m in e["data"]["measurements"]
            if m.get("point") == "setpoint"
        ]

    try:
        wait_for(lambda: len(setpoints()) >= 2, 30, "setpoint readings over MQTT")

        async def body() -> None:
            client = Client(f"opc.tcp://127.0.0.1:{opcua_port}")
            client.set_user("scada")
            client.set_password("hmi-pass")
            await client.connect()
            try:
                ns = await client.get_namespace_index("urn:edge-agent:gateway")
                node = client.get_node(f"ns={ns};s=Devices.boiler.setpoint")
                await node.write_value(ua.DataValue(ua.Variant(21.5, ua.VariantType.Double)))  # Good: applied
                assert unit.writes == [(6, 30, [615])], "the meter holds the value once the client is answered"
                with pytest.raises(ua.UaStatusCodeError, match="BadOutOfRange"):
                    await node.write_value(ua.DataValue(ua.Variant(9999.0, ua.VariantType.Double)))
                assert len(unit.writes) == 1
            finally:
                await client.disconnect()

        asyncio.run(asyncio.wait_for(body(), 30))
        wait_for(lambda: setpoints()[-1] == pytest.approx(21.5), 10, "the written setpoint in the next events")
        assert "OPC UA write" in agent.output() and "boiler/setpoint = 21.5 applied by the device" in agent.output()
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        server.join(5)
