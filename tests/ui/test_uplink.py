"""The uplink check on the page of a real agent: ``POST /api/uplink/check`` and the "Check uplink"
button in a real browser (desktop and phone), the steps with their times, and a failing step's
cause and fix when the broker is down."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import AgentProcess, Mosquitto, wait_for
from tests.ui.site import HEADERS, signed_in, start_agent, write_site
from tests.ui.test_browser import VIEWPORTS, Watched

PASSWORD = "uplink-password-3c9d"  # noqa: S105 - the test's own
STEPS = ["DNS", "TCP", "TLS", "CONNACK", "publish"]


class Site:
    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        self.broker = broker
        self.config, port = write_site(folder, broker)
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{port}"
        self.client = signed_in(self.agent, port, PASSWORD, timeout=30)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("ui-uplink")
    broker = Mosquitto(folder)
    broker.start()
    running = Site(folder, broker)
    try:
        yield running
    finally:
        running.client.close()
        running.agent.kill()
        broker.stop()


def test_check_over_http_every_step_ok_and_logged(site: Site) -> None:
    r = site.client.post("/api/uplink/check")
    assert r.status_code == 200, r.text
    (uplink,) = r.json()["uplinks"]
    assert (uplink["name"], uplink["target"], uplink["ok"]) == ("mqtt", f"127.0.0.1:{site.broker.port}", True)
    statuses = [(s["name"], s["status"]) for s in uplink["steps"]]
    assert statuses == [("DNS", "ok"), ("TCP", "ok"), ("TLS", "skip"), ("CONNACK", "ok"), ("publish", "ok")]
    assert uplink["steps"][3]["detail"] == "Success (MQTT 3.1.1, user tech)"
    expected = f"ui: uplink check of mqtt (127.0.0.1:{site.broker.port}) by technician: ok"
    wait_for(lambda: expected in site.agent.output(), 5, "the log line")


def test_check_needs_a_session_and_the_page_header(site: Site) -> None:
    with httpx2.Client(base_url=site.url, timeout=5) as stranger:
        assert stranger.post("/api/uplink/check", headers=HEADERS).status_code == 401
        assert stranger.get("/api/uplink/check").status_code == 405
    assert site.client.post("/api/uplink/check", headers={"X-Edge-Agent": "0"}).status_code == 403


def _open(browser: Browser, site: Site, form: str) -> tuple[Any, Page, Watched]:
    context = browser.new_context(**VIEWPORTS[form])
    page = context.new_page()
    watched = Watched(page, site.url)
    page.goto(site.url + "/")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Check uplink")).to_be_visible()
    return context, page, watched


def _press(page: Page, form: str) -> None:
    button = page.get_by_role("button", name="Check uplink")
    button.tap() if form == "phone" else button.click()


@pytest.mark.parametrize("form", ["desktop", "phone"])
def test_browser_shows_each_step_and_a_failure_with_cause_and_fix(site: Site, browser: Browser, form: str) -> None:
    context, page, watched = _open(browser, site, form)
    try:
        _press(page, form)
        expect(page.get_by_test_id("uplink-verdict-mqtt")).to_have_text("ok")
        for name in STEPS:
            expect(page.get_by_test_id(f"step-status-mqtt-{name}")).to_have_text("skip" if name == "TLS" else "ok")
        expect(page.get_by_test_id("step-mqtt-publish")).to_contain_text("PUBACK for QoS 1 on ioc/v1/gw-ui/test")
        expect(page.get_by_test_id("step-mqtt-CONNACK")).to_contain_text(re.compile(r"\d+(\.\d)? ms"))

        site.broker.stop()
        try:
            _press(page, form)
            expect(page.get_by_test_id("uplink-verdict-mqtt")).to_have_text("failed")
            expect(page.get_by_test_id("step-status-mqtt-TCP")).to_have_text("fail")
            expect(page.get_by_test_id("step-cause-mqtt-TCP")).to_have_text(
                f"127.0.0.1 port {site.broker.port}: Connection refused"
            )
            expect(page.get_by_test_id("step-fix-mqtt-TCP")).to_contain_text("start the broker")
            expect(page.get_by_test_id("step-status-mqtt-publish")).to_have_text("skip")
        finally:
            site.broker.start()
        if form == "phone":
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert watched.problems == []
    finally:
        context.close()
