"""An onnxruntime session for one model, driven by its manifest (synchronous: call it from a worker).

    detector = Detector.from_manifest("models/yolov3-tiny-coco.yaml", threads=1)
    result = detector.detect(frame)            # frame: H x W x 3 uint8, OpenCV's BGR
    for d in result.detections: print(d.label, d.score, d.box)
    result.inference_ms                         # the model alone; total_ms with pre/post-processing

The model file is read once, its sha256 checked against the manifest on those same bytes,
and the session built from them: a damaged or replaced file is refused (ModelIntegrityError).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]

from agent.inference.decode import Detection, Letterbox, input_size_for, postprocess, preprocess
from agent.inference.manifest import Manifest, ModelError, load_manifest, read_verified_model


@dataclass(frozen=True)
class DetectionResult:
    detections: list[Detection]
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    input_size: tuple[int, int]  # (width, height) fed to the model
    letterbox: Letterbox = field(repr=False)

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.inference_ms + self.postprocess_ms


def session_options(threads: int = 1, *, spin: bool = False) -> Any:
    """Session options for a gateway: a fixed number of intra-op threads, no inter-op pool.

    Spinning (busy-waiting worker threads) is off by default: on a gateway that shares its
    cores with drivers and the uplink, a spinning pool burns CPU between frames.
    """
    if threads < 1:
        raise ValueError("threads must be >= 1")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class Detector:
    """One model, one InferenceSession. Not thread-safe for concurrent ``detect`` calls on one instance."""

    def __init__(self, manifest: Manifest, model: bytes, *, threads: int = 1, spin: bool = False) -> None:
        self.manifest = manifest
        self.threads = threads
        try:
            self.session = ort.InferenceSession(
                model, sess_options=session_options(threads, spin=spin), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{manifest.model_path}: onnxruntime cannot load the model: {exc}") from None
        inputs = self.session.get_inputs()
        names = [i.name for i in inputs]
        self.input_name = manifest.input.name or names[0]
        if self.input_name not in names:
            raise ModelError(f"{manifest.path}: input {self.input_name!r} is not one of the model's inputs {names}")
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        missing = [t for t in _required_outputs(manifest) if t not in self.output_names]
        if missing:
            raise ModelError(f"{manifest.path}: outputs {missing} are not among the model's {self.output_names}")

    @classmethod
    def from_manifest(cls, path: str | Path, *, threads: int = 1, spin: bool = False) -> Detector:
        manifest = load_manifest(path, verify=False)
        return cls(manifest, read_verified_model(manifest), threads=threads, spin=spin)

    def run(self, tensor: npt.NDArray[Any]) -> dict[str, npt.NDArray[np.float32]]:
        """The raw outputs for an input tensor, by name."""
        outs = self.session.run(self.output_names, {self.input_name: tensor})
        return {n: np.asarray(o) for n, o in zip(self.output_names, outs, strict=True)}

    def detect(
        self,
        image: npt.NDArray[np.uint8],
        *,
        image_color: str = "BGR",
        size: tuple[int, int] | None = None,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
    ) -> DetectionResult:
        """Detections in the image's own pixel coordinates, with the time each stage took.

        ``size`` (width, height) applies to models with a dynamic input (CenterFace): it is
        rounded up to the model's multiple; fixed-size models ignore it.
        """
        t0 = time.perf_counter()
        tensor, box = preprocess(image, self.manifest.input, image_color=image_color, size=size)
        input_size = input_size_for(self.manifest.input, image.shape, size)
        t1 = time.perf_counter()
        outputs = self.run(tensor)
        t2 = time.perf_counter()
        dets = postprocess(outputs, self.manifest, box, input_size, score_threshold=score_threshold, nms_iou=nms_iou)
        t3 = time.perf_counter()
        return DetectionResult(dets, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, input_size, box)


def _required_outputs(manifest: Manifest) -> list[str]:
    out = manifest.output
    if out.format == "yolo":
        return list(out.tensors)
    if out.format == "yolov8":
        return [out.tensor] if out.tensor else []
    if out.format == "ssd":
        return [out.boxes, out.scores]
    return [out.heatmap, out.scale, out.offset, out.landmarks]
