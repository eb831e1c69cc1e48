"""The camera driver on real footage with the real detector (onnxruntime, one thread).

Footage and models come from the fixtures of tests/models/test_models.py (opencv-doc's vtest.avi,
the built YOLOv3-tiny). Zones are drawn on vtest.avi (768 x 576) after looking at its frames:
the white van parks top right in every frame; the lower-left lawn never has a vehicle; the
paved walkway crossing the frame is the waiting area.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from agent.contract.events import CROSSWALK_PRESENCE, PARKING_OCCUPANCY, Reading
from agent.contract.schemas import EVENT_MODELS
from agent.devices.api import DriverContext
from agent.errors import DriverStartupError
from drivers.camera import PLUGIN
from drivers.camera.config import MODELS, CameraConfig
from drivers.camera.driver import CameraDriver
from drivers.camera.tools import render_main
from tests.models.test_models import PERSONS, built_models, footage, frames  # noqa: F401 - session fixtures

pytestmark = pytest.mark.timeout(300)

VAN_BAY = [[650, 60], [720, 60], [720, 100], [650, 100]]  # under the parked white van
LAWN_BAY = [[50, 380], [250, 380], [250, 480], [50, 480]]  # grass: never a vehicle
WALKWAY = [[0, 200], [400, 195], [768, 230], [768, 420], [0, 320]]
# Persons whose feet are on the walkway, counted by eye on the saved frames (the labelled
# persons of tests/models/test_models.py, feet checked against the polygon drawn on each frame).
WALKWAY_COUNTS = {0: 3, 100: 6, 200: 5, 300: 6, 400: 2, 500: 4, 600: 4, 700: 6}


class Recorder(DriverContext):
    """The runtime's side: outcomes and inference timings, in order."""

    def __init__(self, device_id: str = "cam") -> None:
        self.device_id = device_id
        self.outcomes: list[str] = []
        self.inferences: list[tuple[str, float]] = []

    def poll_ok(self) -> None:
        self.outcomes.append("ok")

    def poll_failed(self, reason: str) -> None:
        self.outcomes.append(reason)

    def observe_inference(self, model: str, seconds: float) -> None:
        self.inferences.append((model, seconds))


def camera(source: Path | str, **keys: Any) -> CameraConfig:
    base: dict[str, Any] = {"id": "cam", "driver": "camera", "source": str(source), "threads": 1,
                            "parking_bays": [{"id": "van", "polygon": VAN_BAY, "debounce": "1s"},
                                             {"id": "lawn", "polygon": LAWN_BAY, "debounce": "1s"}],
                            "waiting_areas": [{"id": "walkway", "polygon": WALKWAY}],
                            "reconnect_min": "200ms", "reconnect_max": "1s"}  # fmt: skip
    return CameraConfig.model_validate({**base, **keys})


async def run_driver(driver: CameraDriver, seconds: float, during: Callable[[], Any] | None = None) -> list[Reading]:
    """Start, stream for ``seconds`` (running ``during`` concurrently), stop; the readings."""
    readings: list[Reading] = []
    await driver.start()

    async def consume() -> None:
        async for batch in driver.stream():
            readings.extend(batch)

    task = asyncio.create_task(consume())
    try:
        if during is not None:
            await asyncio.wait_for(during(), seconds)
        else:
            await asyncio.sleep(seconds)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await driver.stop()
    return readings


def write_clip(path: Path, frames_: list[np.ndarray], fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (768, 576))
    for f in frames_:
        writer.write(f)
    writer.release()
    return path


def assert_private(readings: list[Reading]) -> None:
    """Nothing image-like: no bytes, no long strings, nothing base64- or JPEG/PNG-like."""

    def walk(value: Any) -> None:
        assert not isinstance(value, bytes | bytearray | memoryview | np.ndarray), type(value)
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            assert len(value) <= 512, value[:80]
            assert "/9j/" not in value and "iVBOR" not in value and "data:image" not in value
            if len(value) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value):
                try:
                    base64.b64decode(value, validate=True)
                except binascii.Error:
                    pass
                else:
                    raise AssertionError(f"base64-like payload: {value[:60]}")

    assert readings
    for r in readings:
        walk(r.data)
        EVENT_MODELS[r.type].model_validate(r.data)


# ---- config -------------------------------------------------------------------------------


