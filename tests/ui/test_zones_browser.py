"""The zone editor in a real browser (Debian's chromium via Playwright), desktop and a phone with touch.

Log in, load the running camera's frame (vtest.avi through the real driver), tap N corners on it
(on desktop also Undo a stray one and drag one to another place), name the zone, save (the check
shows the diff), apply, and read the site file: the zone holds exactly the tapped points as
relative coordinates, within 1e-4 of where the taps landed on the frame. A console error, a failed
request or any other host fails the test, as in test_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.models.test_models import built_models, footage  # noqa: F401 - session fixtures
from tests.ui.test_browser import VIEWPORTS, Watched
from tests.ui.zones_site import PASSWORD, ZoneSite

pytestmark = pytest.mark.timeout(180)
# Where to tap, as fractions of the frame: a 5-corner zone on desktop, a 4-corner one on the phone.
TAPS = {
    "desktop": [(0.12, 0.15), (0.43, 0.11), (0.61, 0.37), (0.38, 0.72), (0.09, 0.52)],
    "phone": [(0.55, 0.2), (0.9, 0.22), (0.86, 0.6), (0.52, 0.55)],
}


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
) -> Iterator[ZoneSite]:
    running = ZoneSite(tmp_path_factory.mktemp("ui-zones-browser"), footage["vtest.avi"])
    try:
        yield running
    finally:
        running.stop()


def _press(page: Page, name: str, touch: bool) -> None:
    button = page.get_by_role("button", name=name, exact=True)
    if touch:
        button.tap()
    else:
        button.click()


@pytest.mark.parametrize("form", ["desktop", "phone"])
def test_tapped_corners_are_saved_exactly_as_relative_points(site: ZoneSite, browser: Browser, form: str) -> None:
    touch = form == "phone"
    context = browser.new_context(**VIEWPORTS[form])
    page = context.new_page()
    watched = Watched(page, site.url)
    try:
        page.goto(site.url + "/")
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        _press(page, "Log in", touch)
        expect(page.locator("#zones")).to_be_visible()
        page.get_by_label("Camera").select_option("cam-1")
        with site.client() as c:  # the desktop run's apply restarted the camera: its first frame comes first
            site.first_frame(c)
        _press(page, "Load frame", touch)
        expect(page.locator("#zones-status")).to_have_text(re.compile(r"Frame of cam-1: 768 x 576"))
        expect(page.get_by_test_id("zone-lawn")).to_contain_text("lawn · parking bay · 4 corners")
        canvas = page.locator("#zones-canvas")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        assert box is not None and box["width"] > 300
        expected = []
        for fx, fy in TAPS[form]:
            # Whole CSS pixels, as a finger or a mouse gives them; the expectation is where they landed.
            x, y = round(box["x"] + fx * box["width"]), round(box["y"] + fy * box["height"])
            if touch:
                page.touchscreen.tap(x, y)
            else:
                page.mouse.click(x, y)
            expected.append(((x - box["x"]) / box["width"], (y - box["y"]) / box["height"]))
        expect(page.locator("#zones-count")).to_have_text(f"{len(expected)} of 32 corners")
        if not touch:
            # A stray corner taken back with Undo, then the second corner dragged somewhere else.
            page.mouse.click(round(box["x"] + 0.8 * box["width"]), round(box["y"] + 0.9 * box["height"]))
            expect(page.locator("#zones-count")).to_have_text(f"{len(expected) + 1} of 32 corners")
            _press(page, "Undo", touch)
            expect(page.locator("#zones-count")).to_have_text(f"{len(expected)} of 32 corners")
            canvas.scroll_into_view_if_needed()  # pressing Undo may have scrolled the page
            box = canvas.bounding_box()
            assert box is not None
            (fx, fy), (tx, ty) = expected[1], (0.47, 0.2)
            page.mouse.move(box["x"] + fx * box["width"] + 5, box["y"] + fy * box["height"] - 4)  # near: grabs it
            page.mouse.down()
            x, y = round(box["x"] + tx * box["width"]), round(box["y"] + ty * box["height"])
            page.mouse.move(x, y, steps=5)
            page.mouse.up()
            expected[1] = ((x - box["x"]) / box["width"], (y - box["y"]) / box["height"])
            expect(page.locator("#zones-count")).to_have_text(f"{len(expected)} of 32 corners")
        assert canvas.bounding_box() == box  # nothing moved under the taps
        name = f"bay-{form}"
        page.get_by_label("Zone name").fill(name)
        page.get_by_label("Kind").select_option("bay")
        _press(page, "Save zones", touch)
        expect(page.get_by_test_id("zones-diff")).to_contain_text(f"{{id: {name}, units: relative")
        _press(page, "Apply zones", touch)
        expect(page.locator("#zones-status")).to_contain_text("Applied (change")

        saved = {z["id"]: z for z in site.device("cam-1")["parking_bays"]}
        assert saved[name]["units"] == "relative" and len(saved[name]["polygon"]) == len(expected)
        for (sx, sy), (ex, ey) in zip(saved[name]["polygon"], expected, strict=True):
            assert abs(sx - ex) <= 1e-4 and abs(sy - ey) <= 1e-4, (saved[name]["polygon"], expected)
        assert "lawn" in saved  # the zone that was there is kept (now relative)
        if touch:
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the phone layout scrolls sideways ({width} px)"
        assert watched.problems == []
    finally:
        context.close()
