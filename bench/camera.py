"""Camera driver figures on vtest.avi: detector latency, motion gating, analysed fps, CPU and the agent's RSS.

    .venv/bin/python -m bench.camera [--seconds 20] [--fps 5] [--only latency,gating,realtime,rss]

Needs the built models (python -m models.build) and the footage the tests fetch (opencv-doc's
vtest.avi in the model cache: run tests/models/test_models.py once). Prints figures only.

- latency: the detector alone on 30 frames, fp32 and int8, 1 and 2 threads.
- gating: the whole of vtest.avi replayed at --fps through the driver's own analysis (motion
  gate, detector, zone rules) on a synthetic clock, once with the detector on every frame and
  once gated, for the zones as configured in the tests and for bays only; then the same with a
  vehicle that drives out of its bay and back (vtest.avi has none: its vans stay parked). The
  bay changes of the two runs are compared: missed, later than max_interval, or extra.
- realtime: the driver streaming vtest.avi (looped at its native 10 fps) for --seconds.
- rss: ``edge-agent run`` as a real process with one camera (int8, --fps, one thread) and a
  real Mosquitto uplink; its RSS sampled from /proc (steady: median after the warm-up; peak:
  the kernel's high-water mark).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from agent.devices.api import DriverContext
from agent.inference import DetectionResult, Detector
from drivers.camera.capture import Frame
from drivers.camera.config import MODELS, CameraConfig
from drivers.camera.driver import CameraDriver
from models import build

VTEST = build.default_cache() / "opencv-doc" / "vtest.avi"
ROOT = Path(__file__).resolve().parent.parent
# Zones on vtest.avi (768 x 576), as in tests/drivers/camera/test_camera.py.
VAN_BAY = [[650, 60], [720, 60], [720, 100], [650, 100]]  # under the parked white van
CAR_BAY = [[735, 62], [768, 62], [768, 92], [735, 92]]  # under the light-blue car cut by the right edge
LAWN_BAY = [[50, 380], [250, 380], [250, 480], [50, 480]]  # grass: never a vehicle, people cross it
WALKWAY = [[0, 200], [400, 195], [768, 230], [768, 420], [0, 320]]
ZONES: dict[str, dict[str, Any]] = {
    "zones as in the tests (van, lawn, walkway)": {
        "parking_bays": [{"id": "van", "polygon": VAN_BAY}, {"id": "lawn", "polygon": LAWN_BAY}],
        "waiting_areas": [{"id": "walkway", "polygon": WALKWAY}],
    },
    "bays only (van, car)": {
        "parking_bays": [{"id": "van", "polygon": VAN_BAY}, {"id": "car", "polygon": CAR_BAY}],
    },
}
# The synthetic departure: the van (inside VAN_BOX) slides out to the right over DRIVE
# seconds from LEAVE, the bay stays empty (the box filled with frame 0's inpainted
# background) and the van slides back in from RETURN. Everything else is the real footage.
VAN_BOX = (644, 38, 728, 108)  # x0, y0, x1, y1
LEAVE, RETURN, DRIVE = 20.0, 45.0, 4.0


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


# ---- gating: an offline replay on a synthetic clock ----------------------------------------


class Departure:
    """Makes the van drive out of its bay and back (see LEAVE, RETURN, DRIVE)."""

    def __init__(self, first: Frame) -> None:
        x0, y0, x1, y1 = VAN_BOX
        mask = np.zeros(first.shape[:2], np.uint8)
        mask[y0:y1, x0:x1] = 255
        self.background = cv2.inpaint(first, mask, 7, cv2.INPAINT_TELEA)[y0:y1, x0:x1]

    def __call__(self, frame: Frame, t: float) -> Frame:
        if t < LEAVE or t >= RETURN + DRIVE:
            return frame
        if t < LEAVE + DRIVE:
            gone = (t - LEAVE) / DRIVE
        elif t < RETURN:
            gone = 1.0
        else:
            gone = 1.0 - (t - RETURN) / DRIVE
        x0, y0, x1, y1 = VAN_BOX
        width = x1 - x0
        shift = round(gone * width)
        out = frame.copy()
        patch = self.background.copy()
        if shift < width:  # the part of the van still inside the box, moved right by `shift`
            patch[:, shift:] = frame[y0:y1, x0 : x1 - shift]
        out[y0:y1, x0:x1] = patch
        return out


def replay_frames(fps: float, departure: bool) -> Iterator[tuple[int, float, Frame]]:
    """(index, time, frame) of vtest.avi sampled at ``fps`` (it runs at 10 fps), as analysis would take them."""
    cap = cv2.VideoCapture(str(VTEST))
    native = cap.get(cv2.CAP_PROP_FPS) or 10.0
    change: Departure | None = None
    index, k = 0, 0
    while True:
        ok, read = cap.read()
        if not ok:
            break
        frame: Frame = np.asarray(read, dtype=np.uint8)
        t = index / native
        if t + 1e-9 >= k / fps:
            if departure:
                change = change or Departure(frame)
                frame = change(frame, t)
            yield index, t, frame
            k += 1
        index += 1
    cap.release()


class Memo:
    """The detector, remembered per (variant, frame): every replay of the same frames pays once."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.cache: dict[tuple[bool, int], DetectionResult] = {}
        self.key: tuple[bool, int] = (False, 0)
        self.calls = 0

    def detect(self, frame: Frame) -> DetectionResult:
        self.calls += 1
        if self.key not in self.cache:
            self.cache[self.key] = self.detector.detect(frame)
        return self.cache[self.key]


