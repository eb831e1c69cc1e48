"""A privacy-safe still: every person, vehicle and face blurred, scaled down, JPEG, base64.

The one way an image leaves the camera driver. :meth:`Snapshotter.make` blurs every box the
detector labelled a person or a vehicle, runs the face model (CenterFace) on the frame and
blurs every face, then scales the result down and encodes it. It fails closed: if anything
raises (the face model, the blur, the encoder), it returns None and nothing is published; an
unblurred image is never returned. Blocking (inference): call it from a worker thread.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from agent.contract.data import camera_snapshot
from agent.inference import Detection

log = logging.getLogger("drivers.camera")

Image = npt.NDArray[np.uint8]
Box = tuple[float, float, float, float]

# Detector boxes can cut off an elbow, a hand or a wing mirror; faces from CenterFace run from
# the eyebrows to the chin, leaving hair and ears out. Each side is pushed out by this share of
# the box's width (height) before blurring.
BOX_MARGIN = 0.10
FACE_MARGIN = 0.30
# Pixelate to about this many blocks across a box's shorter side (but blocks of at least
# MIN_BLOCK pixels): a face becomes at most 5 x 6 blocks, a person a coloured silhouette.
# The Gaussian that follows (sigma = half a block) hides the mosaic's edges; the averaging
# into blocks is what throws the detail away for good.
BLOCKS = 5
MIN_BLOCK = 8
# CenterFace's stride is 4, so faces need every pixel; above this width the face model sees
# a scaled-down frame, which bounds its cost (about 1.4 s for 1920 x 1080 on one core here).
FACE_MAX_WIDTH = 1920
MAX_CAUSES = 32  # distinct failure causes remembered for log-once


class FaceDetector(Protocol):
    """What the snapshotter needs from the face model (``agent.inference.Detector``)."""

    def detect(self, image: Image, *, size: tuple[int, int] | None = None) -> Any:
        """A result with ``.detections`` in the image's pixels."""
        ...


def blur_box(image: Image, box: Box, margin: float) -> bool:
    """Pixelate then Gaussian-blur ``box`` (grown by ``margin`` per side) in place; False if empty."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
    right, bottom = min(width, math.ceil(x2 + mx)), min(height, math.ceil(y2 + my))
    if right <= left or bottom <= top:
        return False
    region = image[top:bottom, left:right]
    w, h = right - left, bottom - top
    block = max(MIN_BLOCK, round(min(w, h) / BLOCKS))
    small = cv2.resize(region, (max(1, -(-w // block)), max(1, -(-h // block))), interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    image[top:bottom, left:right] = cv2.GaussianBlur(coarse, (0, 0), sigmaX=block / 2)
    return True


def scale_to_width(image: Image, max_width: int) -> Image:
    """``image`` scaled down (area averaging) to ``max_width`` if wider, aspect ratio kept."""
    height, width = image.shape[:2]
    if width <= max_width:
        return image
    size = (max_width, max(1, round(height * max_width / width)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


class Snapshotter:
    """Makes the ``city.camera.snapshot`` data of one camera; counts what it made and what failed."""

    def __init__(
        self,
        device_id: str,
        faces: FaceDetector,
        *,
        persons: Iterable[str],
        vehicles: Iterable[str],
        max_width: int,
        jpeg_quality: int,
    ) -> None:
        """``faces``: a loaded, verified face model; ``persons``/``vehicles``: the labels to blur."""
        self.device_id = device_id
        self.faces = faces
        self.persons = frozenset(persons)
        self.vehicles = frozenset(vehicles)
        self.max_width = max_width
        self.jpeg_quality = jpeg_quality
        self.made = 0
        self.failed = 0
        self.face_seconds: float | None = None  # the face model's time on the last still
        self._causes: set[str] = set()

    def make(
        self, frame: Image, detections: Iterable[Detection], reason: str, trigger: str | None = None
    ) -> dict[str, Any] | None:
        """The snapshot's ``data``, or None (logged once per cause, counted) if any step failed.

        ``detections`` must be the detector's output for this very frame: a box from an older
        frame may no longer cover the person it found.
        """
        self.face_seconds = None
        try:
            data = self._make(frame, list(detections), reason, trigger)
        except Exception as exc:  # fail closed: whatever broke, no image leaves
            self._failed(exc)
            return None
        self.made += 1
        return data

    def _make(self, frame: Image, detections: list[Detection], reason: str, trigger: str | None) -> dict[str, Any]:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 frame, got {frame.dtype} {frame.shape}")
        height, width = frame.shape[:2]
        face_size = (width, height)
        if width > FACE_MAX_WIDTH:
            face_size = (FACE_MAX_WIDTH, round(height * FACE_MAX_WIDTH / width))
        started = time.perf_counter()
        faces = list(self.faces.detect(frame, size=face_size).detections)  # on the unblurred frame
        self.face_seconds = time.perf_counter() - started
        image = frame.copy()  # the caller's frame stays as captured
        counts = {"persons": 0, "vehicles": 0, "faces": 0}
        for det in detections:
            kind = "persons" if det.label in self.persons else "vehicles" if det.label in self.vehicles else None
            if kind is not None and blur_box(image, det.box, BOX_MARGIN):
                counts[kind] += 1
        for face in faces:
            if blur_box(image, face.box, FACE_MARGIN):
                counts["faces"] += 1
        image = scale_to_width(image, self.max_width)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode the JPEG")
        jpeg = base64.b64encode(encoded.tobytes()).decode("ascii")
        return camera_snapshot(reason, trigger, int(image.shape[1]), int(image.shape[0]), jpeg, counts)

    def _failed(self, exc: Exception) -> None:
        self.failed += 1
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if cause in self._causes or len(self._causes) >= MAX_CAUSES:
            return  # already said (or too many distinct ones to say): still counted
        self._causes.add(cause)
        log.error("camera %s: snapshot not taken, nothing sent (fail closed): %s", self.device_id, cause[:500])