def test_config_validation() -> None:
    cfg = camera("/tmp/x.avi")
    assert cfg.fps == 2 and cfg.max_interval == 10 and cfg.report_interval == 60
    assert cfg.parking_bays[0].min_overlap == 0.3 and cfg.labels.vehicles == ["car", "truck", "bus", "motorbike"]
    assert cfg.model == "yolov3-tiny-coco.yaml"  # a name, resolved among the built models
    assert cfg.model_manifests() == [str(MODELS / "yolov3-tiny-coco.yaml")] and (MODELS / cfg.model).is_file()
    assert camera("/dev/video0").device_paths() == ["/dev/video0"]
    assert PLUGIN.name == "camera" and PLUGIN.config_model is CameraConfig
    bad = [
        ({"parking_bays": [{"id": "a", "polygon": [[0, 0], [1, 1]]}]}, "at least 3 points"),
        ({"waiting_areas": [{"id": "van", "polygon": WALKWAY}]}, "used twice"),
        ({"parking_bays": [], "waiting_areas": []}, "at least one zone"),
        ({"fps": 0}, "greater than 0"),
        ({"colour": "red"}, "Extra inputs"),
    ]
    for keys, message in bad:
        with pytest.raises(ValidationError, match=message):
            camera("/tmp/x.avi", **keys)


# ---- model integrity ------------------------------------------------------------------------


