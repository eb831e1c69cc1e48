"""Local ONNX inference: model manifests (sha256-checked), an onnxruntime session, numpy decoders.

Nothing here touches the network or the event loop: models are built at install time by
``python -m models.build`` and loaded through their manifests; ``Detector.detect`` is a
blocking call meant for a worker thread.
"""

from agent.inference.decode import Detection, Letterbox, letterbox, nms, postprocess, preprocess
from agent.inference.manifest import (
    Manifest,
    ManifestError,
    ModelError,
    ModelFileMissingError,
    ModelIntegrityError,
    load_manifest,
    read_manifest,
)
from agent.inference.session import DetectionResult, Detector

__all__ = [
    "Detection",
    "DetectionResult",
    "Detector",
    "Letterbox",
    "Manifest",
    "ManifestError",
    "ModelError",
    "ModelFileMissingError",
    "ModelIntegrityError",
    "letterbox",
    "load_manifest",
    "nms",
    "postprocess",
    "preprocess",
    "read_manifest",
]
