"""A bench for the bus tools: ``simulate modbus`` (an SDM630, unit 7) on a real pty, and a real agent
with the page on, logged in, whose site has a disabled device on that pty."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT, AgentProcess, Mosquitto
from tests.ui.site import signed_in, start_agent, write_site

PASSWORD = "bus-password-93kd"  # noqa: S105 - the test's own
UNIT = 7  # the simulated meter's unit id


class Bench:
    """A simulated SDM630 on a pty, and an agent with the page on (plus a disabled device on that pty)."""

    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630", "--rtu",
             "--units", str(UNIT)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.sim.stdout is not None
        self.pty = self.sim.stdout.readline().rsplit("serial.port: ", 1)[1].strip()
        self.config, port = write_site(folder, broker)
        with self.config.open("a") as site:  # devices is the file's last key: one more, idle, on the pty
            site.write(
                "  - id: meter-3\n    driver: modbus\n    transport: rtu\n"
                f"    serial: {{port: {self.pty}, baudrate: 9600}}\n"
                f"    unit: {UNIT}\n    profile: eastron-sdm630\n    enabled: false\n"
            )
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{port}"
        self.client = signed_in(self.agent, port, PASSWORD)

    def close(self) -> None:
        self.client.close()
        self.agent.kill()
        self.sim.terminate()
        self.sim.wait(5)


@contextmanager
def running_bench(folder: Path) -> Iterator[Bench]:
    """A broker, the simulator and the agent, for one test module; all stopped after."""
    broker = Mosquitto(folder)
    broker.start()
    try:
        running = Bench(folder, broker)
        try:
            yield running
        finally:
            running.close()
    finally:
        broker.stop()