def test_a_tampered_model_is_refused(built_models: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    manifest = built_models["yolov3-tiny-coco"]
    data = yaml.safe_load(manifest.read_text())
    model = bytearray((manifest.parent / data["file"]).read_bytes())
    model[len(model) // 2] ^= 0xFF
    (tmp_path / data["file"]).write_bytes(bytes(model))
    (tmp_path / manifest.name).write_text(manifest.read_text())
    driver = CameraDriver(camera("/tmp/x.avi", model=str(tmp_path / manifest.name)), Recorder())
    with pytest.raises(DriverStartupError, match="sha256") as info:
        asyncio.run(driver.start())
    assert info.value.retry is False
    assert driver.capture is None  # nothing started


# ---- rules on real frames -------------------------------------------------------------------


def test_bays_and_walkway_counts_on_hand_checked_frames(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
) -> None:
    driver = CameraDriver(camera("/tmp/x.avi", max_interval=0.001), Recorder())
    asyncio.run(_load_only(driver))
    misses = []
    for index, frame in sorted(frames.items()):
        driver.analyse(frame)
        bays = {b.id: s.occupied for b, _, s in driver._bays}
        assert bays == {"van": True, "lawn": False}, index
        count = driver._counts["walkway"]
        assert count is not None
        if abs(count - WALKWAY_COUNTS[index]) > 1:
            misses.append((index, count, WALKWAY_COUNTS[index]))
    assert not misses, misses
    assert set(WALKWAY_COUNTS) == set(PERSONS)


async def _load_only(driver: CameraDriver) -> None:
    """start() without the capture thread: load and verify the model only."""
    await driver.start()
    assert driver.capture is not None
    driver.capture.stop()


# ---- the driver streaming real footage --------------------------------------------------------


def test_vtest_run_publishes_bays_presence_and_nothing_image_like(
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
) -> None:
    ctx = Recorder()
    driver = CameraDriver(camera(footage["vtest.avi"], fps=2, report_interval="3s"), ctx)
    readings = asyncio.run(run_driver(driver, 7.0))
    bays = [r.data for r in readings if r.type == PARKING_OCCUPANCY]
    assert {b["bay"]: b["occupied"] for b in bays} == {"van": True, "lawn": False}
    assert sum(1 for b in bays if b["bay"] == "van") >= 2  # first state + at least one periodic report
    presence = [r.data for r in readings if r.type == CROSSWALK_PRESENCE]
    assert presence and all(p["area"] == "walkway" and p["max_count"] >= p["count"] for p in presence)
    assert ctx.outcomes and ctx.outcomes[0] == "ok"
    assert ctx.inferences and all(m == "yolov3-tiny-coco" for m, _ in ctx.inferences)
    stats = driver.stats
    assert stats["analysed"] >= 10 and stats["detector_ms_p50"] > 0 and stats["frames_dropped"] > 0
    assert_private(readings)


def test_motion_gating_skips_a_still_scene_and_rechecks_at_max_interval(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
    tmp_path: Path,
) -> None:
    still = write_clip(tmp_path / "still.avi", [frames[0]] * 20)
    driver = CameraDriver(camera(still, fps=4, max_interval="2s"), Recorder())
    readings = asyncio.run(run_driver(driver, 7.0))
    s = driver.stats
    # One run on the first frame, then one per max_interval: 1 + 7 / 2.
    assert 3 <= s["detector_runs"] <= 5, s
    assert s["analysed"] >= 20 and s["gated_fraction"] >= 0.75, s
    assert {r.data["bay"]: r.data["occupied"] for r in readings if r.type == PARKING_OCCUPANCY}["van"] is True


def test_a_lost_file_goes_offline_and_comes_back(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
    tmp_path: Path,
) -> None:
    clip = write_clip(tmp_path / "clip.avi", [frames[i] for i in sorted(frames)])  # 0.8 s at 10 fps, looped
    ctx = Recorder()
    driver = CameraDriver(camera(clip, fps=2), ctx)

    async def during() -> None:
        await _until(lambda: "ok" in ctx.outcomes)
        clip.rename(tmp_path / "away.avi")
        await _until(lambda: any("does not exist" in o for o in ctx.outcomes))
        failures = sum(1 for o in ctx.outcomes if o != "ok")
        (tmp_path / "away.avi").rename(clip)
        await _until(lambda: ctx.outcomes[-1] == "ok" and failures <= sum(1 for o in ctx.outcomes if o != "ok"))

    asyncio.run(run_driver(driver, 20.0, during))
    first_fail = next(i for i, o in enumerate(ctx.outcomes) if o != "ok")
    assert "ok" in ctx.outcomes[first_fail:], ctx.outcomes
    assert driver.stats["reopens"] >= 1


async def _until(predicate: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_slow_detector_keeps_only_the_latest_frame(
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
) -> None:
    driver = CameraDriver(camera(footage["vtest.avi"], fps=5, max_interval=0.001), Recorder())
    backlog: list[int] = []

    class Slow:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def detect(self, frame: np.ndarray) -> Any:
            backlog.append(driver.slot.backlog())
            time.sleep(0.6)  # a detector far slower than the 10 fps source and the 5 fps target
            return self.inner.detect(frame)

    async def during() -> None:
        await _until(lambda: driver.detector is not None)
        driver.detector = Slow(driver.detector)
        await asyncio.sleep(5.0)

    asyncio.run(run_driver(driver, 8.0, during))
    s = driver.stats
    assert max(backlog) <= 1  # one slot, never a queue
    assert s["frames_dropped"] >= 0.6 * s["frames_captured"], s  # most frames replaced unseen
    assert s["frame_age_ms_max"] < 400, s  # analysis always takes a fresh frame, not a stale one


# ---- technician tool ----------------------------------------------------------------------------


def test_render_writes_a_local_png(
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"devices": [camera(footage["vtest.avi"]).model_dump(mode="json")]}))
    out = tmp_path / "frame.png"
    assert render_main(["--zones", str(site), "--device", "cam", "--frame", "700", "--out", str(out)]) == 0
    image = cv2.imread(str(out))
    assert image is not None and image.shape == (576, 768, 3)
    assert "detections" in capsys.readouterr().out
    assert render_main(["--source", str(tmp_path / "missing.avi"), "--out", str(out)]) == 1


# ---- end to end (needs the entry point camera = "drivers.camera:PLUGIN") --------------------------


def test_agent_runs_a_camera_end_to_end(
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    broker: Any,
    subscriber_factory: Any,
    agent_factory: Any,
) -> None:
    from agent.devices.registry import load_plugins

    if "camera" not in load_plugins():
        pytest.fail("the camera entry point is not registered (pyproject: camera = 'drivers.camera:PLUGIN')")
    from tests.conftest import wait_for, write_config

    device = camera(footage["vtest.avi"], report_interval="2s").model_dump(mode="json")
    devices = "".join(f"  {line}\n" for line in yaml.safe_dump([device]).splitlines())
    cfg = write_config(tmp_path / "agent.yaml", port=broker.port, devices=devices)
    sub = subscriber_factory(broker.port, "ioc/v1/#")
    agent_factory(cfg)

    def seen() -> bool:
        types = {(e["device"], e["type"]) for e in sub.snapshot()}
        return ("cam", PARKING_OCCUPANCY) in types and ("cam", CROSSWALK_PRESENCE) in types

    wait_for(seen, 60, "occupancy and presence events from the camera")
    events = [e for e in sub.snapshot() if e["device"] == "cam"]
    assert {e["data"]["bay"]: e["data"]["occupied"] for e in events if e["type"] == PARKING_OCCUPANCY}["van"] is True
    assert_private([Reading(e["type"], e["data"]) for e in events if e["type"] != "city.device.status"])
