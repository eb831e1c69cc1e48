"""Zones relative to the frame (``units: relative``): one drawing fits every resolution of a view.

The IoU test draws a zone on a 1280 x 720 frame, stores it as the editor does (4 decimals) and
rasterises it at 640 x 360 with cv2.fillPoly, against the same zone drawn in pixels at that size.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from drivers.camera.config import CameraConfig
from drivers.camera.driver import CameraDriver
from drivers.camera.frame import jpeg_within
from drivers.camera.rules import Polygon
from tests.drivers.camera.test_camera import LAWN_BAY, VAN_BAY, WALKWAY, Recorder, _load_only, camera
from tests.models.test_models import built_models, footage, frames  # noqa: F401 - session fixtures

# Drawn on a 1280 x 720 frame with sub-pixel taps, as a finger on a scaled canvas gives them.
DRAWN_1280 = [(402.7, 311.2), (611.9, 298.4), (705.3, 402.6), (655.1, 511.8), (430.6, 540.3), (371.4, 452.9)]


def relative(points: list[tuple[float, float]], width: int, height: int) -> list[list[float]]:
    return [[round(x / width, 4), round(y / height, 4)] for x, y in points]


def mask(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    out = np.zeros((height, width), np.uint8)
    cv2.fillPoly(out, [np.round(np.asarray(points)).astype(np.int32)], 1)
    return out.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_a_zone_drawn_at_1280x720_applies_at_640x360_with_iou_at_least_0_99() -> None:
    cfg = camera(
        "/tmp/x.avi", parking_bays=[{"id": "b1", "units": "relative", "polygon": relative(DRAWN_1280, 1280, 720)}]
    )
    bay = cfg.parking_bays[0]
    same_in_pixels = [(x / 2, y / 2) for x, y in DRAWN_1280]  # the zone a technician would draw at 640 x 360
    got = iou(mask(bay.pixels(640, 360), 640, 360), mask(same_in_pixels, 640, 360))
    assert got >= 0.99, got
    # and at the resolution it was drawn on, and in the driver's own rasterisation
    assert iou(mask(bay.pixels(1280, 720), 1280, 720), mask(DRAWN_1280, 1280, 720)) >= 0.99
    ours, theirs = Polygon(bay.pixels(640, 360)), Polygon(same_in_pixels)
    assert (ours.x0, ours.y0, ours.mask.shape) == (theirs.x0, theirs.y0, theirs.mask.shape)
    assert iou(ours.mask.astype(bool), theirs.mask.astype(bool)) >= 0.99


def test_pixel_zones_stay_as_written_and_units_is_explicit() -> None:
    cfg = camera("/tmp/x.avi")  # no units: pixels, as every older file
    assert [b.units for b in cfg.parking_bays] == ["pixels", "pixels"]
    assert cfg.parking_bays[0].pixels(1920, 1080) == [tuple(p) for p in VAN_BAY]
    # Values in 0..1 stay pixels unless the file says relative: never guessed from the numbers.
    tiny = camera("/tmp/x.avi", waiting_areas=[{"id": "w", "polygon": [[0, 0], [1, 0], [1, 1]]}])
    assert tiny.waiting_areas[0].pixels(640, 360) == [(0, 0), (1, 0), (1, 1)]
    rel = camera("/tmp/x.avi", waiting_areas=[{"id": "w", "units": "relative", "polygon": [[0, 0], [1, 0], [1, 1]]}])
    assert rel.waiting_areas[0].pixels(640, 360) == [(0, 0), (640, 0), (640, 360)]


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        (
            {"units": "relative", "polygon": [[0.1, 0.1], [0.5, 0.1], [1.2, 0.5]]},
            r"polygon: point 3 \[1.2, 0.5\] is outside 0..1",
        ),
        ({"units": "relative", "polygon": [[0.1, 0.1], [0.2, 0.2]]}, "polygon: a polygon needs at least 3 points"),
        ({"units": "relative", "polygon": [[i / 40, (i % 2) / 2] for i in range(33)]}, "polygon: at most 32 points"),
        ({"units": "pixels", "polygon": [[-1, 0], [5, 0], [5, 5]]}, "polygon: with units: pixels"),
        ({"units": "percent", "polygon": [[0, 0], [5, 0], [5, 5]]}, "'pixels' or 'relative'"),
    ],
)
def test_bad_zones_are_refused_naming_the_field(zone: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        CameraConfig.model_validate({"id": "cam", "driver": "camera", "source": "/tmp/x.avi",
                                     "parking_bays": [{"id": "b", **zone}]})  # fmt: skip
    assert caught.value.errors()[0]["loc"][:2] == ("parking_bays", 0)


def test_32_relative_points_and_many_pixel_points_are_fine() -> None:
    ring = [[0.5 + 0.4 * np.cos(a), 0.5 + 0.4 * np.sin(a)] for a in np.linspace(0, 6.2, 32)]
    assert len(camera("/tmp/x.avi", waiting_areas=[{"id": "w", "units": "relative", "polygon": ring}]).waiting_areas)
    old = [[100 + 50 * np.cos(a), 100 + 50 * np.sin(a)] for a in np.linspace(0, 6.2, 60)]  # an older file's
    assert len(camera("/tmp/x.avi", waiting_areas=[{"id": "w", "polygon": old}]).waiting_areas[0].polygon) == 60


def test_relative_zones_give_the_verdicts_of_the_same_zones_in_pixels(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
) -> None:
    w, h = 768, 576  # vtest.avi
    rel = {"parking_bays": [{"id": "van", "units": "relative", "polygon": relative(VAN_BAY, w, h), "debounce": "1s"},
                            {"id": "lawn", "units": "relative", "polygon": relative(LAWN_BAY, w, h), "debounce": "1s"}],
           "waiting_areas": [{"id": "walkway", "units": "relative", "polygon": relative(WALKWAY, w, h)}]}  # fmt: skip
    pixels = CameraDriver(camera("/tmp/x.avi", max_interval=0.001), Recorder())
    relative_ = CameraDriver(camera("/tmp/x.avi", max_interval=0.001, **rel), Recorder())
    asyncio.run(_load_only(pixels))
    asyncio.run(_load_only(relative_))
    for index, frame in sorted(frames.items())[:4]:
        pixels.analyse(frame)
        relative_.analyse(frame)
        got = {b.id: s.occupied for b, _, s in relative_._bays}
        assert got == {b.id: s.occupied for b, _, s in pixels._bays} == {"van": True, "lawn": False}, index
        assert relative_._counts == pixels._counts, index
    # The same relative zones follow the frame when the camera sends half the size.
    small = cv2.resize(frames[0], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    relative_.analyse(small)
    assert relative_._zone_size == (w // 2, h // 2)
    assert relative_._bays[0][1].points.max(axis=0).tolist() == pytest.approx([360, 50], abs=0.1)


def test_latest_jpeg_fits_the_budget_by_quality_then_size(frames: dict[int, np.ndarray]) -> None:  # noqa: F811
    frame = cv2.resize(frames[0], (1920, 1440))
    noisy = np.random.default_rng(1).integers(0, 256, frame.shape, dtype=np.uint8)  # JPEG's worst case
    for image, budget in ((frame, 200_000), (noisy, 200_000), (frame, 20_000)):
        data = jpeg_within(image, budget)
        assert len(data) <= budget and data[:2] == b"\xff\xd8"
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert cv2.imdecode(np.frombuffer(jpeg_within(frame, 10**7), np.uint8), cv2.IMREAD_COLOR).shape == frame.shape
    with pytest.raises(ValueError, match="does not fit in 100 bytes"):
        jpeg_within(noisy, 100)
