"""The commissioning frictions of issue 18, one test each, against real pseudo-terminals and the pymodbus simulator."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from agent.config.model import load_config
from agent.tools.cli import main
from drivers.modbus.config import ModbusConfig, PointConfig
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.pty import PtyPair, heard_as
from drivers.modbus.rtu_line import RtuLine
from drivers.modbus.simulator import SimulatedUnit, Simulator
from tests.conftest import ROOT, Recorder, free_port, wait_for
from tests.modbus_helpers import measurements, run

SITE = (
    "# written by the installer: the gateway and its broker\n"
    "gateway: {{id: gw-test, site: lab}}\n"
    "uplink:\n"
    "  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1, reconnect_min: 200ms, reconnect_max: 1s}}\n"
    "buffer: {{path: {buffer}}}  # the state folder\n"
    "devices: []  # edge-agent scan modbus --add-to fills this\n"
)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def meter() -> Iterator[str]:
    """``simulate modbus``: an SDM630 as unit 5 on a pty at 9600 8N1, strict (the default). Yields the client end."""
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630",
                             "--rtu", "--units", "5"], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        client = first.rsplit("serial.port: ", 1)[1].strip()
        assert second.strip() == f"next: edge-agent scan modbus --port {client} --units 5 --add-to site.yaml"
        yield client
    finally:
        proc.terminate()
        proc.wait(5)


def test_scan_prints_each_hit_as_found_with_its_profile_and_progress_each_second(meter: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "scan", "modbus", "--port", meter, "--units", "1-40"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    header, row, why = proc.stdout.readline(), proc.stdout.readline(), proc.stdout.readline()
    assert proc.poll() is None, "the hit is printed while the sweep goes on"
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert header.split() == ["UNIT", "BAUD", "PARITY", "PROFILE", "ANSWER"]
    assert row.split()[:5] == ["5", "9600", "N", "eastron-sdm630", "exception"], row
    assert why.strip() == "profile: 6 sampled registers plausible; FC 43/14: Eastron SDM630-Modbus V2"
    progress = [line for line in err.splitlines() if line.startswith(f"scan {meter} 9600 8N1: unit ")]
    assert progress, err  # 40 units take about 2 s: a line a second
    assert f"1 unit(s) found on {meter} in " in err and ", 40 probes" in err
    assert f"next: edge-agent scan modbus --port {meter} --baud 9600 --parity N --units 5 --add-to" in out


def _ctrl_c_as_at_a_terminal() -> None:
    """A command started in the background of a shell without job control (a CI runner may be one)
    inherits SIGINT ignored, and Python then raises no KeyboardInterrupt: give the child what a
    terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_scan_first_and_ctrl_c_stop_early_with_the_results_so_far(meter: str) -> None:
    # --timeout: the simulator behind a pty may answer slower than a meter's 35 ms on a loaded machine
    first = cli("scan", "modbus", "--port", meter, "--first", "--timeout", "0.3")
    assert first.returncode == 0 and ", 5 probes" in first.stderr, first.stderr  # units 1-5, not 247
    proc = subprocess.Popen([sys.executable, "-m", "agent", "scan", "modbus", "--port", meter, "--expect", "2",
                             "--timeout", "0.3"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_at_a_terminal)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()
    hit = proc.stdout.readline()  # the one unit there; --expect 2 would sweep on for 11 s
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and hit.split()[0] == "5", (hit, err)
    assert " probes (interrupted)" in err and "Traceback" not in err, err
    assert "next: edge-agent scan modbus" in out


def test_scan_adds_the_hit_to_a_site_file_validated_with_a_backup_and_names_the_next_command(
    meter: str, tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(port=free_port(), buffer=tmp_path / "buffer.db"))
    before = site.read_text()
    done = cli("scan", "modbus", "--port", meter, "--units", "5", "--timeout", "0.3", "--add-to", str(site))
    assert done.returncode == 0, done.stderr
    assert f"added unit 5 (eastron-sdm630) to {site} (previous file kept as {site}.bak)" in done.stdout
    assert done.stdout.splitlines()[-1] == f"next: edge-agent validate -c {site}"
    after = site.read_text()
    assert after.startswith(before.replace("devices: []  #", "devices:  #")), "every line kept, comments too"
    assert (tmp_path / "site.yaml.bak").read_text() == before
    device = load_config(site).devices[0]
    assert isinstance(device, ModbusConfig) and device.serial is not None
    assert (device.id, device.profile, device.unit, device.serial.port) == ("sdm630-5", "eastron-sdm630", 5, meter)
    again = cli("scan", "modbus", "--port", meter, "--units", "5", "--timeout", "0.3", "--add-to", str(site))
    assert again.returncode == 2 and site.read_text() == after, "a refused add leaves the file as it was"
    assert f"would not validate with sdm630-5-2 added:\n  {site}:" in again.stderr
    assert "unit 5 on " in again.stderr and "each unit on one bus needs its own id" in again.stderr


def test_a_setting_the_port_refuses_is_one_line_naming_port_and_setting(meter: str) -> None:
    expected = (f"error: {meter} refuses 9600 8E1 (invalid argument); a pseudo-terminal has no parity bit: "
                "use parity N on it (the simulator rehearses parity)")  # fmt: skip
    scan = cli("scan", "modbus", "--port", meter, "--units", "5", "--baud", "9600", "--parity", "E")
    assert scan.returncode == 1 and expected in scan.stderr.splitlines(), scan.stderr
    read = cli("read", "modbus", "--port", meter, "--unit", "5", "--address", "30001", "--parity", "E")
    assert read.returncode == 1 and "Traceback" not in read.stderr, read.stderr
    assert read.stderr.splitlines() == [f"error: unit 5 at {meter}: cannot connect to {meter}: {expected[7:]}"]


def test_strict_simulator_refuses_addresses_outside_its_profile_and_the_agent_reads_them_bad(meter: str) -> None:
    async def body() -> None:
        extra = {"name": "typo", "table": "input", "address": 0x0300, "type": "float32", "quantity": "voltage"}
        config = ModbusConfig.model_validate({
            "id": "m", "driver": "modbus", "transport": "rtu", "unit": 5, "profile": "eastron-sdm630",
            "timeout": "300ms", "serial": {"port": meter}, "points": [extra],
        })  # fmt: skip
        driver = ModbusDriver(config, Recorder())
        await driver.start()
        try:
            m = measurements(await driver.poll(driver.requests))
        finally:
            await driver.stop()
        assert m["voltage_l1"]["quality"] == "good"
        assert (m["typo"]["quality"], m["typo"]["reason"]) == ("bad", "exception 2 (illegal data address)"), m["typo"]
        assert m["typo"]["value"] is None or m["typo"]["value"] != 0.0

    run(body)


def test_the_simulator_garbles_its_answers_to_a_client_at_the_wrong_baud_rate_or_parity() -> None:
    data = bytes([5, 4, 4, 0x43, 0x66, 0x19, 0x9A, 0x12, 0x34])
    assert heard_as(data, (9600, "N"), (9600, "N")) == data
    assert heard_as(data, (9600, "N"), (19200, "N")) != data and heard_as(data, (19200, "N"), (9600, "N")) != data
    assert heard_as(data, (9600, "E"), (9600, "N")) == bytes(b if bin(b).count("1") % 2 else 0 for b in data)

    async def body() -> None:
        line = PtyPair()
        points = [PointConfig.model_validate({"name": "v", "table": "input", "address": 0, "type": "float32",
                                              "quantity": "voltage"})]  # fmt: skip
        sim = Simulator([SimulatedUnit(5, points, strict=True)], period=3600)
        await sim.serve_serial(line.device, baudrate=9600)
        client = RtuLine(line.client)
        try:
            verdict = lambda: asyncio.to_thread(lambda: client.read(5, "input", 0, 2).verdict)  # noqa: E731
            assert await verdict() == "ok"
            client.configure(19200, "N")
            assert await verdict() == "garbled"  # the meter is at 9600
            client.configure(9600, "N")
            line.meter_parity = "E"  # as `simulate modbus --parity E` declares it
            assert await verdict() == "garbled"
            line.meter_parity = "N"
            assert await verdict() == "ok"
        finally:
            client.close()
            await sim.stop()
            line.close()

    run(body)


def test_the_sweep_goes_frequency_first_and_skips_settings_the_pty_refuses() -> None:
    """A meter at 19200 8N1: 9600 8N1 hears it garbled, 9600 8E1 is refused by the pty, 19200 8N1 finds it."""

    async def body() -> None:
        line = PtyPair()
        points = [PointConfig.model_validate({"name": "v", "table": "input", "address": 0, "type": "float32",
                                              "quantity": "voltage"})]  # fmt: skip
        sim = Simulator([SimulatedUnit(5, points)], period=3600)
        await sim.serve_serial(line.device, baudrate=19200)
        try:
            done = await asyncio.to_thread(cli, "scan", "modbus", "--port", line.client, "--units", "4-5")
        finally:
            await sim.stop()
            line.close()
        assert done.returncode == 0, done.stderr
        rows = [r.split() for r in done.stdout.splitlines() if r[:4].strip().isdigit()]
        assert [r[:3] for r in rows] == [["5", "19200", "N"]], done.stdout
        assert f"skipped settings {line.client} refuses: 9600 8E1 (a pseudo-terminal has no parity bit)" in done.stderr
        assert ", 6 probes" in done.stderr, done.stderr  # 9600 8N1, 8E1 (skipped), then 19200 8N1: 2 units each

    run(body)


def test_the_running_agent_names_a_missing_or_busy_port_on_its_first_failure(
    meter: str, tmp_path: Path, agent_factory
) -> None:
    gone = str(tmp_path / "ttyUSB9")
    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(port=free_port(), buffer=tmp_path / "buffer.db").replace("devices: []", "devices:") + (
        f"  - {{id: gone, driver: modbus, transport: rtu, unit: 1, profile: eastron-sdm120, interval: 1s,"
        f" serial: {{port: {gone}}}}}\n"
        f"  - {{id: held, driver: modbus, transport: rtu, unit: 5, profile: eastron-sdm630, interval: 1s,"
        f" serial: {{port: {meter}}}}}\n"))  # fmt: skip
    holder = serial.Serial(meter, 9600, exclusive=True)  # another program holds the port
    try:
        started = time.monotonic()
        agent = agent_factory(site)
        wait_for(lambda: "device held: cannot connect" in agent.output() and "device gone:" in agent.output(), 15,
                 "the agent's first failures")  # fmt: skip
        assert time.monotonic() - started < 8, "named on the first failed poll, not once offline"
        read = cli("read", "modbus", "--port", gone, "--address", "30001")
    finally:
        holder.close()
    said = read.stderr.strip().removeprefix("error: ")
    assert said.startswith(f"serial port {gone} not found; ")
    assert f"device gone: cannot connect to {gone}: {said}" in agent.output()  # the same words as `read`
    busy = f"device held: cannot connect to {meter}: {meter} is busy: open in "
    named = agent.output().split(busy, 1)[1].splitlines()[0]  # every holder, by pid and command line
    own = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()  # pytest, or an xdist worker
    assert f"pid {os.getpid()} ({own}" in named, named
    assert "; stop that process (the agent: systemctl stop edge-agent), then try again" in named


