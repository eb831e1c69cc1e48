"""Camera driver figures on vtest.avi: detector latency, analysed fps, gating, CPU and RSS.

    .venv/bin/python -m bench.camera [--seconds 20] [--fps 5]

Needs the built models (python -m models.build) and the footage the tests fetch
(opencv-doc's vtest.avi in the model cache). Prints figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from typing import Any

import cv2
import numpy as np

from agent.driver_api import DriverContext
from agent.inference import Detector
from drivers.camera.config import MODELS, CameraConfig
from drivers.camera.driver import CameraDriver
from models import build

VTEST = build.default_cache() / "opencv-doc" / "vtest.avi"
VAN_BAY = [[650, 60], [720, 60], [720, 100], [650, 100]]
LAWN_BAY = [[50, 380], [250, 380], [250, 480], [50, 480]]
WALKWAY = [[0, 200], [400, 195], [768, 230], [768, 420], [0, 320]]


class Quiet(DriverContext):
    device_id = "bench"

    def poll_ok(self) -> None:
        pass

    def poll_failed(self, reason: str) -> None:
        print("  source failed:", reason)


def latency(frames: list[np.ndarray]) -> None:
    print("detector ms per 768x576 frame (416x416 input), 30 frames after 3 warm-up:")
    for stem in ("yolov3-tiny-coco", "yolov3-tiny-coco-int8"):
        for threads in (1, 2):
            det = Detector.from_manifest(MODELS / f"{stem}.yaml", threads=threads)
            for f in frames[:3]:
                det.detect(f)
            ms = []
            for f in frames:
                t0 = time.perf_counter()
                det.detect(f)
                ms.append((time.perf_counter() - t0) * 1e3)
            p50, p99 = np.percentile(ms, [50, 99])
            print(f"  {stem:24s} threads={threads}: p50 {p50:6.1f}  p99 {p99:6.1f}")


def run(model: str, fps: float, seconds: float, gating: bool) -> dict[str, Any]:
    config = CameraConfig.model_validate({
        "id": "bench", "driver": "camera", "source": str(VTEST), "model": str(MODELS / f"{model}.yaml"),
        "fps": fps, "max_interval": "10s" if gating else "1ms", "report_interval": "1h",
        "parking_bays": [{"id": "van", "polygon": VAN_BAY}, {"id": "lawn", "polygon": LAWN_BAY}],
        "waiting_areas": [{"id": "walkway", "polygon": WALKWAY}],
    })  # fmt: skip
    driver = CameraDriver(config, Quiet())
    bay_events: list[tuple[str, bool]] = []

    async def main() -> None:
        await driver.start()

        async def consume() -> None:
            async for batch in driver.stream():
                bay_events.extend((r.data["bay"], r.data["occupied"]) for r in batch if "bay" in r.data)

        task = asyncio.create_task(consume())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await driver.stop()

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    asyncio.run(main())
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall * 100
    s = driver.stats
    return {"analysed_fps": s["analysed"] / seconds, "runs": s["detector_runs"], "gated": s["gated_fraction"],
            "p50": s["detector_ms_p50"], "p99": s["detector_ms_p99"], "cpu": cpu, "bays": bay_events}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=5.0)
    args = parser.parse_args()
    cap = cv2.VideoCapture(str(VTEST))
    frames = []
    for i in range(300):
        ok, f = cap.read()
        if ok and i % 10 == 0:
            frames.append(f)
    cap.release()
    latency(frames)
    print(f"\none camera, vtest.avi at its native 10 fps, target {args.fps} analysed fps, {args.seconds:.0f} s each:")
    for model in ("yolov3-tiny-coco-int8", "yolov3-tiny-coco"):
        for gating in (False, True):
            r = run(model, args.fps, args.seconds, gating)
            print(f"  {model:24s} gating={'on ' if gating else 'off'}: analysed {r['analysed_fps']:.2f} fps, "
                  f"detector runs {r['runs']}, gated {100 * r['gated']:.0f}%, p50 {r['p50']:.0f} ms, "
                  f"p99 {r['p99']:.0f} ms, process CPU {r['cpu']:.0f}%, bay events {r['bays']}")  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process (both models loaded in turn, one camera at a time): {rss:.0f} MB")


if __name__ == "__main__":
    main()
