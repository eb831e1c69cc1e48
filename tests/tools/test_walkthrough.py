"""A technician's commissioning, scripted: each command is the one the previous output named (issue 18).

From a gateway with the agent installed (a site file naming the gateway and its broker, no
devices) and a meter on the bus (the simulator on a pseudo-terminal) to the meter's first
``city.meter.reading`` on a real Mosquitto: at most 5 commands, none looked up in a manual.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, wait_for

MOST_COMMANDS = 5
SITE = (
    "# /etc/edge-agent/site.yaml as the installer leaves it\n"
    "gateway: {{id: gw-walk, site: depot}}\n"
    "uplink:\n"
    "  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1, reconnect_min: 200ms, reconnect_max: 1s}}\n"
    "buffer: {{path: {state}/buffer.db}}\n"
    "devices: []\n"
)


def _argv(next_line: str) -> list[str]:
    """``next: edge-agent validate -c site.yaml   (or ...)`` as the argv to run it here."""
    assert next_line.startswith("next: edge-agent "), next_line
    command = next_line.removeprefix("next: ").split("   (", 1)[0]
    return [sys.executable, "-m", "agent", *shlex.split(command)[1:]]


def _next(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("next: ")]
    assert lines, f"the output names no next command:\n{output}"
    return lines[-1]


def test_from_installed_gateway_to_first_meter_reading_following_each_printed_next_command(
    tmp_path: Path, broker, subscriber_factory
) -> None:
    state = tmp_path / "state"  # a fresh state folder: the agent makes it
    (tmp_path / "site.yaml").write_text(SITE.format(port=broker.port, state=state))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sub = subscriber_factory(broker.port)
    started = time.monotonic()
    meter = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630",
                              "--rtu", "--units", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    agent: subprocess.Popen[str] | None = None
    commands = 0
    try:
        assert meter.stdout is not None
        shown = meter.stdout.readline() + meter.stdout.readline()
        step = _next(shown)  # the meter stands in for the real one; what follows is the technician's
        for expected in ("scan", "validate"):
            argv = _argv(step)
            assert argv[3] == expected, step
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
            commands += 1
            assert done.returncode == 0, f"{step}\n{done.stdout}{done.stderr}"
            step = _next(done.stdout)
        argv = _argv(step)
        assert argv[3:] == ["run", "-c", "site.yaml"], step
        agent = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)  # fmt: skip
        commands += 1
        wait_for(lambda: sub.seqs("sdm630-1", "city.meter.reading"), 30, "the meter's first reading")
        machine = time.monotonic() - started
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(10)
        meter.terminate()
        meter.wait(5)
    assert commands <= MOST_COMMANDS
    assert machine <= 60, f"the walkthrough took {machine:.1f} s of machine time"
    reading = next(e for e in sub.snapshot() if e["type"] == "city.meter.reading")
    assert {m["quantity"] for m in reading["data"]["measurements"]} >= {"voltage", "frequency"}
    assert state.is_dir() and (tmp_path / "site.yaml.bak").exists()
    print(f"walkthrough: {commands} commands, {machine:.1f} s machine time")
