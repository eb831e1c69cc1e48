"""Technician command: ``edge-agent render camera``, one frame with zones and detections, written locally."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import yaml

from agent.inference import Detector, ModelError
from drivers.camera.capture import open_capture, redact
from drivers.camera.config import DEFAULT_MODEL, CameraConfig, model_path
from drivers.camera.rules import Polygon, bay_observation, count_persons


def _zones(path: str, device: str) -> CameraConfig:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for entry in (data or {}).get("devices", []) or []:
        if isinstance(entry, dict) and entry.get("id") == device:
            return CameraConfig.model_validate(entry)
    raise ValueError(f"{path}: no device {device!r} under devices:")


def render_main(argv: list[str]) -> int:
    """Grab one frame, detect, draw zones and detections, write a PNG. Nothing is uploaded."""
    parser = argparse.ArgumentParser(
        prog="edge-agent render camera",
        description="Render one frame with zones and detections into a local PNG (for aiming and drawing zones).",
    )
    parser.add_argument("--source", help="rtsp://, http://, /dev/videoN or a video file (default: the device's)")
    parser.add_argument("--model", help="detector manifest (default: the device's, else yolov3-tiny-coco)")
    parser.add_argument("--zones", help="a site config (YAML) to take the zones from")
    parser.add_argument("--device", help="the camera's device id in --zones")
    parser.add_argument("--frame", type=int, default=0, help="for files: which frame (default 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="PNG to write (local only)")
    args = parser.parse_args(argv)
    config: CameraConfig | None = None
    try:
        if args.zones:
            if not args.device:
                parser.error("--zones needs --device")
            config = _zones(args.zones, args.device)
        source = args.source or (config.source if config else None)
        if not source:
            parser.error("--source is needed (or --zones with --device)")
        model = model_path(args.model or (config.model if config else DEFAULT_MODEL))
        detector = Detector.from_manifest(model, threads=args.threads)
        cap = open_capture(source)
        if args.frame:
            cap.set(cv2.CAP_PROP_POS_FRAMES, args.frame)
        ok, frame = cap.read()
        cap.release()
        if not ok or frame is None:
            raise OSError(f"no frame from {redact(source)}")
    except (OSError, ValueError, ModelError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    result = detector.detect(frame)
    canvas = frame.copy()
    vehicles = set(config.labels.vehicles) if config else {"car", "truck", "bus", "motorbike"}
    persons = set(config.labels.persons) if config else {"person"}
    for det in result.detections:
        colour = (0, 200, 255) if det.label in vehicles else (255, 128, 0) if det.label in persons else (160, 160, 160)
        x1, y1, x2, y2 = (round(v) for v in det.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 2)
        cv2.putText(canvas, f"{det.label} {det.score:.2f}", (x1, max(y1 - 4, 10)), 0, 0.45, colour, 1, cv2.LINE_AA)
    if config:
        size = (int(frame.shape[1]), int(frame.shape[0]))
        for bay in config.parking_bays:
            occupied, conf = bay_observation(Polygon(bay.pixels(*size)), result.detections, vehicles, bay.min_overlap)
            _poly(canvas, bay.pixels(*size), (0, 0, 255) if occupied else (0, 255, 0),
                  f"{bay.id} {'occupied' if occupied else 'free'} {conf:.2f}")  # fmt: skip
        for area in config.waiting_areas:
            count = count_persons(Polygon(area.pixels(*size)), result.detections, persons)
            _poly(canvas, area.pixels(*size), (255, 0, 255), f"{area.id} {count} waiting")
    if not cv2.imwrite(args.out, canvas):
        print(f"render: cannot write {args.out}", file=sys.stderr)
        return 1
    print(f"{args.out}: {frame.shape[1]}x{frame.shape[0]}, {len(result.detections)} detections, "
          f"{result.total_ms:.0f} ms")  # fmt: skip
    return 0


def _poly(canvas: np.ndarray, points: list[tuple[float, float]], colour: tuple[int, int, int], text: str) -> None:
    pts = np.round(np.asarray(points)).astype(np.int32)
    cv2.polylines(canvas, [pts], True, colour, 2, cv2.LINE_AA)
    x, y = int(pts[:, 0].min()), int(pts[:, 1].min())
    cv2.putText(canvas, text, (x, max(y - 6, 12)), 0, 0.5, colour, 1, cv2.LINE_AA)
