"""The zone editor's HTTP side, against a real agent running real cameras (vtest.avi looped, real detector).

The frame: a JPEG of at most 200 KB from the running driver, one a second per session (429 with
Retry-After beyond), 404 for an unknown or non-camera device, 503 with a reason before any frame.
Saving: checked (diff, problems) without touching the file, then applied through the site editor:
only that camera's zones change in the text, a backup is kept, and the reloaded camera publishes
occupancy for the new zone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.conftest import Subscriber, wait_for
from tests.drivers.camera.test_camera import VAN_BAY
from tests.models.test_models import built_models, footage  # noqa: F401 - session fixtures
from tests.ui.zones_site import FRAME, LAWN, ZoneSite

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
) -> Iterator[ZoneSite]:
    running = ZoneSite(tmp_path_factory.mktemp("ui-zones"), footage["vtest.avi"])
    try:
        yield running
    finally:
        running.stop()


def test_the_frame_is_a_small_jpeg_from_the_running_camera_at_most_once_a_second(site: ZoneSite) -> None:
    with site.client() as c, site.client() as other:
        r = site.first_frame(c)
        assert r.headers["content-type"] == "image/jpeg" and r.headers["cache-control"] == "no-store"
        assert 1000 < len(r.content) <= 200_000
        image = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and (image.shape[1], image.shape[0]) == FRAME
        assert (int(r.headers["x-frame-width"]), int(r.headers["x-frame-height"])) == FRAME
        again = c.get("/api/camera/cam-1/frame")
        assert again.status_code == 429 and again.headers["retry-after"] == "1", again.text
        assert "one frame a second" in again.json()["error"]
        assert other.get("/api/camera/cam-1/frame").status_code == 200  # per session, not per page
        time.sleep(1.0)
        assert c.get("/api/camera/cam-1/frame").status_code == 200
    shown = "ui: camera cam-1: the latest frame shown to technician (zone editor; not blurred, not stored)"
    assert site.agent.output().count(shown) == 2  # once per session, however many frames it asked for


def test_unknown_and_non_camera_devices_are_404_a_camera_without_a_frame_503(site: ZoneSite) -> None:
    with site.client() as c:
        for device in ("cam-nope", "meter-1"):
            r = c.get(f"/api/camera/{device}/frame")
            assert r.status_code == 404 and f"no camera '{device}'" in r.json()["error"]
        r = c.get("/api/camera/cam-dark/frame")
        assert r.status_code == 503 and "cam-dark has no frame yet" in r.json()["error"]
        listed = {cam["id"]: cam["zones"] for cam in c.get("/api/zones").json()["cameras"]}
        assert listed == {
            "cam-1": [{"id": "lawn", "kind": "bay", "units": "pixels", "polygon": LAWN}],
            "cam-dark": [{"id": "kerb", "kind": "area", "units": "pixels", "polygon": LAWN}],
        }
        c.cookies.clear()
        assert c.get("/api/camera/cam-1/frame").status_code == 401
        assert c.get("/api/zones").status_code == 401


def test_bad_zones_are_refused_naming_the_field(site: ZoneSite) -> None:
    before = site.config.read_text()
    ok = [[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]
    with site.client() as c:
        for zones, message in [
            ([{"id": "a", "kind": "bay", "polygon": ok[:2]}], "zones[0].polygon: 3 to 32 points"),
            ([{"id": "a", "kind": "bay", "polygon": [*ok[:2], [1.5, 0.2]]}], "zones[0].polygon: every point"),
            ([{"id": "a", "kind": "bay", "polygon": ok}, {"id": "b", "kind": "lane", "polygon": ok}], "zones[1].kind"),
            ([{"id": "", "kind": "bay", "polygon": ok}], "zones[0].id"),
        ]:
            r = c.post("/api/camera/cam-1/zones", json={"zones": zones})
            assert r.status_code == 400 and message in r.json()["error"], r.text
        twice = [{"id": "a", "kind": "bay", "polygon": ok}, {"id": "a", "kind": "area", "polygon": ok}]
        r = c.post("/api/camera/cam-1/zones", json={"zones": twice})
        assert r.status_code == 200 and any("used twice" in p for p in r.json()["problems"]), r.text
        r = c.post("/api/camera/cam-1/zones", json={"zones": [], "apply": True, "base": r.json()["base"]})
        assert r.status_code == 422 and r.json()["outcome"] == "refused"
        assert any("at least one zone" in p and "site.yaml:" in p for p in r.json()["problems"]), r.text
        assert c.post("/api/camera/meter-1/zones", json={"zones": []}).status_code == 404
    assert site.config.read_text() == before


def test_save_checks_then_applies_and_the_reloaded_camera_uses_the_new_zone(site: ZoneSite) -> None:
    van = [[round(x / FRAME[0], 4), round(y / FRAME[1], 4)] for x, y in VAN_BAY]
    lawn = [[round(x / FRAME[0], 4), round(y / FRAME[1], 4)] for x, y in LAWN]
    zones = [{"id": "lawn", "kind": "bay", "polygon": lawn}, {"id": "van-new", "kind": "bay", "polygon": van}]
    before = site.config.read_text()
    sub = Subscriber(site.broker.port, "ioc/v1/#")
    try:
        with site.client() as c:
            check = c.post("/api/camera/cam-1/zones", json={"zones": zones})
            assert check.status_code == 200 and check.json()["problems"] == [], check.text
            assert "+      - {id: van-new, units: relative" in check.json()["diff"]
            assert site.config.read_text() == before  # a check writes nothing
            r = c.post("/api/camera/cam-1/zones", json={"zones": zones, "apply": True, "base": check.json()["base"]})
            assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
            assert r.json()["changes"] == ["-cam-1", "+cam-1"]
            assert Path(r.json()["backup"]).read_text() == before
            stale = c.post(
                "/api/camera/cam-1/zones", json={"zones": zones, "apply": True, "base": check.json()["base"]}
            )
            assert stale.status_code == 409 and stale.json()["outcome"] == "conflict"
        after = site.config.read_text()
        cam = site.device("cam-1")
        assert cam["parking_bays"] == [
            {"id": "lawn", "units": "relative", "polygon": lawn, "debounce": "1s"},  # its own debounce kept
            {"id": "van-new", "units": "relative", "polygon": van},
        ]
        changed = {i for i, (a, b) in enumerate(zip(before.splitlines(), after.splitlines(), strict=False)) if a != b}
        assert len(after.splitlines()) == len(before.splitlines()) + 1 and min(changed) > 0
        assert (
            "# zones test site: this comment stays" in after
            and "report_interval: 1m  # after the zones: stays" in after
        )
        old_devices = {d["id"]: d for d in yaml.safe_load(before)["devices"]}
        assert site.device("cam-dark") == old_devices["cam-dark"] and site.device("meter-1") == old_devices["meter-1"]

        def occupied() -> bool:
            return any(e["device"] == "cam-1" and e["type"] == "city.parking.occupancy"
                       and e["data"]["bay"] == "van-new" and e["data"]["occupied"] for e in sub.snapshot())  # fmt: skip

        wait_for(occupied, 60, "the reloaded camera to publish the new bay as occupied (the parked van)")
        lawn_states = [e["data"]["occupied"] for e in sub.snapshot()
                       if e["type"] == "city.parking.occupancy" and e["data"]["bay"] == "lawn"]  # fmt: skip
        assert True not in lawn_states  # grass: the relative lawn bay still sees no vehicle
    finally:
        sub.close()
