"""A frame as a JPEG under a byte budget: for the technician page's zone editor."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

# Quality first, then size: a zone is drawn as well on a 640-px frame at quality 60 as on the
# full one, and every step down roughly halves or thirds the bytes.
QUALITIES = (85, 70, 55, 40, 25)
MIN_WIDTH = 160


def jpeg_within(frame: npt.NDArray[np.uint8], max_bytes: int) -> bytes:
    """``frame`` as JPEG bytes of at most ``max_bytes``: lower quality, then halve the size, until it fits.

    Raises ValueError when even a ``MIN_WIDTH``-pixel image at the lowest quality does not fit.
    """
    image = frame
    while True:
        for quality in QUALITIES:
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError("OpenCV could not encode the frame as JPEG")
            if encoded.size <= max_bytes:
                return encoded.tobytes()
        height, width = image.shape[:2]
        if width // 2 < MIN_WIDTH:
            raise ValueError(f"the frame does not fit in {max_bytes} bytes as a JPEG")
        size = (width // 2, max(1, height // 2))
        image = np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
