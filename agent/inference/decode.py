"""Pre- and post-processing in numpy: letterbox, output decoders, NMS.

Every decoder returns boxes as (x1, y1, x2, y2) in *input-tensor* pixels plus scores and
class ids; :func:`postprocess` maps them back to the source image's pixels (undoing the
letterbox), runs per-class NMS and returns :class:`Detection` objects.

Formats (``output.format`` in the manifest):

- ``yolo``: Darknet-style heads, one [1, A*(5+C), H, W] tensor per stride with raw values.
- ``yolov8``: one [1, 4+C, N] tensor (Ultralytics export; [1, N, 4+C] also accepted).
- ``ssd``: a boxes [1, N, 4] and a scores [1, N, C] tensor.
- ``centerface``: heatmap, scale, offset, landmarks maps (faces, with 5 landmarks each).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from agent.inference.manifest import (
    CenterFaceOutput,
    InputSpec,
    Manifest,
    SsdOutput,
    YoloOutput,
    Yolov8Output,
)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Detection:
    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source-image pixels
    landmarks: tuple[tuple[float, float], ...] | None = None  # faces: eyes, nose, mouth corners

    @property
    def foot(self) -> tuple[float, float]:
        """Bottom centre of the box: where a person stands."""
        return ((self.box[0] + self.box[2]) / 2, self.box[3])


@dataclass(frozen=True)
class Letterbox:
    """How a source image was fitted into the input tensor, to map boxes back."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    source_width: int
    source_height: int

    def to_source(self, boxes: FloatArray) -> FloatArray:
        """(N, 4) x1, y1, x2, y2 in input pixels -> source pixels, clipped to the image."""
        out = np.empty_like(boxes)
        out[:, 0::2] = (boxes[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.pad_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.source_width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.source_height, out=out[:, 1::2])
        return out

    def points_to_source(self, points: FloatArray) -> FloatArray:
        """(..., 2) x, y in input pixels -> source pixels."""
        out = np.empty_like(points)
        out[..., 0] = (points[..., 0] - self.pad_x) / self.scale_x
        out[..., 1] = (points[..., 1] - self.pad_y) / self.scale_y
        return out


def letterbox(
    image: npt.NDArray[np.uint8], width: int, height: int, *, pad_value: int = 114, mode: str = "letterbox"
) -> tuple[npt.NDArray[np.uint8], Letterbox]:
    """Fit an H x W x 3 image into width x height: keep the aspect ratio and pad (centred), or stretch."""
    sh, sw = image.shape[:2]
    if mode == "stretch":
        sx, sy = width / sw, height / sh
        resized = (
            image if (sw, sh) == (width, height) else cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        )
        return np.ascontiguousarray(resized), Letterbox(sx, sy, 0.0, 0.0, sw, sh)
    scale = min(width / sw, height / sh)
    nw, nh = round(sw * scale), round(sh * scale)
    resized = image if (nw, nh) == (sw, sh) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    px, py = (width - nw) // 2, (height - nh) // 2
    canvas = np.full((height, width, 3), pad_value, dtype=np.uint8)
    canvas[py : py + nh, px : px + nw] = resized
    return canvas, Letterbox(nw / sw, nh / sh, float(px), float(py), sw, sh)


def input_size_for(
    spec: InputSpec, image_shape: tuple[int, ...], size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The (width, height) to feed: the manifest's, or for a dynamic model the requested size rounded up."""
    if not spec.dynamic:
        return spec.width, spec.height
    w, h = size if size is not None else (spec.width, spec.height)
    m = spec.multiple
    return max(m, -(-w // m) * m), max(m, -(-h // m) * m)


def preprocess(
    image: npt.NDArray[np.uint8],
    spec: InputSpec,
    *,
    image_color: str = "BGR",
    size: tuple[int, int] | None = None,
) -> tuple[npt.NDArray[np.generic], Letterbox]:
    """An H x W x 3 uint8 image (OpenCV's BGR by default) -> the model's input tensor (batch 1)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    width, height = input_size_for(spec, image.shape, size)
    fitted, box = letterbox(image, width, height, pad_value=spec.pad_value, mode=spec.resize)
    if image_color != spec.color:
        fitted = fitted[:, :, ::-1]
    if spec.dtype == "uint8":
        tensor: npt.NDArray[np.generic] = np.ascontiguousarray(fitted)
    else:
        x = fitted.astype(np.float32)
        x *= np.float32(spec.scale)
        if spec.mean != (0.0, 0.0, 0.0):
            x -= np.asarray(spec.mean, np.float32)
        if spec.std != (1.0, 1.0, 1.0):
            x /= np.asarray(spec.std, np.float32)
        tensor = x
    tensor = tensor.transpose(2, 0, 1)[None] if spec.layout == "NCHW" else tensor[None]
    return np.ascontiguousarray(tensor), box


def sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = (1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))).astype(np.float32, copy=False)
    return out


def iou_matrix(a: FloatArray, b: FloatArray) -> FloatArray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), x1 y1 x2 y2."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: FloatArray = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float32)
    return out


def nms(
    boxes: FloatArray,
    scores: FloatArray,
    iou_threshold: float,
    class_ids: IntArray | None = None,
    max_detections: int = 300,
) -> IntArray:
    """Greedy NMS (per class when class_ids is given); indices of the kept boxes, best first."""
    n = len(scores)
    if n == 0:
        return np.zeros(0, np.int64)
    b = np.asarray(boxes, np.float32)
    if class_ids is not None:
        # Shift each class far away from the others so that one pass never merges two classes.
        span = float(max(b[:, 2].max(), b[:, 3].max(), 1.0)) + 1.0
        b = b + (np.asarray(class_ids, np.float32) * span)[:, None]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


Decoded = tuple[FloatArray, FloatArray, IntArray]  # boxes xyxy (input pixels), scores, class ids


def _empty() -> Decoded:
    return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)


def decode_yolo(outputs: list[FloatArray], spec: YoloOutput, num_classes: int, score_threshold: float) -> Decoded:
    """Darknet YOLO heads (raw) -> candidate boxes; the best class per box, score = objectness * class."""
    all_boxes, all_scores, all_ids = [], [], []
    sxy = spec.scale_x_y
    for raw, mask, stride in zip(outputs, spec.masks, spec.strides, strict=True):
        a = len(mask)
        if raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] != a * (5 + num_classes):
            raise ValueError(f"yolo head of shape {raw.shape} does not hold {a} anchors x (5 + {num_classes} classes)")
        gh, gw = raw.shape[2], raw.shape[3]
        t = raw.reshape(a, 5 + num_classes, gh, gw)
        obj = sigmoid(t[:, 4])  # (A, H, W)
        ai, gy, gx = np.nonzero(obj > score_threshold)  # score <= objectness: a cheap first cut
        if ai.size == 0:
            continue
        cand = t[ai, :, gy, gx]  # (K, 5 + C)
        cls = sigmoid(cand[:, 5:])
        best = cls.argmax(axis=1)
        score = obj[ai, gy, gx] * cls[np.arange(len(best)), best]
        ok = score > score_threshold
        if not ok.any():
            continue
        cand, ai, gy, gx, best, score = cand[ok], ai[ok], gy[ok], gx[ok], best[ok], score[ok]
        anchors = np.asarray(spec.anchors, np.float32)[np.asarray(mask)[ai]]
        cx = (gx + sigmoid(cand[:, 0]) * sxy - (sxy - 1) / 2) * stride
        cy = (gy + sigmoid(cand[:, 1]) * sxy - (sxy - 1) / 2) * stride
        w = np.exp(np.clip(cand[:, 2], -10, 10)) * anchors[:, 0]
        h = np.exp(np.clip(cand[:, 3], -10, 10)) * anchors[:, 1]
        all_boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))
        all_scores.append(score)
        all_ids.append(best)
    if not all_boxes:
        return _empty()
    return (
        np.concatenate(all_boxes).astype(np.float32),
        np.concatenate(all_scores).astype(np.float32),
        np.concatenate(all_ids).astype(np.int64),
    )


def decode_yolov8(raw: FloatArray, num_classes: int, score_threshold: float) -> Decoded:
    """[1, 4+C, N] (or [1, N, 4+C]): cx, cy, w, h in input pixels and class scores -> boxes."""
    x = np.asarray(raw, np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2 or 4 + num_classes not in x.shape:
        raise ValueError(f"yolov8 output of shape {raw.shape} has no axis of 4 + {num_classes} classes")
    if x.shape[0] == 4 + num_classes and x.shape[1] != 4 + num_classes:
        x = x.T  # (N, 4+C)
    elif x.shape[0] == 4 + num_classes == x.shape[1]:
        x = x.T  # ambiguous square: Ultralytics' layout is [4+C, N]
    cls = x[:, 4:]
    best = cls.argmax(axis=1)
    score = cls[np.arange(len(best)), best]
    ok = score > score_threshold
    if not ok.any():
        return _empty()
    b, score, best = x[ok, :4], score[ok], best[ok]
    boxes = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    return boxes.astype(np.float32), score.astype(np.float32), best.astype(np.int64)


def decode_ssd(
    boxes: FloatArray,
    scores: FloatArray,
    spec: SsdOutput,
    input_size: tuple[int, int],
    score_threshold: float,
) -> Decoded:
    """Boxes [1, N, 4] + scores [1, N, C] -> boxes in input pixels, the best non-background class per box."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    s = np.asarray(scores, np.float32)
    s = s.reshape(-1, s.shape[-1])
    if len(b) != len(s):
        raise ValueError(f"ssd: {len(b)} boxes but {len(s)} score rows")
    if spec.score_activation == "sigmoid":
        s = sigmoid(s)
    elif spec.score_activation == "softmax":
        e = np.exp(s - s.max(axis=1, keepdims=True))
        s = e / e.sum(axis=1, keepdims=True)
    if spec.background_class is not None:
        s = s.copy()
        s[:, spec.background_class] = -1.0
    best = s.argmax(axis=1)
    score = s[np.arange(len(best)), best]
    ok = score > score_threshold
    if not ok.any():
        return _empty()
    b, score, best = b[ok], score[ok], best[ok]
    if spec.box_format == "yxyx":
        b = b[:, [1, 0, 3, 2]]
    elif spec.box_format == "xywh":
        b = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], 1)
    elif spec.box_format == "cxcywh":
        b = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    if spec.normalized:
        w, h = input_size
        b = b * np.asarray([w, h, w, h], np.float32)
    return b.astype(np.float32), score.astype(np.float32), best.astype(np.int64)


def decode_centerface(
    heatmap: FloatArray,
    scale: FloatArray,
    offset: FloatArray,
    landmarks: FloatArray,
    spec: CenterFaceOutput,
    input_size: tuple[int, int],
    score_threshold: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """CenterFace maps -> face boxes (input pixels), scores and 5 landmarks each ((K, 5, 2), input pixels)."""
    hm = np.asarray(heatmap, np.float32)[0, 0]
    ys, xs = np.nonzero(hm > score_threshold)
    if ys.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
    st = spec.stride
    s0 = np.exp(scale[0, 0, ys, xs]) * st  # height
    s1 = np.exp(scale[0, 1, ys, xs]) * st  # width
    o0, o1 = offset[0, 0, ys, xs], offset[0, 1, ys, xs]
    w, h = input_size
    x1 = np.clip((xs + o1 + 0.5) * st - s1 / 2, 0, w)
    y1 = np.clip((ys + o0 + 0.5) * st - s0 / 2, 0, h)
    x2 = np.minimum(x1 + s1, w)
    y2 = np.minimum(y1 + s0, h)
    lm = np.asarray(landmarks, np.float32)[0][:, ys, xs]  # (10, K): y0, x0, y1, x1, ...
    pts = np.stack([lm[1::2] * s1 + x1, lm[0::2] * s0 + y1], axis=-1).transpose(1, 0, 2)  # (K, 5, 2)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    return boxes, hm[ys, xs].astype(np.float32), pts.astype(np.float32)


def decode_outputs(
    outputs: dict[str, FloatArray],
    manifest: Manifest,
    input_size: tuple[int, int],
    score_threshold: float,
) -> tuple[FloatArray, FloatArray, IntArray, FloatArray | None]:
    """Named raw outputs -> boxes (input pixels), scores, class ids, landmarks (faces) or None."""
    out = manifest.output
    n = len(manifest.labels)
    if isinstance(out, YoloOutput):
        return (*decode_yolo([outputs[t] for t in out.tensors], out, n, score_threshold), None)
    if isinstance(out, Yolov8Output):
        raw = outputs[out.tensor] if out.tensor else next(iter(outputs.values()))
        return (*decode_yolov8(raw, n, score_threshold), None)
    if isinstance(out, SsdOutput):
        return (*decode_ssd(outputs[out.boxes], outputs[out.scores], out, input_size, score_threshold), None)
    b, s, pts = decode_centerface(
        outputs[out.heatmap],
        outputs[out.scale],
        outputs[out.offset],
        outputs[out.landmarks],
        out,
        input_size,
        score_threshold,
    )
    return b, s, np.zeros(len(s), np.int64), pts


def postprocess(
    outputs: dict[str, FloatArray],
    manifest: Manifest,
    box: Letterbox,
    input_size: tuple[int, int],
    *,
    score_threshold: float | None = None,
    nms_iou: float | None = None,
    max_detections: int | None = None,
) -> list[Detection]:
    """Raw outputs -> NMS'd detections in source-image pixels, best score first."""
    thr = manifest.thresholds
    score_threshold = thr.score if score_threshold is None else score_threshold
    nms_iou = thr.nms_iou if nms_iou is None else nms_iou
    max_detections = thr.max_detections if max_detections is None else max_detections
    boxes, scores, ids, pts = decode_outputs(outputs, manifest, input_size, score_threshold)
    if len(scores) == 0:
        return []
    keep = nms(boxes, scores, nms_iou, ids, max_detections)
    src = box.to_source(boxes[keep])
    src_pts = box.points_to_source(pts[keep]) if pts is not None else None
    dets = []
    for k, i in enumerate(keep):
        cid = int(ids[i])
        label = manifest.labels[cid] if cid < len(manifest.labels) else str(cid)
        lms = tuple((float(x), float(y)) for x, y in src_pts[k]) if src_pts is not None else None
        x1, y1, x2, y2 = (float(v) for v in src[k])
        if x2 <= x1 or y2 <= y1:
            continue  # entirely in the padding
        dets.append(Detection(label, cid, float(scores[i]), (x1, y1, x2, y2), lms))
    return dets