@dataclass
class Replay:
    runs: int = 0
    analysed: int = 0
    changes: list[tuple[float, str, bool]] = field(default_factory=list)  # (t, bay, occupied) published
    why: Counter[str] = field(default_factory=Counter)  # gated runs: each zone that moved, or max_interval


def replay(zones: dict[str, Any], fps: float, gated: bool, memo: Memo, departure: bool) -> Replay:
    config = CameraConfig.model_validate({
        "id": "bench", "driver": "camera", "source": str(VTEST), "fps": fps,
        "max_interval": "10s" if gated else "1ms", "report_interval": "1h", **zones,
    })  # fmt: skip
    driver = CameraDriver(config, Quiet())
    driver.detector = memo
    out = Replay()
    names = [b.id for b in config.parking_bays] + [a.id for a in config.waiting_areas]
    for index, t, frame in replay_frames(fps, departure):
        memo.key = (departure and LEAVE <= t < RETURN + DRIVE, index)
        calls = memo.calls
        result = driver.analyse(frame, mono=t, wall=1.7e9 + t)
        if memo.calls > calls and out.analysed:
            moved = [n for n, f in zip(names, driver.gate.fractions, strict=True) if f > config.motion_threshold]
            out.why.update(moved or ["max_interval"])
        out.changes += [(t, r.data["bay"], r.data["occupied"]) for r in result.readings if "bay" in r.data]
        out.analysed += 1
    out.runs = int(driver.stats["detector_runs"])
    return out


def compare(reference: Replay, gated: Replay, max_interval: float) -> tuple[list[str], float]:
    """Problems of the gated run against the ungated one, and the largest delay of a matched change."""
    problems: list[str] = []
    worst = 0.0
    pending = list(gated.changes)
    for t, bay, occupied in reference.changes:
        match = next((c for c in pending if c[1] == bay and c[2] == occupied and c[0] >= t - max_interval), None)
        if match is None:
            problems.append(f"missed {bay} -> {'occupied' if occupied else 'free'} at {t:.1f} s")
            continue
        pending.remove(match)
        worst = max(worst, match[0] - t)
        if match[0] - t > max_interval:
            problems.append(f"{bay} -> {'occupied' if occupied else 'free'} {match[0] - t:.1f} s late")
    problems += [f"extra {b} -> {'occupied' if o else 'free'} at {t:.1f} s" for t, b, o in pending]
    return problems, worst


def gating(model: str, fps: float, threads: int) -> None:
    print(f"\nmotion gating: the whole of vtest.avi (79.5 s) replayed at {fps:g} analysed fps on a synthetic clock,")
    print(
        f"{model}, {threads} thread(s); detector on every frame vs gated (max_interval 10 s, motion_threshold default):"
    )
    memo = Memo(Detector.from_manifest(MODELS / f"{model}.yaml", threads=threads))
    for departure in (False, True):
        if departure:
            print(f"  with a synthetic departure: the van drives out over {DRIVE:g} s from {LEAVE:g} s, "
                  f"back in from {RETURN:g} s:")  # fmt: skip
        for name, zones in ZONES.items():
            if departure and "van" not in [b["id"] for b in zones.get("parking_bays", [])]:
                continue
            full = replay(zones, fps, False, memo, departure)
            gated = replay(zones, fps, True, memo, departure)
            problems, worst = compare(full, gated, 10.0)
            ratio = full.runs / max(gated.runs, 1)
            changes = ", ".join(f"{b} {'occ' if o else 'free'} @{t:.1f}s" for t, b, o in full.changes)
            print(f"    {name}: detector calls {full.runs} without gating, {gated.runs} with "
                  f"({ratio:.1f}x fewer) over {full.analysed} analysed frames")  # fmt: skip
            print(f"      bay changes without gating: {changes or 'none'}")
            why = ", ".join(f"{n} {c}" for n, c in gated.why.most_common())
            print(f"      gated runs after the first, by cause (a run counts for every zone that moved): {why}")
            verdict = "; ".join(problems) if problems else "none missed, none later than max_interval, none extra"
            print(f"      gated vs not: {verdict} (largest delay {worst:.1f} s)")


