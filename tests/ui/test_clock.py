"""Setting the clock from the page, against a fake systemd-timedated (python-dbusmock's template) on a
private system bus this module starts, behind a real agent (DBUS_SYSTEM_BUS_ADDRESS points at it).

HTTP: every refusal (synchronised, within 2 s, NTP on, timedated's own refusals, timedated absent),
bad input, and a set that reaches SetTime with the right time. Browser (desktop and phone): the offer
appears only when the clock is unsynchronised and more than 2 s off; pressing it sets the time.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from dbusmock import BusType, PrivateDBus, SpawnedMock
from playwright.sync_api import Browser, expect

from agent.ui.clock import SYNCED, read_state
from tests.conftest import AgentProcess, Mosquitto, wait_for
from tests.ui.site import HEADERS, signed_in, start_agent, write_site
from tests.ui.test_browser import VIEWPORTS, Watched

PASSWORD = "clock-password-5a1f"  # noqa: S105 - the test's own
TIMEDATED = "org.freedesktop.timedate1"
PROPERTIES = "org.freedesktop.DBus.Properties"
MOCK = "org.freedesktop.DBus.Mock"
HOUR_MS = 3_600_000


class Site:
    def __init__(self, folder: Path, broker: Mosquitto, mock: SpawnedMock) -> None:
        self.mock = mock
        self.config, port = write_site(folder, broker)
        self.agent: AgentProcess = start_agent(folder, self.config)  # inherits DBUS_SYSTEM_BUS_ADDRESS
        self.url = f"http://127.0.0.1:{port}"
        self.client = signed_in(self.agent, port, PASSWORD)

    def timedated(self, *, ntp: bool, synced: bool) -> None:
        self.mock.obj.Set(TIMEDATED, "NTP", ntp, dbus_interface=PROPERTIES)
        self.mock.obj.Set(TIMEDATED, "NTPSynchronized", synced, dbus_interface=PROPERTIES)

    def set_time_calls(self) -> list[tuple[int, bool, bool]]:
        calls = self.mock.obj.GetMethodCalls("SetTime", dbus_interface=MOCK)
        return [(int(args[0]), bool(args[1]), bool(args[2])) for _stamp, args in calls]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("ui-clock")
    before = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    bus = PrivateDBus(BusType.SYSTEM)  # sets DBUS_SYSTEM_BUS_ADDRESS in this process
    bus.start()
    broker = Mosquitto(folder)
    running: Site | None = None
    try:
        mock = SpawnedMock.spawn_with_template("timedated", {"NTP": False})
        broker.start()
        running = Site(folder, broker, mock)
        yield running
    finally:
        if running is not None:
            running.client.close()
            running.agent.kill()
        broker.stop()
        bus.stop()  # the mock ends with its bus
        if before is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = before


def _get(site: Site) -> dict[str, Any]:
    r = site.client.get("/api/clock")
    assert r.status_code == 200, r.text
    return r.json()


def _post(site: Site, offset_ms: float) -> httpx2.Response:
    return site.client.post("/api/clock", json={"browser_time_ms": time.time() * 1000 + offset_ms})


def test_an_unsynchronised_clock_an_hour_off_is_set_through_timedated(site: Site) -> None:
    site.timedated(ntp=False, synced=False)
    state = _get(site)
    assert (state["synchronised"], state["ntp"], state["timedated"], state["can_set"]) == (False, False, True, True)
    assert abs(state["server_time_ms"] - time.time() * 1000) < 2000 and state["threshold_s"] == 2
    before = len(site.set_time_calls())
    sent = time.time() * 1e6 + HOUR_MS * 1000
    r = _post(site, HOUR_MS)
    assert r.status_code == 200, r.text
    assert 3599 < r.json()["offset_s"] < 3601
    calls = site.set_time_calls()
    assert len(calls) == before + 1
    usec, relative, interactive = calls[-1]
    assert abs(usec - sent) < 1e6 and (relative, interactive) == (False, False), (usec - sent, calls[-1])
    line = wait_for(lambda: [x for x in site.agent.output().splitlines() if "ui: clock set by" in x], 5, "the log line")
    assert "ui: clock set by technician: " in line[-1] and line[-1].endswith(": ok"), line[-1]
    assert f"-> {r.json()['new']} (+3600." in line[-1]


@pytest.mark.parametrize(
    ("ntp", "synced", "offset_ms", "status", "words"),
    [
        (False, False, 1500, 409, "within 2 s of this browser's"),
        (False, False, -1500, 409, "within 2 s of this browser's"),
        (True, False, HOUR_MS, 409, "sudo timedatectl set-ntp false"),
        (True, True, HOUR_MS, 409, "the clock is synchronised to network time"),
        (False, True, HOUR_MS, 409, "the clock is synchronised to network time"),
    ],
)
def test_refusals_name_the_reason_and_never_reach_timedated(
    site: Site, ntp: bool, synced: bool, offset_ms: int, status: int, words: str
) -> None:
    site.timedated(ntp=ntp, synced=synced)
    before = len(site.set_time_calls())
    state = _get(site)
    assert state["can_set"] is (not ntp and not synced)
    if not state["can_set"]:
        assert words in state["reason"]
    r = _post(site, offset_ms)
    assert (r.status_code, words in r.json()["error"]) == (status, True), r.text
    assert len(site.set_time_calls()) == before
    assert "refused: " + r.json()["error"] in site.agent.output()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "browser_time_ms: a number"),
        ({"browser_time_ms": "2026-01-01"}, "browser_time_ms: a number"),
        ({"browser_time_ms": True}, "browser_time_ms: a number"),
        ({"browser_time_ms": 12}, "browser_time_ms: not between 2000 and 2100"),
    ],
)
def test_bad_input_names_the_field(site: Site, body: dict[str, Any], words: str) -> None:
    r = site.client.post("/api/clock", json=body)
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_session_and_page_header_are_required(site: Site) -> None:
    with httpx2.Client(base_url=site.url, timeout=5) as stranger:
        assert stranger.get("/api/clock").status_code == 401
        assert stranger.post("/api/clock", json={"browser_time_ms": 1}, headers=HEADERS).status_code == 401
    no_header = site.client.post("/api/clock", json={"browser_time_ms": 1}, headers={"X-Edge-Agent": "0"})
    assert no_header.status_code == 403


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        ("org.freedesktop.timedate1.AutomaticTimeSyncEnabled", 409, "sudo timedatectl set-ntp false"),
        ("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", 403, "50-edge-agent.rules"),
        ("org.freedesktop.timedate1.Busy", 502, "systemd-timedated refused: org.freedesktop.timedate1.Busy"),
    ],
)
def test_timedated_refusals_in_words(site: Site, error: str, status: int, words: str) -> None:
    site.timedated(ntp=False, synced=False)
    refuse = f"raise dbus.exceptions.DBusException('refused', name='{error}')"
    site.mock.obj.AddMethod(TIMEDATED, "SetTime", "xbb", "", refuse, dbus_interface=MOCK)
    try:
        r = _post(site, -HOUR_MS)
    finally:
        site.mock.obj.AddMethod(TIMEDATED, "SetTime", "xbb", "", "", dbus_interface=MOCK)
    assert (r.status_code, words in r.json()["error"]) == (status, True), r.text
    assert "failed: " + r.json()["error"] in site.agent.output()


def _login(browser: Browser, site: Site, form: str, browser_offset_ms: int) -> Any:
    context = browser.new_context(**VIEWPORTS[form])
    if browser_offset_ms:
        context.clock.install(time=(time.time() * 1000 + browser_offset_ms) / 1000)
    page = context.new_page()
    watched = Watched(page, site.url)
    page.goto(site.url + "/")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    return context, page, watched


def test_browser_no_offer_when_the_clocks_agree_or_the_gateway_is_synchronised(site: Site, browser: Browser) -> None:
    site.timedated(ntp=False, synced=False)
    context, page, watched = _login(browser, site, "desktop", 0)
    try:
        expect(page.locator("#ops")).to_have_attribute("data-clock", "none")
        expect(page.locator("#clock-offer")).to_be_hidden()
    finally:
        context.close()
    site.timedated(ntp=True, synced=True)
    context, page, watched_synced = _login(browser, site, "desktop", HOUR_MS)
    try:
        expect(page.locator("#ops")).to_have_attribute("data-clock", "none")
        expect(page.get_by_role("button", name="Set the gateway's clock")).to_be_hidden()
    finally:
        context.close()
    assert watched.problems == watched_synced.problems == []


def test_browser_offer_says_why_it_cannot_while_ntp_is_on(site: Site, browser: Browser) -> None:
    site.timedated(ntp=True, synced=False)
    context, page, watched = _login(browser, site, "desktop", -HOUR_MS)
    try:
        expect(page.locator("#ops")).to_have_attribute("data-clock", "offer")
        expect(page.get_by_test_id("clock-text")).to_contain_text("ahead of this device's")
        expect(page.get_by_test_id("clock-reason")).to_contain_text("sudo timedatectl set-ntp false")
        expect(page.get_by_role("button", name="Set the gateway's clock")).to_be_hidden()
        assert watched.problems == []
    finally:
        context.close()


@pytest.mark.parametrize("form", ["desktop", "phone"])
def test_browser_sets_the_clock_to_its_own_time(site: Site, browser: Browser, form: str) -> None:
    site.timedated(ntp=False, synced=False)
    context, page, watched = _login(browser, site, form, HOUR_MS)
    try:
        expect(page.locator("#ops")).to_have_attribute("data-clock", "offer")
        expect(page.get_by_test_id("clock-text")).to_contain_text("behind this device's")
        before = len(site.set_time_calls())
        button = page.get_by_role("button", name="Set the gateway's clock")
        pressed = time.time() * 1e6 + HOUR_MS * 1000
        button.tap() if form == "phone" else button.click()
        expect(page.get_by_test_id("clock-result")).to_contain_text("Clock set: ")
        calls = site.set_time_calls()
        assert len(calls) == before + 1
        assert abs(calls[-1][0] - pressed) < 3e6, (calls[-1][0] - pressed) / 1e6
        if form == "phone":
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert watched.problems == []
    finally:
        context.close()


def test_without_timedated_the_page_says_so(site: Site) -> None:
    """Last: it ends the fake timedated."""
    site.mock.terminate()
    wait_for(lambda: not _get(site)["timedated"], 10, "timedated to be gone")
    state = _get(site)
    assert state["can_set"] is False and "systemd-timedated is not reachable" in state["reason"]
    r = _post(site, HOUR_MS)
    if state["synchronised"]:  # without timedated, the kernel's word: this machine's own clock
        assert r.status_code == 409 and "synchronised" in r.json()["error"]
    else:
        assert r.status_code == 503 and "sudo timedatectl set-time" in r.json()["error"], r.text


def test_without_a_system_bus_the_reason_names_its_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"unix:path={tmp_path / 'no-bus'}"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    state = read_state(1.0)
    assert (state.timedated, state.ntp) == (False, None)
    assert state.how == f"the system bus {address}: No such file or directory"
    refusal = state.refusal()
    assert refusal is not None
    if state.synchronised:  # the kernel's word, without timedated: this machine's own clock
        assert refusal == (409, SYNCED)
    else:
        assert refusal[0] == 503 and f"systemd-timedated is not reachable ({state.how})" in refusal[1]


def test_a_bus_that_never_answers_is_given_up_on_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent-bus"))
    silent.listen(1)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'silent-bus'}")
    started = time.monotonic()
    with silent:
        state = read_state(0.5)
    assert time.monotonic() - started < 2
    assert state.timedated is False and "Did not authenticate in 0.5 seconds" in state.how, state.how
