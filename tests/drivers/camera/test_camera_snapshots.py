"""Camera snapshots: blurred stills on real footage with the real detector and the real CenterFace.

Footage and models come from the session fixtures of tests/models/test_models.py (opencv-doc's
vtest.avi and messi5.jpg, the built YOLOv3-tiny and CenterFace); the camera config, the
recording context and the driver runner from tests/drivers/camera/test_camera.py.

How "blurred" is measured: the variance of the Laplacian (fine detail) inside a box of the
decoded still, over the same box of the original frame scaled to the still's size; and the
same after shrinking both regions 2x ("coarse"), which a light Gaussian does not get through.
Measured on the driver's vtest.avi stills at 640 px (6 stills, 3 to 7 persons each): fine at
most 0.040, coarse at most 0.067; at 960 px 0.014 and 0.056. The background outside the boxes
keeps 0.97..0.99 of its detail (JPEG quality 70). For comparison, a plain Gaussian over the same
person boxes gives a coarse median of 0.51 / 0.30 / 0.18 / 0.08 at sigma 1 / 1.5 / 2 / 3 px.
On messi5.jpg's face: fine 0.002, coarse (4x) 0.021, where a Gaussian of sigma 1.5 / 3 / 5
gives 0.46 / 0.14 / 0.04.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from agent.contract.events import CAMERA_SNAPSHOT, PARKING_OCCUPANCY, Reading
from agent.contract.schemas import CameraSnapshot
from agent.errors import DriverStartupError
from agent.inference import Detection, Detector
from drivers.camera.config import MODELS, CameraConfig
from drivers.camera.driver import CameraDriver
from drivers.camera.snapshot import Snapshotter, scale_to_width
from tests.drivers.camera.test_camera import Recorder, assert_private, camera, run_driver
from tests.models.test_models import built_models, footage, frames  # noqa: F401 - session fixtures

pytestmark = pytest.mark.timeout(300)

PERSONS = {"person"}
VEHICLES = {"car", "truck", "bus", "motorbike"}
MAX_FINE = 0.10  # blurred box / original, fine detail (measured <= 0.040; Gaussian sigma 1.5: median 0.13)
MAX_COARSE = 0.15  # the same at half size (measured <= 0.067; Gaussian sigma 1.5: median 0.30)
MIN_BACKGROUND = 0.70  # outside every box (measured >= 0.97)


def snapshots(source: Path | str, **snap: Any) -> CameraConfig:
    keys: dict[str, Any] = {k: v for k, v in snap.items() if k in {"fps", "max_interval", "report_interval"}}
    settings = {k: v for k, v in snap.items() if k not in keys}
    return camera(source, snapshots={"enabled": True, **settings}, **keys)


def decode(data: dict[str, Any]) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(data["image"], validate=True), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


def detail(image: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def half(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


def scaled_box(box: tuple[float, float, float, float], k: float) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (round(v * k) for v in box)
    return x1, y1, x2, y2


class RecordingDriver(CameraDriver):
    """The real driver; every still it attempts is kept with the frame and detections it was given."""

    made: list[tuple[np.ndarray, list[Detection], dict[str, Any] | None]]

    async def _load_faces(self) -> Snapshotter:
        snapshotter = await super()._load_faces()
        make = snapshotter.make
        self.made = []

        def recording(frame: Any, detections: Any, reason: str, trigger: str | None = None) -> Any:
            dets = list(detections)
            data = make(frame, dets, reason, trigger)
            self.made.append((frame.copy(), dets, data))
            return data

        snapshotter.make = recording  # type: ignore[method-assign]
        return snapshotter


async def load_only(driver: CameraDriver) -> None:
    """start() without the capture thread: load and verify the models only."""
    await driver.start()
    assert driver.capture is not None
    driver.capture.stop()


@pytest.fixture(scope="module")
def faces(built_models: dict[str, Path]) -> Detector:  # noqa: F811
    return Detector.from_manifest(built_models["centerface"], threads=1)


# ---- config ---------------------------------------------------------------------------------


def test_snapshot_config_defaults_manifests_and_errors_naming_the_field() -> None:
    off = camera("/tmp/x.avi")
    assert off.snapshots.enabled is False and off.model_manifests() == [str(MODELS / "yolov3-tiny-coco.yaml")]
    on = snapshots("/tmp/x.avi")
    s = on.snapshots
    assert (s.interval, s.on_change, s.min_interval, s.max_width, s.jpeg_quality) == (900, True, 60, 960, 70)
    # doctor verifies the face model's sha256 only when stills are on
    assert on.model_manifests() == [str(MODELS / "yolov3-tiny-coco.yaml"), str(MODELS / "centerface.yaml")]
    assert snapshots("/tmp/x.avi", interval=None).snapshots.interval == 0
    assert snapshots("/tmp/x.avi", interval="5m", min_interval="10s").snapshots.min_interval == 10
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"interval": "500ms"}, "snapshots.interval", "at least 1s"),
        ({"jpeg_quality": 0}, "snapshots.jpeg_quality", "greater than or equal to 10"),
        ({"max_width": 10}, "snapshots.max_width", "greater than or equal to 64"),
        ({"min_interval": "-1s"}, "snapshots.min_interval", "invalid duration"),
        ({"interval": 0, "on_change": False}, "snapshots", "interval is 0 and on_change is false"),
        ({"blur": "light"}, "snapshots.blur", "Extra inputs"),
    ]
    for keys, field, message in bad:
        with pytest.raises(ValidationError, match=message) as info:
            snapshots("/tmp/x.avi", **keys)
        assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [field], info.value
    assert "interval (15m)" in (CameraConfig.model_fields["snapshots"].description or "")


# ---- the driver on real footage ----------------------------------------------------------------


def test_vtest_stills_blur_every_person_and_keep_the_background(
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
    faces: Detector,
) -> None:
    ctx = Recorder()
    driver = RecordingDriver(snapshots(footage["vtest.avi"], fps=2, interval="2s", min_interval=0, max_width=640), ctx)
    readings = asyncio.run(run_driver(driver, 5.0))
    stills = [r.data for r in readings if r.type == CAMERA_SNAPSHOT]
    assert len(stills) >= 3 and {"interval", "change"} <= {s["reason"] for s in stills}, [
        (s["reason"], s["trigger"]) for s in stills
    ]
    made = [d for _, _, d in driver.made]
    assert made[: len(stills)] == stills and len(made) - len(stills) <= 1  # the last may be cut off by the stop
    assert driver.stats["snapshots"] == len(stills) and driver.stats["snapshot_failures"] == 0
    assert {m for m, _ in ctx.inferences} == {"yolov3-tiny-coco", "centerface"}
    persons_checked = 0
    for frame, detections, data in driver.made:
        assert data is not None
        CameraSnapshot.model_validate(data)
        assert data["reason"] == "interval" or data["trigger"].startswith(("bay ", "area ")), data["trigger"]
        image = decode(data)
        assert (data["width"], data["height"]) == (640, 480) == (image.shape[1], image.shape[0])
        # (b) what was blurred is what was found on this frame
        assert data["blurred"] == {
            "persons": sum(d.label in PERSONS for d in detections),
            "vehicles": sum(d.label in VEHICLES for d in detections),
            "faces": len(faces.detect(frame, size=(768, 576)).detections),
        }
        original = scale_to_width(frame, 640)
        k = 640 / 768
        keep = np.ones(image.shape[:2], bool)
        for det in detections:
            x1, y1, x2, y2 = scaled_box(det.box, k)
            w, h = x2 - x1, y2 - y1
            keep[max(0, y1 - h // 5) : y2 + h // 5 + 1, max(0, x1 - w // 5) : x2 + w // 5 + 1] = False
            if det.label not in PERSONS or min(w, h) < 8:
                continue
            fine = detail(image[y1:y2, x1:x2]) / detail(original[y1:y2, x1:x2])
            coarse = detail(half(image[y1:y2, x1:x2])) / detail(half(original[y1:y2, x1:x2]))
            assert fine < MAX_FINE and coarse < MAX_COARSE, (data["reason"], det, fine, coarse)
            persons_checked += 1
        lap_image = cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F)
        lap_original = cv2.Laplacian(cv2.cvtColor(original, cv2.COLOR_BGR2GRAY), cv2.CV_64F)
        background = float(lap_image[keep].var() / lap_original[keep].var())
        assert background > MIN_BACKGROUND, background
    assert persons_checked >= 3 * len(driver.made)  # vtest.avi has 3 to 9 people in view


def test_a_still_on_a_gated_frame_blurs_that_frame_not_older_boxes(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
) -> None:
    """The motion gate watches only the zones: before a still, the detector runs on the very frame."""
    driver = RecordingDriver(snapshots("/tmp/x.avi", interval=0, min_interval=0), Recorder())
    asyncio.run(load_only(driver))

    def van_gone(frame: np.ndarray) -> np.ndarray:
        out = frame.copy()
        out[25:120, 625:768] = np.median(frame[130:200, 400:600].reshape(-1, 3), axis=0).astype(np.uint8)
        return out

    first = driver.analyse(frames[0], mono=0.0, wall=1e9)  # first verdicts: a change still
    assert [r.data["reason"] for r in first.readings if r.type == CAMERA_SNAPSHOT] == ["change"]
    driver.analyse(van_gone(frames[0]), mono=1.0, wall=1e9 + 1)  # the van leaves: debounce starts
    runs = driver.stats["detector_runs"]
    driver.gate.moved = lambda frame: False  # type: ignore[method-assign]
    later = van_gone(frames[700])  # other people elsewhere, nothing moving in the zones
    result = driver.analyse(later, mono=2.5, wall=1e9 + 2.5)  # gated; the debounce elapses
    stills = [r.data for r in result.readings if r.type == CAMERA_SNAPSHOT]
    assert [(s["reason"], s["trigger"]) for s in stills] == [("change", "bay van free")]
    assert any(r.type == PARKING_OCCUPANCY and r.data["occupied"] is False for r in result.readings)
    assert result.detector_seconds is not None and driver.stats["detector_runs"] == runs + 1
    _, given, _ = driver.made[-1]
    assert driver.detector is not None
    assert [d.box for d in given] == [d.box for d in driver.detector.detect(later).detections]
    assert sum(d.label in PERSONS for d in given) >= 6  # frame 700's people, not frame 0's three
    # min_interval holds change stills back; interval 0 means no periodic ones
    driver.config = snapshots("/tmp/x.avi", interval=0, min_interval="10s")
    driver.gate.moved = lambda frame: True  # type: ignore[method-assign]
    again = driver.analyse(frames[700], mono=3.0, wall=1e9 + 3)  # 6 on the walkway, not 3: too soon
    assert again.readings and not [r for r in again.readings if r.type == CAMERA_SNAPSHOT]


def test_a_face_alone_is_found_and_blurred(footage: dict[str, Path], faces: Detector) -> None:  # noqa: F811
    """messi5.jpg with no detector boxes: only CenterFace stands between the face and the uplink."""
    image = np.asarray(cv2.imread(str(footage["messi5.jpg"])), dtype=np.uint8)
    assert image.shape == (342, 548, 3)
    snapshotter = Snapshotter("cam", faces, persons=PERSONS, vehicles=VEHICLES, max_width=960, jpeg_quality=70)
    data = snapshotter.make(image, [], "change", "area crossing-n: 1 waiting")
    assert data is not None
    CameraSnapshot.model_validate(data)
    assert data["blurred"] == {"persons": 0, "vehicles": 0, "faces": 1}
    still = decode(data)
    assert still.shape == image.shape  # 548 px wide: not scaled
    x1, y1, x2, y2 = (225, 93, 257, 135)  # the face CenterFace finds (tests/models/test_models.py: nose at 241, 112)
    fine = detail(still[y1:y2, x1:x2]) / detail(image[y1:y2, x1:x2])
    coarse = detail(half(half(still[y1:y2, x1:x2]))) / detail(half(half(image[y1:y2, x1:x2])))
    assert fine < 0.02 and coarse < 0.08, (fine, coarse)  # measured 0.002 and 0.021
    assert not faces.detect(still, size=(548, 342)).detections  # no face left to find
    keep = np.ones(image.shape[:2], bool)
    keep[y1 - 20 : y2 + 20, x1 - 20 : x2 + 20] = False
    lap_still = cv2.Laplacian(cv2.cvtColor(still, cv2.COLOR_BGR2GRAY), cv2.CV_64F)
    lap_image = cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F)
    assert lap_still[keep].var() / lap_image[keep].var() > MIN_BACKGROUND
    small = Snapshotter("cam", faces, persons=PERSONS, vehicles=VEHICLES, max_width=274, jpeg_quality=70)
    scaled = small.make(image, [], "interval")
    assert scaled is not None and (scaled["width"], scaled["height"]) == (274, 171) and scaled["blurred"]["faces"] == 1
    assert len(scaled["image"]) < len(data["image"]) / 2


# ---- fail closed ----------------------------------------------------------------------------------


def _copy_manifest(manifest: Path, folder: Path, *, flip: bool) -> Path:
    data = yaml.safe_load(manifest.read_text())
    model = bytearray((manifest.parent / data["file"]).read_bytes())
    if flip:
        model[len(model) // 2] ^= 0xFF
    (folder / data["file"]).write_bytes(bytes(model))
    (folder / manifest.name).write_text(manifest.read_text())
    return folder / manifest.name


def test_a_missing_tampered_or_wrong_face_model_stops_the_camera_at_start(
    built_models: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    tampered = _copy_manifest(built_models["centerface"], tmp_path, flip=True)
    cases = [
        (str(tampered), ["cam", "face model", "centerface.onnx", "sha256"]),
        (str(tmp_path / "nowhere" / "faces.yaml"), ["cam", "face model", "nowhere/faces.yaml"]),
        ("yolov3-tiny-coco.yaml", ["cam", "task is 'detect'", "task: faces"]),
    ]
    for face_model, words in cases:
        driver = CameraDriver(snapshots("/tmp/x.avi", face_model=face_model), Recorder())
        with pytest.raises(DriverStartupError) as info:
            asyncio.run(driver.start())
        assert info.value.retry is False
        assert all(w in str(info.value) for w in words), (words, str(info.value))
        assert driver.capture is None and driver.snapshotter is None  # nothing started


class Broken:
    """A face model that raises, or returns a box no one can blur."""

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.calls = 0

    def detect(self, image: np.ndarray, *, size: tuple[int, int] | None = None) -> Any:
        self.calls += 1
        if self.result is None:
            raise RuntimeError("onnxruntime: Non-zero status code returned while running Conv node")
        return self.result


def test_a_face_model_or_encoder_failing_at_run_time_sends_no_still(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = CameraDriver(snapshots("/tmp/x.avi", interval="1s", min_interval=0), Recorder())
    asyncio.run(load_only(driver))
    assert driver.snapshotter is not None
    real_faces = driver.snapshotter.faces
    broken = Broken()
    driver.snapshotter.faces = broken
    readings: list[Reading] = []
    with caplog.at_level(logging.ERROR, logger="drivers.camera"):
        for i, index in enumerate((0, 100, 200)):
            readings += driver.analyse(frames[index], mono=float(i), wall=1e9 + i).readings
    assert broken.calls == 3  # a still was due on each frame, and each failed
    assert readings and not [r for r in readings if r.type == CAMERA_SNAPSHOT]  # events still flow
    assert driver.stats["snapshot_failures"] == 3 and driver.stats["snapshots"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "camera cam" in errors[0] and "Non-zero status" in errors[0], errors  # once
    assert_private(readings)
    # a face box that is not a number: cannot be blurred, so no still
    nan_face = Detection("face", 0, 0.9, (float("nan"), 10.0, 40.0, 50.0))
    driver.snapshotter.faces = Broken(type("Result", (), {"detections": [nan_face]})())
    assert not [r for r in driver.analyse(frames[300], mono=3.0, wall=1e9 + 3).readings if r.type == CAMERA_SNAPSHOT]
    # the encoder failing: no still either
    driver.snapshotter.faces = real_faces
    monkeypatch.setattr("drivers.camera.snapshot.cv2.imencode", lambda *a, **k: (False, None))
    assert not [r for r in driver.analyse(frames[400], mono=4.0, wall=1e9 + 4).readings if r.type == CAMERA_SNAPSHOT]
    assert driver.stats["snapshot_failures"] == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and "could not encode" in errors[-1], errors
    # and with everything working again, the next still goes out
    monkeypatch.undo()
    ok = [r for r in driver.analyse(frames[500], mono=5.0, wall=1e9 + 5).readings if r.type == CAMERA_SNAPSHOT]
    assert len(ok) == 1 and driver.stats["snapshots"] == 1


def test_with_snapshots_off_no_face_model_is_loaded_and_no_still_is_made(
    built_models: dict[str, Path],  # noqa: F811
    frames: dict[int, np.ndarray],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Off (the default) even with every other snapshot key set, and a face model that does not exist."""
    keys = {"enabled": False, "interval": "1s", "min_interval": 0, "face_model": str(tmp_path / "none.yaml")}
    config = camera("/tmp/x.avi", snapshots=keys)
    assert config.model_manifests() == [str(MODELS / "yolov3-tiny-coco.yaml")]
    driver = CameraDriver(config, Recorder())
    asyncio.run(load_only(driver))
    assert driver.snapshotter is None
    readings = [r for i, f in enumerate(frames.values()) for r in driver.analyse(f, mono=2.0 * i).readings]
    assert {r.type for r in readings} == {"city.parking.occupancy", "city.crosswalk.presence"}
    assert_private(readings)
    assert driver.stats["snapshots"] == 0 and driver.stats["snapshot_failures"] == 0


