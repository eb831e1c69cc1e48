"""A technician's commissioning on the page alone, scripted (issue 18): at most 5 page actions.

From a gateway with the agent running (the installer's site file with the page on, no device)
and a meter on the bus (the simulator on a pseudo-terminal) to the meter's first
``city.meter.reading`` on a real Mosquitto, in a real browser (Debian's chromium), on a phone:
open the setup link the agent logged, set the password, scan, add the hit, apply. Each screen
names the next action; nothing is looked up in a manual.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Browser, Page, expect

from tests.conftest import ROOT, AgentProcess, Mosquitto, Subscriber, free_port, wait_for
from tests.ui.site import first_token, wait_listening
from tests.ui.test_browser import VIEWPORTS, Watched

MOST_ACTIONS = 5
SITE = (
    "# /etc/edge-agent/site.yaml as the installer leaves it, with the page on\n"
    "gateway: {{id: gw-walk, site: depot}}\n"
    "uplink:\n"
    "  mqtt: {{host: 127.0.0.1, port: {broker}, topic_prefix: ioc/v1, reconnect_min: 200ms, reconnect_max: 1s}}\n"
    "buffer: {{path: {state}/buffer.db}}\n"
    'ui: {{enabled: true, listen: "127.0.0.1:{page}"}}\n'
    "devices: []\n"
)


class Technician:
    """Counts what the technician does on the page: each action is one tap after at most a form filled."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.actions = 0

    def act(self, do: Callable[[], None]) -> None:
        self.actions += 1
        do()


def test_from_running_gateway_to_first_meter_reading_in_five_page_actions(
    tmp_path: Path, broker: Mosquitto, subscriber_factory: Callable[..., Subscriber], browser: Browser
) -> None:
    page_port = free_port()
    config = tmp_path / "site.yaml"
    config.write_text(SITE.format(broker=broker.port, state=tmp_path / "state", page=page_port))
    config.chmod(0o600)
    sub = subscriber_factory(broker.port)
    started = time.monotonic()
    meter = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630",
                              "--rtu", "--units", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert meter.stdout is not None
        pty = meter.stdout.readline().rsplit("serial.port: ", 1)[1].strip()
        wait_listening(page_port)
        url, token = first_token(agent)  # the line the agent logs at its first start (or `ui token`)
        context = browser.new_context(**VIEWPORTS["phone"])
        try:
            page = context.new_page()
            watched = Watched(page, url.rstrip("/"))
            tech = Technician(page)

            tech.act(lambda: page.goto(f"{url}#setup={token}"))
            expect(page.get_by_role("heading", name="Set the device password")).to_be_visible()

            page.get_by_label("New password").fill("walk-through-pass-1")
            tech.act(lambda: page.get_by_role("button", name="Save password").tap())
            expect(page.get_by_role("button", name="Start scan")).to_be_visible()  # the next step, on screen

            page.locator("#scan-port").fill(pty)
            page.locator("#scan-first").check()
            tech.act(lambda: page.get_by_role("button", name="Start scan").tap())
            add = page.get_by_test_id("add-1")
            expect(add).to_have_text("Add to site", timeout=30000)
            expect(page.get_by_test_id("hit-profile-1")).to_have_text("eastron-sdm630")

            tech.act(add.tap)
            result = page.get_by_test_id("site-result")
            expect(result).to_contain_text("then press Apply")
            expect(page.get_by_test_id("site-diff")).to_contain_text("+  - id: sdm630-1")

            tech.act(lambda: page.get_by_role("button", name="Apply").tap())
            expect(result).to_contain_text("Applied")
            wait_for(lambda: sub.seqs("sdm630-1", "city.meter.reading"), 30, "the meter's first reading")
            machine = time.monotonic() - started
            expect(page.get_by_test_id("status-sdm630-1")).to_have_text("online")
            assert watched.problems == []
        finally:
            context.close()
    finally:
        agent.kill()
        meter.terminate()
        meter.wait(5)
    assert tech.actions <= MOST_ACTIONS
    assert machine <= 60, f"the walkthrough took {machine:.1f} s of machine time"
    reading = next(e for e in sub.snapshot() if e["type"] == "city.meter.reading")
    assert {m["quantity"] for m in reading["data"]["measurements"]} >= {"voltage", "frequency"}
    assert "sdm630-1" in config.read_text() and list(tmp_path.glob("site.yaml.*.bak"))
    print(f"page walkthrough: {tech.actions} actions, {machine:.1f} s machine time")