def test_validate_warns_on_a_missing_port_and_a_modicon_address_and_suggests_near_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = SITE.format(port=1883, buffer=tmp_path / "buffer.db").replace("devices: []", "devices:")
    warned = tmp_path / "warned.yaml"
    warned.write_text(base + (
        "  - id: m1\n    driver: modbus\n    transport: rtu\n    unit: 1\n    serial: {port: /dev/ttyUSB7}\n"
        "    points: [{name: v, table: input, address: 30225, type: float32, quantity: voltage}]\n"))  # fmt: skip
    assert main(["validate", "-c", str(warned)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("1 devices), 2 warning(s):")
    assert out[1].startswith("  warning: devices[0].serial.port: serial port /dev/ttyUSB7 not found; ")
    assert out[2] == ("  warning: devices[0] (m1) point v: address 30225 looks like a Modicon reference (3xxxx = "
                      "input register 225); addresses here are zero-based PDU addresses: if the manual says 30225, "
                      "write address: 224")  # fmt: skip
    assert out[-1].startswith(f"next: edge-agent run -c {warned}")
    typos = tmp_path / "typos.yaml"
    typos.write_text(base + (
        "  - {id: m1, driver: modbus, host: 127.0.0.1, profile: eastron-sdm360}\n"
        "  - {id: m2, driver: modbsu, host: 127.0.0.1}\n"
        "  - {id: m3, driver: modbus, host: 127.0.0.1, profile: eastron-sdm630, intervall: 1s}\n"))  # fmt: skip
    assert main(["validate", "-c", str(typos)]) == 2
    err = capsys.readouterr().err.splitlines()
    for suggestion in ("eastron-sdm630", "modbus", "interval"):
        assert f"    did you mean `{suggestion}`?" in err, err
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    for verb in ("scan", "read", "simulate"):
        assert re.search(rf"\n  {verb} {{[a-z,]*modbus[a-z,]*}} ", shown), shown


def test_lenient_simulator_answers_0_outside_its_profile_the_old_way() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm120",
                             "--tcp", f"127.0.0.1:{port}", "--lenient"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving eastron-sdm120")
        read = cli("read", "modbus", "--host", f"127.0.0.1:{port}", "--address", "30769", "--type", "float32")
    finally:
        proc.terminate()
        proc.wait(5)
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines()[1].split() == ["768", "0000", "0000", "0.0"], read.stdout
