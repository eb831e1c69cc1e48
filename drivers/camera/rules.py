"""Zone rules: bay occupancy with debounce, persons counted in waiting areas (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from agent.inference import Detection

Box = tuple[float, float, float, float]


class Polygon:
    """A zone polygon, rasterised once inside its bounding box for cheap area overlaps."""

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        """Rasterise ``points`` (source-frame pixels) into a mask over their bounding box."""
        pts = np.asarray(points, dtype=np.float64)
        self.points = pts
        self.x0, self.y0 = int(np.floor(pts[:, 0].min())), int(np.floor(pts[:, 1].min()))
        x1, y1 = int(np.ceil(pts[:, 0].max())), int(np.ceil(pts[:, 1].max()))
        self.mask: npt.NDArray[np.uint8] = np.zeros((y1 - self.y0 + 1, x1 - self.x0 + 1), np.uint8)
        shifted = np.round(pts - [self.x0, self.y0]).astype(np.int32)
        cv2.fillPoly(self.mask, [shifted], 1)
        self.area = max(int(self.mask.sum()), 1)
        self._contour = pts.astype(np.float32).reshape(-1, 1, 2)

    def covered_by(self, box: Box) -> float:
        """Fraction of the polygon's area inside ``box`` (0..1)."""
        h, w = self.mask.shape
        bx0 = max(round(box[0]) - self.x0, 0)
        by0 = max(round(box[1]) - self.y0, 0)
        bx1 = min(round(box[2]) - self.x0, w)
        by1 = min(round(box[3]) - self.y0, h)
        if bx1 <= bx0 or by1 <= by0:
            return 0.0
        return float(self.mask[by0:by1, bx0:bx1].sum()) / self.area

    def contains(self, point: tuple[float, float]) -> bool:
        """Whether ``point`` lies inside (or on the edge of) the polygon."""
        return cv2.pointPolygonTest(self._contour, (float(point[0]), float(point[1])), False) >= 0


def bay_observation(
    polygon: Polygon, detections: Sequence[Detection], vehicles: set[str], min_overlap: float
) -> tuple[bool, float]:
    """One frame's raw verdict for a bay: (occupied, confidence).

    Overlap is the fraction of the *bay* covered by a vehicle box: bays are drawn on the ground
    and a parked vehicle's box covers its bay whatever the perspective, while a box's own
    fraction inside the bay shrinks for tall vehicles seen from the side. Confidence is the
    best qualifying vehicle's score when occupied; when free, one minus the best score of a
    vehicle touching the bay (1.0 when none does).
    """
    best_in, best_touch = 0.0, 0.0
    for det in detections:
        if det.label not in vehicles:
            continue
        overlap = polygon.covered_by(det.box)
        if overlap >= min_overlap:
            best_in = max(best_in, det.score)
        elif overlap > 0:
            best_touch = max(best_touch, det.score)
    if best_in > 0:
        return True, best_in
    return False, 1.0 - best_touch


def count_persons(polygon: Polygon, detections: Sequence[Detection], persons: set[str]) -> int:
    """Persons whose foot point (bottom centre of the box) is inside the area."""
    return sum(1 for d in detections if d.label in persons and polygon.contains(d.foot))


@dataclass
class BayState:
    """A bay's published state and the candidate that must hold for ``debounce`` to replace it."""

    debounce: float
    occupied: bool | None = None  # None until the first observation
    confidence: float = 0.0
    since: float = 0.0  # wall-clock seconds when the published state began
    _candidate: bool | None = None
    _candidate_at: float = 0.0  # monotonic
    _candidate_wall: float = 0.0

    def observe(self, occupied: bool, confidence: float, mono: float, wall: float) -> bool:
        """Feed one observation; True when the published state changed.

        The first observation is published at once (nothing was known before); later changes
        only after the new state has been seen continuously for ``debounce`` seconds, and
        ``since`` is when it was first seen, not when the debounce ended.
        """
        if self.occupied is None:
            self.occupied, self.confidence, self.since = occupied, confidence, wall
            return True
        if occupied == self.occupied:
            self._candidate = None
            self.confidence = confidence
            return False
        if self._candidate != occupied:
            self._candidate, self._candidate_at, self._candidate_wall = occupied, mono, wall
        if mono - self._candidate_at >= self.debounce:
            self.occupied, self.confidence, self.since = occupied, confidence, self._candidate_wall
            self._candidate = None
            return True
        return False
