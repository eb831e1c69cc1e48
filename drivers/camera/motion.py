"""Motion gating: a cheap difference of downscaled grey frames, looked at only around the zones."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

WIDTH = 160  # analysis width: a 768-px frame shrinks 23x in area, the difference costs ~0.1 ms
PIXEL_DELTA = 20  # grey levels: above sensor noise and MJPEG/H.264 artefacts, below a walking person
MARGIN = 0.08  # of the width: motion just outside a zone (a car's roof above its bay) counts


class MotionGate:
    """Says whether anything changed inside any zone since the previous analysed frame.

    Each zone is judged on its own: the changed fraction of *its* (dilated) mask is compared
    with the threshold, and the gate opens when any zone exceeds it. A fraction of the union
    of all zones would let a large waiting area dilute a small bay: a car leaving a bay that
    is a twentieth of the watched pixels would need twenty times the threshold to be seen.
    """

    def __init__(self, polygons: Sequence[Sequence[tuple[float, float]]], threshold: float) -> None:
        """``polygons`` in source-frame pixels; ``threshold`` is the changed fraction of a zone's mask."""
        self.polygons = [np.asarray(p, dtype=np.float64) for p in polygons]
        self.threshold = threshold
        self._masks: list[npt.NDArray[np.bool_]] = []
        self._previous: npt.NDArray[np.uint8] | None = None
        self.fractions: list[float] = [1.0] * len(self.polygons)  # per zone, of the last call
        self.last_fraction = 0.0  # the largest of ``fractions``

    def rezone(self, polygons: Sequence[Sequence[tuple[float, float]]]) -> None:
        """New zones (in source-frame pixels): the next frame rebuilds the masks and counts as moved."""
        self.polygons = [np.asarray(p, dtype=np.float64) for p in polygons]
        self._previous = None

    def _small(self, frame: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        h, w = frame.shape[:2]
        height = max(1, round(h * WIDTH / w))
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        small = cv2.resize(grey, (WIDTH, height), interpolation=cv2.INTER_AREA)
        # Blur: single-pixel noise and compression blocks must not read as motion.
        return np.asarray(cv2.GaussianBlur(small, (5, 5), 0), dtype=np.uint8)

    def _build_masks(self, shape: tuple[int, int], source: tuple[int, int]) -> list[npt.NDArray[np.bool_]]:
        factor = WIDTH / source[1]
        size = max(3, int(WIDTH * MARGIN) | 1)
        kernel = np.ones((size, size), np.uint8)
        masks = []
        for poly in self.polygons:
            mask = np.zeros(shape, np.uint8)
            cv2.fillPoly(mask, [np.round(poly * factor).astype(np.int32)], 1)
            # A zone entirely off the frame rasterises to nothing: it can never move (the
            # detector still runs every max_interval), which is also what it can see.
            masks.append(np.asarray(cv2.dilate(mask, kernel), dtype=bool))
        return masks

    def moved(self, frame: npt.NDArray[np.uint8]) -> bool:
        """True when a zone changed since the last call (and on the first frame or a new size)."""
        small = self._small(frame)
        if self._previous is None or self._previous.shape != small.shape:
            self._masks = self._build_masks(small.shape, (frame.shape[0], frame.shape[1]))
            self._previous = small
            self.fractions = [1.0] * len(self._masks)
            self.last_fraction = 1.0
            return True
        changed = cv2.absdiff(small, self._previous) > PIXEL_DELTA
        self._previous = small
        self.fractions = [float(changed[m].mean()) if m.any() else 0.0 for m in self._masks]
        self.last_fraction = max(self.fractions, default=0.0)
        return self.last_fraction > self.threshold
