"""The bus tools in a real browser (Debian's chromium, Playwright), desktop and phone, against
``simulate modbus`` on a real pty behind a real agent: a scan shows the hit with its profile and
an "Add to site" button that hands the hit to the site editor; a typed read shows its table.
A console error, a failed request or another host fails the test (tests/ui/test_browser.py's watch).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.ui.bus_site import PASSWORD, UNIT, Bench, running_bench
from tests.ui.test_browser import VIEWPORTS, Watched

# Records what "Add to site" dispatches: an init script, as the page's CSP allows no script of the test's.
LISTEN = (
    "window.__added = [];"
    "window.addEventListener('edge:add-device', (e) => window.__added.push(JSON.stringify(e.detail)));"
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    with running_bench(tmp_path_factory.mktemp("ui-bus-browser")) as running:
        yield running


def _press(page: Page, target: str, touch: bool) -> None:
    button = page.locator(target)
    if touch:
        button.tap()
    else:
        button.click()


@pytest.mark.parametrize("form", ["desktop", "phone"])
def test_scan_shows_the_hit_with_its_profile_and_add_button_and_a_typed_read_its_table(
    bench: Bench, browser: Browser, form: str
) -> None:
    touch = form == "phone"
    context = browser.new_context(**VIEWPORTS[form])
    context.add_init_script(LISTEN)
    page = context.new_page()
    watched = Watched(page, bench.url)
    try:
        page.goto(bench.url + "/")
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        _press(page, "#login button[type=submit]", touch)
        expect(page.locator("#bus")).to_be_visible()
        expect(page.locator("#port-info")).to_contain_text("polled by meter-2")  # the configured, missing port

        page.locator("#scan-port").fill(bench.pty)
        page.locator("#scan-baud").select_option("9600")
        page.locator("#scan-parity").select_option("N")
        page.locator("#scan-units").fill(f"1-5,{UNIT}")
        page.locator("#scan-timeout").fill("0.5")
        _press(page, "#scan-start", touch)
        hit = page.get_by_test_id(f"hit-{UNIT}")
        expect(hit).to_be_visible(timeout=15000)
        expect(page.get_by_test_id(f"hit-profile-{UNIT}")).to_have_text("eastron-sdm630")
        expect(hit).to_contain_text("9600 8N1")
        expect(hit).to_contain_text("6 sampled registers plausible")
        expect(page.get_by_test_id("scan-progress")).to_have_text(re.compile(r"^Scan done: 6/6 probes, 1 found"))
        expect(page.locator("#scan-stop")).to_be_disabled()
        add = page.get_by_test_id(f"add-{UNIT}")
        expect(add).to_have_text("Add to site")
        _press(page, f"[data-testid=add-{UNIT}]", touch)
        added = page.evaluate("window.__added")
        assert added == [
            f'{{"port":"{bench.pty}","unit":{UNIT},"baud":9600,"parity":"N","stopbits":1,"profile":"eastron-sdm630"}}'
        ]

        page.locator("#read-port").fill(bench.pty)
        page.locator("#read-unit").fill(str(UNIT))
        page.locator("#read-table").select_option("input")
        page.locator("#read-address").fill("0")
        page.locator("#read-count").fill("4")
        _press(page, "#read-form button[type=submit]", touch)
        expect(page.get_by_test_id("read-registers")).to_be_visible()
        expect(page.get_by_test_id("reg-0")).to_contain_text("30001")
        expect(page.get_by_test_id("reg-3")).to_contain_text("30004")
        expect(page.get_by_test_id("reg-0").locator("td").nth(2)).to_have_text(re.compile(r"^[0-9a-f]{4}$"))
        for order in ("ABCD", "CDAB", "BADC", "DCBA"):
            expect(page.get_by_test_id(f"order-0-{order}")).to_be_visible()
        # The SDM630's phase voltage, big-endian: ABCD reads about 230 (V).
        expect(page.get_by_test_id("order-0-ABCD").locator("td").nth(2)).to_have_text(re.compile(r"^2[0-5]\d\."))
        expect(page.get_by_test_id("pair-2")).to_contain_text("PDU 2 (30003)")
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORTS[form]["viewport"]["width"]
        assert watched.problems == []
    finally:
        context.close()