# ---- end to end: through the agent's buffer, over its own byte quota --------------------------------


def _media(buffer: Path) -> tuple[int, int, int]:
    """(snapshot rows, their bytes, snapshots dropped for the quota), read without locking the buffer."""
    if not buffer.exists():
        return 0, 0, 0
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True, timeout=5)
    try:
        rows, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE priority = -1").fetchone()
        (dropped,) = db.execute("SELECT value FROM counters WHERE name = 'dropped_media_quota'").fetchone()
        return int(rows), int(size), int(dropped)
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return 0, 0, 0
    finally:
        db.close()


def test_stills_go_through_the_buffer_within_their_quota(
    built_models: dict[str, Path],  # noqa: F811
    footage: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    broker: Any,
    subscriber_factory: Any,
    agent_factory: Any,
) -> None:
    from tests.conftest import analyse, wait_for, write_config

    quota = 100 * 1024  # one 640 px still (about 55 KB as stored) fits, two do not
    device = snapshots(footage["vtest.avi"], interval="1s", min_interval=0, max_width=640).model_dump(mode="json")
    devices = "".join(f"  {line}\n" for line in yaml.safe_dump([device]).splitlines())
    cfg = write_config(tmp_path / "agent.yaml", port=broker.port, devices=devices)
    cfg.write_text(cfg.read_text().replace("max_bytes: 64MiB}", f"max_bytes: 64MiB, media_max_bytes: {quota}}}"))
    broker.stop()  # the uplink is down: stills pile up in the buffer
    agent_factory(cfg)
    buffer = tmp_path / "buffer.db"
    rows, size, dropped = wait_for(lambda: (m := _media(buffer))[2] >= 2 and m, 40, "stills dropped for the quota")
    assert rows >= 1 and size <= quota, (rows, size, dropped)
    broker.start()
    sub = subscriber_factory(broker.port, "ioc/v1/#")

    def reported() -> list[dict[str, Any]]:
        return [
            d
            for e in sub.snapshot()
            if e["type"] == "city.gateway.health"
            for d in e["data"]["dropped_since_last_report"]
            if d["reason"] == "media_quota"
        ]

    # Each health event reports the drops since the previous one: add them up.
    drops = wait_for(lambda: sum(d["count"] for d in reported()) >= 2 and reported(), 20, "media_quota drops reported")
    assert {(d["device"], d["type"]) for d in drops} == {("cam", CAMERA_SNAPSHOT)}
    health = [e for e in sub.snapshot() if e["type"] == "city.gateway.health"][-1]
    assert health["data"]["accounting"]["dropped"]["media_quota"] >= 2
    wait_for(lambda: any(e["type"] == CAMERA_SNAPSHOT for e in sub.snapshot()), 20, "a still delivered")
    stills = [e for e in sub.snapshot() if e["type"] == CAMERA_SNAPSHOT]
    for event in stills:
        data = CameraSnapshot.model_validate(event["data"])
        assert data.width == 640 and decode(event["data"]).shape == (480, 640, 3)
        assert data.blurred.persons >= 1  # vtest.avi always has someone in view
    # The only gaps in the camera's seqs are the dropped stills, and they were the oldest ones.
    lost = analyse(sub.seqs("cam"))["lost"]
    assert len(lost) >= 2 and max(lost) < min(e["seq"] for e in stills), (lost, [e["seq"] for e in stills])
