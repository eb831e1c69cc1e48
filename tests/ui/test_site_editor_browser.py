"""The site file editor in a real browser (Debian's chromium, desktop and phone) in front of a real agent.

A refused edit shows its file:line problem and says the running config is unchanged; a valid
edit shows its diff, applies, names the backup, and the new device appears on the dashboard; a
scan hit (the "edge:add-device" event the scan part dispatches) becomes a proposed text with its
diff, and Apply adds it. A console error, a failed request or another host fails the test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import AgentProcess, Mosquitto
from tests.ui.site import signed_in, start_agent, write_site
from tests.ui.test_browser import VIEWPORTS, Watched

PASSWORD = "browser-editor-9f21"  # noqa: S105 - the test's own


class Site:
    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        self.config, port = write_site(folder, broker)
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{port}/"
        signed_in(self.agent, port, PASSWORD).close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("ui-editor-browser")
    broker = Mosquitto(folder)
    broker.start()
    running = Site(folder, broker)
    try:
        yield running
    finally:
        running.agent.kill()
        broker.stop()


def _press(page: Page, name: str, touch: bool) -> None:
    button = page.get_by_role("button", name=name, exact=True)
    if touch:
        button.tap()
    else:
        button.click()


@pytest.mark.parametrize(("form", "unit"), [("desktop", 7), ("phone", 8)])
def test_refused_edit_then_valid_edit_then_a_scan_hit_applied(
    site: Site, browser: Browser, pty_port: str, form: str, unit: int
) -> None:
    touch = form == "phone"
    context = browser.new_context(**VIEWPORTS[form])
    page = context.new_page()
    watched = Watched(page, site.url.rstrip("/"))
    try:
        page.goto(site.url)
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        _press(page, "Log in", touch)
        editor = page.get_by_label("Site file text")
        text = site.config.read_text()
        expect(editor).to_have_value(text)
        expect(page.locator("#site-path")).to_have_text(str(site.config))

        bad = text.replace("interval: 200ms", "interval: soon", 1)
        line = 1 + next(i for i, x in enumerate(bad.splitlines()) if "soon" in x)
        editor.fill(bad)
        _press(page, "Validate", touch)
        problem = page.get_by_test_id("site-problem")
        expect(problem).to_have_text(f"{site.config}:{line}: devices[0].interval: invalid duration 'soon' "
                                     "(use e.g. 500ms, 1s, 5m)")  # fmt: skip
        _press(page, "Apply", touch)
        expect(page.get_by_test_id("site-result")).to_contain_text("Refused: the running config is unchanged")
        expect(problem).to_contain_text(f"{site.config}:{line}: devices[0].interval")
        assert site.config.read_text() == text

        device = f"meter-{form}"
        editor.fill(text + f"  - {{id: {device}, driver: virtual, kind: meter, interval: 200ms}}\n")
        _press(page, "Show diff", touch)
        expect(page.get_by_test_id("site-diff")).to_contain_text(f"+  - {{id: {device}, driver: virtual")
        _press(page, "Apply", touch)
        result = page.get_by_test_id("site-result")
        expect(result).to_contain_text("Applied (change ")
        expect(result).to_contain_text(f"+{device}.")
        expect(result).to_contain_text(re.compile(r"previous file is kept as site\.yaml\.\d{8}T\d{6}Z(-\d+)?\.bak"))
        expect(page.locator(f"[data-testid^='value-{device}-']").first).to_have_text(re.compile(r"\d"))
        expect(editor).to_have_value(site.config.read_text())  # reloaded: the next change starts from the file

        hit = {"port": pty_port, "unit": unit, "baud": 9600, "parity": "N", "stopbits": 1, "profile": "eastron-sdm630"}
        page.evaluate(f"window.dispatchEvent(new CustomEvent('edge:add-device', {{detail: {json.dumps(hit)}}}))")
        expect(result).to_contain_text(f"Proposed: sdm630-{unit} added")
        expect(page.get_by_test_id("site-diff")).to_contain_text(f"+  - id: sdm630-{unit}")
        expect(editor).to_have_value(re.compile(f"serial: {{port: {re.escape(pty_port)}, baudrate: 9600"))
        assert f"sdm630-{unit}" not in site.config.read_text()  # proposed only: Apply writes
        _press(page, "Apply", touch)
        expect(result).to_contain_text(f"+sdm630-{unit}.")
        expect(page.get_by_test_id(f"device-sdm630-{unit}")).to_be_visible()
        if touch:
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the phone layout scrolls sideways ({width} px)"
        assert watched.problems == []
    finally:
        context.close()
