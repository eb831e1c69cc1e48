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
    """Says whether anything changed inside the zones since the previous analysed frame."""

    def __init__(self, polygons: Sequence[Sequence[tuple[float, float]]], threshold: float) -> None:
        """``polygons`` in source-frame pixels; ``threshold`` is the changed fraction of the zone mask."""
        self.polygons = [np.asarray(p, dtype=np.float64) for p in polygons]
        self.threshold = threshold
        self._mask: npt.NDArray[np.bool_] | None = None
        self._shape: tuple[int, int] | None = None
        self._previous: npt.NDArray[np.uint8] | None = None
        self.last_fraction = 0.0

    def _small(self, frame: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        h, w = frame.shape[:2]
        height = max(1, round(h * WIDTH / w))
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        small = cv2.resize(grey, (WIDTH, height), interpolation=cv2.INTER_AREA)
        # Blur: single-pixel noise and compression blocks must not read as motion.
        return np.asarray(cv2.GaussianBlur(small, (5, 5), 0), dtype=np.uint8)

    def _build_mask(self, shape: tuple[int, int], source: tuple[int, int]) -> npt.NDArray[np.bool_]:
        mask = np.zeros(shape, np.uint8)
        factor = WIDTH / source[1]
        for poly in self.polygons:
            cv2.fillPoly(mask, [np.round(poly * factor).astype(np.int32)], 1)
        size = max(3, int(WIDTH * MARGIN) | 1)
        return np.asarray(cv2.dilate(mask, np.ones((size, size), np.uint8)), dtype=bool)

    def moved(self, frame: npt.NDArray[np.uint8]) -> bool:
        """True when the zones changed since the last call (and on the first frame or a new size)."""
        small = self._small(frame)
        if self._previous is None or self._previous.shape != small.shape:
            self._mask = self._build_mask(small.shape, (frame.shape[0], frame.shape[1]))
            self._previous = small
            self.last_fraction = 1.0
            return True
        assert self._mask is not None
        changed = cv2.absdiff(small, self._previous) > PIXEL_DELTA
        self._previous = small
        self.last_fraction = float(changed[self._mask].mean()) if self._mask.any() else 0.0
        return self.last_fraction > self.threshold