# ---- realtime: the driver streaming the file -------------------------------------------------


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


def realtime(fps: float, seconds: float) -> None:
    print(f"\none camera, vtest.avi at its native 10 fps, target {fps:g} analysed fps, {seconds:.0f} s each:")
    for model in ("yolov3-tiny-coco-int8", "yolov3-tiny-coco"):
        for gated in (False, True):
            r = run(model, fps, seconds, gated)
            print(f"  {model:24s} gating={'on ' if gated else 'off'}: analysed {r['analysed_fps']:.2f} fps, "
                  f"detector runs {r['runs']}, gated {100 * r['gated']:.0f}%, p50 {r['p50']:.0f} ms, "
                  f"p99 {r['p99']:.0f} ms, process CPU {r['cpu']:.0f}%, bay events {r['bays']}")  # fmt: skip


# ---- rss: the agent as a real process ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def agent_rss(fps: float, seconds: float) -> None:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    print(f"\nagent RSS: edge-agent run, one camera (vtest.avi looped, yolov3-tiny-coco-int8, 1 thread, "
          f"{fps:g} analysed fps, zones as in the tests, gating on), Mosquitto uplink, {seconds:.0f} s:")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-camera-") as tmp:
        work = Path(tmp)
        port = _free_port()
        conf = work / "mosquitto.conf"
        # As root, mosquitto would drop to user mosquitto, which cannot write here.
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest none\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))  # fmt: skip
        broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        zones = ZONES["zones as in the tests (van, lawn, walkway)"]
        camera = {"id": "cam", "driver": "camera", "source": str(VTEST), "model": "yolov3-tiny-coco-int8.yaml",
                  "threads": 1, "fps": fps, "report_interval": "10s", **zones}  # fmt: skip
        site = {
            "gateway": {"id": "gw-bench", "site": "bench"},
            "uplink": {"mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "ioc/v1"}},
            "buffer": {"path": str(work / "buffer.db")},
            "devices": [camera],
        }
        (work / "site.yaml").write_text(yaml.safe_dump(site))
        log = (work / "agent.log").open("wb")
        # The stats line repeats every report_interval; the log's repeat limit would keep only the first.
        env = {**os.environ, "EDGE_AGENT_LOG_REPEAT_BURST": "1000"}
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(work / "site.yaml")],
            cwd=ROOT, stdout=log, stderr=log, env=env,
        )  # fmt: skip
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < seconds and agent.poll() is None:
                rss = _rss_kib(agent.pid, "VmRSS")
                if rss is not None:
                    samples.append((time.monotonic() - t0, rss))
                time.sleep(0.25)
            peak = _rss_kib(agent.pid, "VmHWM")
            cpu = sum(int(v) for v in Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        finally:
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(20)
            broker.terminate()
            broker.wait(10)
        if code != 0 or not samples or peak is None:
            print(f"  the agent exited with {code}:\n" + (work / "agent.log").read_text()[-3000:])
            return
        steady = [kib for t, kib in samples if t >= seconds / 3]
        ticks = os.sysconf("SC_CLK_TCK")
        # The driver's own stats line, logged every report_interval: what it really analysed.
        rates = re.findall(r"([0-9.]+) analysed fps", (work / "agent.log").read_text())
        print(f"  peak {peak / 1024:.0f} MB (VmHWM), steady {statistics.median(steady) / 1024:.0f} MB "
              f"(median of {len(steady)} samples after {seconds / 3:.0f} s; min {min(steady) / 1024:.0f}, "
              f"max {max(steady) / 1024:.0f}), agent CPU {cpu / ticks / seconds * 100:.0f}% of one core, "
              f"analysed fps per 10 s report: {', '.join(rates) or 'none logged'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--only", default="latency,gating,realtime,rss", help="sections to run, comma-separated")
    parser.add_argument("--gating-model", default="yolov3-tiny-coco", help="model of the gating replay")
    parser.add_argument("--threads", type=int, default=2, help="detector threads of the gating replay")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if "latency" in only:
        cap = cv2.VideoCapture(str(VTEST))
        frames = []
        for i in range(300):
            ok, f = cap.read()
            if ok and i % 10 == 0:
                frames.append(f)
        cap.release()
        latency(frames)
    if "gating" in only:
        gating(args.gating_model, args.fps, args.threads)
    if "realtime" in only:
        realtime(args.fps, args.seconds)
    if "rss" in only:
        agent_rss(args.fps, max(args.seconds, 30.0))


if __name__ == "__main__":
    main()
