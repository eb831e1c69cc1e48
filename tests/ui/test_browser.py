"""The page in a real browser (Debian's chromium driven by Playwright), in front of a real agent.

Desktop 1280x800 and a phone 390x844 with touch: set up with a token, set the password, see a
virtual meter's value change live and a Modbus meter's missing port with its cause and fix.
A console error, a failed request or a request to any other host fails the test. Only locator
assertions wait (the page's CSP forbids the string evaluation wait_for_function would need).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from agent.tools.cli import main
from tests.conftest import AgentProcess, Mosquitto
from tests.ui.site import MISSING_PORT, start_agent, wait_listening, write_site

VIEWPORTS = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {
        "viewport": {"width": 390, "height": 844},
        "has_touch": True,
        "is_mobile": True,
        "device_scale_factor": 3,
    },
}


class Site:
    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        self.config, port = write_site(folder, broker)
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{port}/"
        wait_listening(port)

    def token(self, capsys: pytest.CaptureFixture[str]) -> str:
        capsys.readouterr()
        assert main(["ui", "token", "--no-qr", "-c", str(self.config)]) == 0
        return capsys.readouterr().out.split("setup token: ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("ui-browser")
    broker = Mosquitto(folder)
    broker.start()
    running = Site(folder, broker)
    try:
        yield running
    finally:
        running.agent.kill()
        broker.stop()


class Watched:
    """What the page did wrong: console errors, uncaught exceptions, failed requests, other hosts."""

    def __init__(self, page: Page, origin: str) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(f"exception: {e}"))
        page.on("requestfailed", self._failed)
        page.on("request", lambda r: None if r.url.startswith((origin, "data:")) else self.problems.append(r.url))
        page.on("response", lambda r: self.problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def _failed(self, request: Any) -> None:
        # The live stream is cut when the page goes away: that is not the page's fault.
        if not request.url.endswith("/api/events"):
            self.problems.append(f"failed: {request.url} {request.failure}")


def _press(page: Page, name: str, touch: bool) -> None:
    button = page.get_by_role("button", name=name)
    if touch:
        button.tap()
    else:
        button.click()


@pytest.mark.parametrize("form", ["desktop", "phone"])
def test_setup_password_live_value_and_a_fault(
    site: Site, browser: Browser, form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    touch = form == "phone"
    context = browser.new_context(**VIEWPORTS[form])
    page = context.new_page()
    watched = Watched(page, site.url.rstrip("/"))
    try:
        page.goto(f"{site.url}#setup={site.token(capsys)}")
        expect(page.get_by_role("heading", name="Set the device password")).to_be_visible()
        expect(page).to_have_url(site.url)  # the token left the address bar
        page.get_by_label("New password").fill(f"{form}-password-1234")
        _press(page, "Save password", touch)

        value = page.locator("[data-testid^='value-meter-1-']").first
        expect(value).to_have_text(re.compile(r"\d"))
        first = value.text_content()
        expect(value).not_to_have_text(first or "", timeout=5000)  # the virtual meter's next reading
        expect(page.locator("[data-testid^='age-meter-1-']").first).to_have_text(re.compile(r"s ago$"))

        expect(page.get_by_test_id("status-meter-2")).to_have_text(re.compile("offline|starting|failed"))
        expect(page.get_by_test_id("cause-meter-2")).to_have_text(f"the port {MISSING_PORT} does not exist")
        expect(page.get_by_test_id("fix-meter-2")).to_contain_text("/dev/serial/by-id")
        expect(page.get_by_test_id("uplink-mqtt")).to_have_text("mqtt: connected")
        expect(page.locator("#disk-free")).to_have_text(re.compile(r"\d+(\.\d)? [KMGT]?B"))
        page.get_by_label("Device").select_option("meter-1")
        _press(page, "Show the event", touch)
        expect(page.get_by_test_id("verdict-city.meter.reading")).to_have_text("valid")
        expect(page.get_by_test_id("preview-city.meter.reading")).to_contain_text(
            '"source": "/gateways/gw-ui/devices/meter-1"'
        )
        if touch:
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the phone layout scrolls sideways ({width} px)"

        _press(page, "Log out", touch)
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        page.get_by_label("Password", exact=True).fill(f"{form}-password-1234")
        _press(page, "Log in", touch)
        expect(page.get_by_test_id("cause-meter-2")).to_be_visible()
        assert watched.problems == []
    finally:
        context.close()


def test_the_diagnostics_bundle_downloads_redacted_from_the_page(
    site: Site, browser: Browser, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import tarfile

    from tests.ui.site import MQTT_SECRET

    context = browser.new_context(accept_downloads=True, **VIEWPORTS["desktop"])
    page = context.new_page()
    watched = Watched(page, site.url.rstrip("/"))
    try:
        page.goto(f"{site.url}#setup={site.token(capsys)}")
        page.get_by_label("New password").fill("bundle-password-1234")
        _press(page, "Save password", False)
        link = page.get_by_role("link", name="Download diagnostics bundle")
        with page.expect_download(timeout=20000) as info:
            link.click()
        saved = tmp_path / info.value.suggested_filename
        info.value.save_as(saved)
        assert saved.name.endswith(".tar.gz") and 0 < saved.stat().st_size <= 5 * 1024 * 1024
        with tarfile.open(saved) as bundle:
            names = bundle.getnames()
            text = b"".join(f.read() for m in bundle.getmembers() if (f := bundle.extractfile(m)) is not None)
        assert any("config" in n for n in names) and any("metrics" in n for n in names), names
        assert MQTT_SECRET.encode() not in text  # planted in the password file the config names
        assert watched.problems == []
    finally:
        context.close()
