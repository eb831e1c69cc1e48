"""The Modbus driver and the technician's commands against libmodbus, a Modbus stack that is not pymodbus.

The rest of the suite talks to the agent's own simulator, built on the same library (pymodbus)
as the driver: a misunderstanding shared by both halves would pass there. Here the unit is a
small C program on libmodbus (tests/interop/modbus/server.c), built by this module, serving a
shipped profile's registers over Modbus TCP and over RTU on a pseudo-terminal pair. Its float32
registers are the IEEE-754 patterns of the decimal texts the test hands it (C's ``strtof``), and
the expected values are computed here from those texts (``decimal``), not with the agent's codec.

Needs a C compiler, pkg-config and libmodbus (Debian: ``apt-get install gcc pkg-config
libmodbus-dev``; CI's .ci/run installs them). Without them the tests fail, naming the package.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.config import ModbusConfig, PointConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.pty import PtyPair
from tests.conftest import ROOT, Recorder, wait_for, write_config
from tests.modbus_helpers import measurements, run

SOURCE = ROOT / "tests" / "interop" / "modbus" / "server.c"
PROFILE = "eastron-sdm630"
APT = "apt-get install gcc pkg-config libmodbus-dev"


# ---- the libmodbus unit --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def libmodbus_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C server, compiled once per test session into a temporary folder (never into the tree)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail(f"no C compiler to build the libmodbus interop server; on Debian: {APT}")
    if shutil.which("pkg-config") is None:
        pytest.fail(f"pkg-config is missing (it finds libmodbus for the interop server); on Debian: {APT}")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libmodbus"], capture_output=True, text=True,
                           check=False)  # fmt: skip
    if flags.returncode != 0:
        pytest.fail(f"libmodbus is not installed (pkg-config: {flags.stderr.strip()}); on Debian: {APT}")
    binary = tmp_path_factory.mktemp("libmodbus") / "modbus-server"
    built = subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(SOURCE),
                            *flags.stdout.split()], capture_output=True, text=True, check=False)  # fmt: skip
    if built.returncode != 0:
        pytest.fail(f"building {SOURCE.name} failed ({APT} provides what it needs):\n{built.stderr}")
    return binary


def profile_device(**keys: Any) -> ModbusConfig:
    return ModbusConfig.model_validate({"id": "sdm", "driver": "modbus", "profile": PROFILE, "timeout": "500ms",
                                        **keys})  # fmt: skip


def meter_texts(points: list[PointConfig]) -> dict[str, str]:
    """A decimal text per float32 point, each different (an address mix-up shows), as a meter shows them."""
    texts = {p.name: f"{200 + 10.1 * (i + 1):.1f}" for i, p in enumerate(points)}
    # The issue's own example, a negative value, a small one, and ones of six significant digits.
    texts |= {"voltage_l1": "230.1", "power_factor_l2": "-0.87", "current_n": "0.003", "frequency": "49.99",
              "active_energy_import": "12345.6", "active_power": "-4321.5"}  # fmt: skip
    return {p.name: texts[p.name] for p in points}


def expected_value(point: PointConfig, text: str) -> float:
    """What the driver publishes for a register holding float32(``text``).

    ``text`` has at most six significant digits, which float32 always keeps, so the shortest
    decimal that gives the register's bits back is ``text`` itself; scale and offset apply to it.
    """
    assert len(Decimal(text).as_tuple().digits) <= 6, text
    return float(Decimal(text) * Decimal(repr(point.scale)) + Decimal(repr(point.offset)))


def map_lines(points: list[PointConfig], texts: dict[str, str]) -> str:
    return "".join(f"{p.table} {p.address} f32 {texts[p.name]}\n" for p in points)


@contextlib.contextmanager
def serving(binary: Path, registers: str, tmp_path: Path, transport: str, *options: str) -> Iterator[str]:
    """The libmodbus unit 1 serving ``registers``: yields ``127.0.0.1:PORT`` (tcp) or the agent's tty (rtu)."""
    mapfile = tmp_path / f"map-{transport}.txt"
    mapfile.write_text(registers)
    line = PtyPair() if transport == "rtu" else None
    where = ["tcp", "0"] if line is None else ["rtu", line.device, "9600"]
    proc = subprocess.Popen([str(binary), *where, str(mapfile), "--unit", "1", *options], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        first = proc.stdout.readline() if ready else ""
        if not first.startswith("ready "):
            proc.kill()
            pytest.fail(f"the libmodbus server did not start: {first!r} {proc.stderr.read()}")
        yield f"127.0.0.1:{first.split()[1]}" if line is None else line.client
    finally:
        proc.terminate()
        proc.wait(5)
        if line is not None:
            line.close()


def connection(transport: str, where: str) -> dict[str, Any]:
    if transport == "tcp":
        host, port = where.split(":")
        return {"host": host, "port": int(port)}
    return {"transport": "rtu", "serial": {"port": where, "baudrate": 9600, "parity": "N"}}


async def _polled(config: ModbusConfig, polls: int = 1) -> tuple[ModbusDriver, list[dict[str, dict[str, Any]]]]:
    driver = ModbusDriver(config, Recorder())
    await driver.start()
    try:
        return driver, [measurements(await driver.poll(driver.requests)) for _ in range(polls)]
    finally:
        await driver.stop()


# ---- the driver --------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_the_driver_reads_a_profile_from_libmodbus_and_publishes_each_float32_as_its_shortest_decimal(
    libmodbus_server: Path, tmp_path: Path, transport: str
) -> None:
    """Issue 13: an unscaled float32 register holding 230.1 was published as 230.10000610351562."""
    points = profile_device(host="h").points
    texts = meter_texts(points)
    with serving(libmodbus_server, map_lines(points, texts), tmp_path, transport) as where:
        config = profile_device(**connection(transport, where))
        result: dict[str, Any] = {}

        async def body() -> None:
            result["driver"], result["polls"] = await _polled(config)

        run(body)
    driver, (got,) = result["driver"], result["polls"]
    assert driver.context.outcomes == ["ok"]
    assert driver.stats["requests"] == len(driver.requests) == 4 and driver.stats["failed_requests"] == 0
    assert {name: m["quality"] for name, m in got.items()} == dict.fromkeys(texts, "good")
    wrong = {p.name: (texts[p.name], got[p.name]["value"]) for p in config.points
             if repr(got[p.name]["value"]) != repr(expected_value(p, texts[p.name]))}  # fmt: skip
    assert not wrong, f"published values that are not the register's shortest decimal (text, value): {wrong}"
    assert got["voltage_l1"]["value"] == 230.1 and got["active_power"]["value"] == -4.3215  # kW from W


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_a_strict_unit_refuses_a_merged_read_with_exception_2_and_the_driver_splits_it(
    libmodbus_server: Path, tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit answering only for the registers its manual lists: the profile's merged read spans holes.

    The driver splits it at its holes and reads the parts in the same poll; a point the site
    added at an address the unit lacks is the only one lost, with the unit's exception as reason.
    """
    caplog.set_level(logging.WARNING, logger="drivers.modbus.driver")
    profile_points = profile_device(host="h").points
    texts = meter_texts(profile_points)
    typo = {"name": "typo", "table": "input", "address": 0x40, "type": "float32", "quantity": "voltage"}
    with serving(libmodbus_server, map_lines(profile_points, texts), tmp_path, transport, "--strict") as where:
        config = profile_device(**connection(transport, where), points=[typo])
        result: dict[str, Any] = {}

        async def body() -> None:
            result["driver"], result["polls"] = await _polled(config, polls=2)

        run(body)
    driver, polls = result["driver"], result["polls"]
    merged = driver.requests[0]
    assert (merged.table, merged.address, merged.count) == ("input", 0, 80)
    for got in polls:
        assert got["typo"]["quality"] == "bad" and got["typo"]["reason"] == "exception 2 (illegal data address)"
        assert {p.name: got[p.name]["value"] for p in profile_points} == {
            p.name: expected_value(p, texts[p.name]) for p in profile_points
        }
        assert all(got[p.name]["quality"] == "good" for p in profile_points)
    assert driver.context.outcomes == ["ok", "ok"]
    assert driver.stats["splits"] == 1
    # Poll 1: the merged read refused, its 7 runs between holes read (the one with the typo
    # refused too, then read point by point), the 3 other reads. Poll 2 reads the kept parts.
    refused = [r.getMessage() for r in caplog.records if "refused to read input 0..79" in r.getMessage()]
    assert len(refused) == 1 and "exception 2 (illegal data address)" in refused[0], caplog.text
    # Refused: 0..79, the typo's run and the typo alone, then in poll 2 the typo alone again.
    assert driver.stats["failed_requests"] == 4, driver.stats
    first_poll = 1 + 7 + 3 + 3  # merged, runs, the typo's run's three points, the other reads
    assert driver.stats["requests"] == first_poll + (7 - 1 + 3) + 3, driver.stats


def test_a_unit_taking_fewer_registers_per_read_answers_exception_3_and_gets_smaller_reads(
    libmodbus_server: Path, tmp_path: Path
) -> None:
    points = profile_device(host="h").points
    texts = meter_texts(points)
    with serving(libmodbus_server, map_lines(points, texts), tmp_path, "tcp", "--max-read", "16") as where:
        config = profile_device(**connection("tcp", where))
        result: dict[str, Any] = {}

        async def body() -> None:
            result["driver"], result["polls"] = await _polled(config, polls=2)

        run(body)
    driver, polls = result["driver"], result["polls"]
    for got in polls:
        assert {p.name: (got[p.name]["quality"], got[p.name]["value"]) for p in points} == {
            p.name: ("good", expected_value(p, texts[p.name])) for p in points
        }
    assert driver.stats["splits"] == 1
    # 0..79 (80 registers) refused; of its runs, 0..35 (36) refused again and read point by point.
    assert driver.stats["failed_requests"] == 2, driver.stats
    assert max(r.count for r in driver._reads[id(driver.requests[0])]) <= 16


# ---- the technician's commands -----------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_scan_and_read_against_libmodbus(libmodbus_server: Path, tmp_path: Path, transport: str) -> None:
    points = profile_device(host="h").points
    texts = meter_texts(points)
    with serving(libmodbus_server, map_lines(points, texts), tmp_path, transport, "--strict") as where:
        line = ["--host", where] if transport == "tcp" else ["--port", where, "--baud", "9600", "--parity", "N"]
        # Waits well above the defaults (scan 35 ms + the answer, read 0.3 s): this test is about what
        # the two ends make of each other's bytes, and a loaded machine delays the server on the pty.
        scan = _cli("scan", "modbus", *line, "--units", "1-3", "--table", "input", "--timeout", "0.5")
        read = _cli("read", "modbus", *line, "--unit", "1", "--address", "30001", "--count", "6", "--type", "float32",
                    "--timeout", "2")  # fmt: skip
    assert scan.returncode == 0, scan.stdout + scan.stderr
    rows = {r.split()[0]: " ".join(r.split()[4:]) for r in scan.stdout.splitlines()[1:] if r[:4].strip().isdigit()}
    if transport == "tcp":  # units 2, 3: the server answers as a gateway whose target is silent
        assert rows == {"1": "ok", "2": "exception 11 (gateway target device failed to respond)",
                        "3": "exception 11 (gateway target device failed to respond)"}, scan.stdout  # fmt: skip
    else:  # on a serial line, libmodbus ignores requests for other units: they time out
        assert rows == {"1": "ok"}, scan.stdout
    assert read.returncode == 0, read.stdout + read.stderr
    shown = [r.split()[-1] for r in read.stdout.splitlines()[1:]]
    assert shown == [texts[p.name] for p in points[:6]], read.stdout  # 230.1, not 230.10000610351562


# ---- through the agent, to the bytes on MQTT ---------------------------------------------------
def test_the_agent_publishes_libmodbus_float32_registers_as_short_decimals_on_mqtt(
    libmodbus_server: Path, tmp_path: Path, broker, subscriber_factory, agent_factory
) -> None:
    points = profile_device(host="h").points
    texts = meter_texts(points)
    sub = subscriber_factory(broker.port)
    with serving(libmodbus_server, map_lines(points, texts), tmp_path, "tcp") as where:
        host, port = where.split(":")
        device = (f"  - {{id: sdm-1, driver: modbus, host: {host}, port: {port}, profile: {PROFILE}, "
                  "interval: 200ms, timeout: 500ms}\n")  # fmt: skip
        agent = agent_factory(write_config(tmp_path / "site.yaml", port=broker.port, devices=device))

        def reading() -> bytes | None:
            with sub.lock:
                return next((p for _, p, _ in sub.raw if b'"city.meter.reading"' in p and b'"sdm-1"' in p), None)

        payload = wait_for(reading, 30, "a meter reading from sdm-1 on MQTT")
        agent.kill()
    # The JSON text of each value, as the operations centre's parser sees it.
    shown = dict(
        (point.decode(), value.decode())
        for value, point in re.findall(rb'"value":([^,}]+),"unit":"[^"]*","quality":"good","point":"(\w+)"', payload)
    )
    assert set(shown) == set(texts), payload[:300]
    wrong = {p.name: shown[p.name] for p in points if shown[p.name] != repr(expected_value(p, texts[p.name]))}
    assert not wrong, f"values on the wire that are not the register's shortest decimal: {wrong}"
    assert shown["voltage_l1"] == "230.1"
