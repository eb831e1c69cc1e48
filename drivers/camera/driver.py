"""The camera driver: capture thread -> latest frame -> motion gate -> detector (worker thread) -> zone rules.

Events leave the driver (``city.parking.occupancy``, ``city.crosswalk.presence``; the runtime
adds ``city.device.status`` from poll_ok/poll_failed). With ``snapshots.enabled`` false (the
default) no frame, crop or pixel value is ever put in a reading. With it true, and only then,
``city.camera.snapshot`` readings carry a still made by :mod:`drivers.camera.snapshot` in the
same worker thread: every person, vehicle and face blurred, or no still at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from agent.contract.data import crosswalk_presence, parking_occupancy
from agent.contract.events import CAMERA_SNAPSHOT, CROSSWALK_PRESENCE, PARKING_OCCUPANCY, Reading
from agent.devices.api import Driver, DriverContext
from agent.errors import DriverStartupError
from agent.inference import Detection, Detector, ModelError, load_manifest
from agent.inference.manifest import read_verified_model
from drivers.camera.capture import Capture, Frame, LatestFrame, redact
from drivers.camera.config import CameraConfig, ParkingBay, WaitingArea
from drivers.camera.frame import jpeg_within
from drivers.camera.motion import MotionGate
from drivers.camera.rules import BayState, Polygon, bay_observation, count_persons
from drivers.camera.snapshot import Snapshotter

log = logging.getLogger("drivers.camera")
TIMING_WINDOW = 512  # detector runs kept for p50/p99


def _trigger(readings: list[Reading]) -> str:
    """What changed, for a change still: ``bay P-07 occupied; area crossing-n: 3 waiting``."""
    parts = []
    for r in readings:
        if r.type == PARKING_OCCUPANCY:
            parts.append(f"bay {r.data['bay']} {'occupied' if r.data['occupied'] else 'free'}")
        elif r.type == CROSSWALK_PRESENCE:
            parts.append(f"area {r.data['area']}: {r.data['count']} waiting")
    shown = "; ".join(parts[:4])
    return shown + (f" (+{len(parts) - 4} more)" if len(parts) > 4 else "")


@dataclass
class Analysis:
    """What one analysed frame produced."""

    readings: list[Reading] = field(default_factory=list)
    detector_seconds: float | None = None  # None: the motion gate skipped the detector
    detections: list[Detection] = field(default_factory=list)
    inferences: list[tuple[str, float]] = field(default_factory=list)  # (model, seconds) of every run


class CameraDriver(Driver):
    """One camera: see the module docstring for the pipeline."""

    config: CameraConfig

    def __init__(self, config: CameraConfig, context: DriverContext) -> None:
        """Build the zone rules; no I/O (the model loads in ``start``)."""
        super().__init__(config, context)
        self.detector: Any = None  # a Detector (``detect(bgr)``); tests may wrap it
        self.model_name = ""
        self.snapshotter: Snapshotter | None = None  # only with snapshots.enabled
        self.face_model_name = ""
        self.slot = LatestFrame()
        self.capture: Capture | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._states = {b.id: BayState(b.debounce) for b in config.parking_bays}
        self._bays: list[tuple[ParkingBay, Polygon, BayState]] = []
        self._areas: list[tuple[WaitingArea, Polygon]] = []
        self._zone_size: tuple[int, int] | None = None  # (width, height) the polygons were made for
        self._counts: dict[str, int | None] = {a.id: None for a in config.waiting_areas}
        self._max_counts: dict[str, int] = {a.id: 0 for a in config.waiting_areas}
        self._vehicles = set(config.labels.vehicles)
        self._persons = set(config.labels.persons)
        self.gate = MotionGate([], config.motion_threshold)  # zoned for the frame size by _fit_zones
        self._last_detections: list[Detection] = []
        self._last_detector_at = -float("inf")
        self._next_interval_still = -float("inf")  # the first analysed frame gives one
        self._last_still_at = -float("inf")
        self._timings: deque[float] = deque(maxlen=TIMING_WINDOW)
        self._window_start = time.monotonic()
        self._window_analysed = 0
        self.stats: dict[str, float | int] = {
            "frames_captured": 0, "frames_dropped": 0, "analysed": 0, "detector_runs": 0, "gated": 0,
            "gated_fraction": 0.0, "analysed_fps": 0.0, "detector_ms_p50": 0.0, "detector_ms_p99": 0.0,
            "frame_age_ms_max": 0.0, "reopens": 0, "snapshots": 0, "snapshot_failures": 0,
        }  # fmt: skip

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Verify and load the detector, then start capturing.

        A manifest that is invalid, or a model file missing or not matching its sha256, is not
        retried: waiting will not fix it, and a tampered model must never run.
        """
        try:
            manifest = load_manifest(self.config.manifest_path(), verify=False)
            model = read_verified_model(manifest)  # hashes the very bytes that are loaded
            detector = await asyncio.to_thread(Detector, manifest, model, threads=self.config.threads)
        except ModelError as exc:
            raise DriverStartupError(f"camera {self.config.id}: model refused: {exc}", retry=False) from None
        unknown = (self._vehicles | self._persons) - set(manifest.labels)
        if unknown:
            raise DriverStartupError(
                f"camera {self.config.id}: labels {sorted(unknown)} are not among model {manifest.name}'s labels",
                retry=False,
            )
        if self.config.snapshots.enabled:
            self.snapshotter = await self._load_faces()
        self.detector = detector
        self.model_name = manifest.name
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"camera-{self.config.id}")
        self.capture = Capture(
            self.config.source, self.slot, backoff_min=self.config.reconnect_min, backoff_max=self.config.reconnect_max
        )
        self.capture.start()

    async def _load_faces(self) -> Snapshotter:
        """The face model, verified like the detector: without it no still may be taken at all."""
        snap = self.config.snapshots
        try:
            manifest = load_manifest(snap.face_manifest_path(), verify=False)
            if manifest.task != "faces":
                raise ModelError(f"{manifest.path}: task is {manifest.task!r}, a face model (task: faces) is needed")
            model = read_verified_model(manifest)
            faces = await asyncio.to_thread(Detector, manifest, model, threads=self.config.threads)
        except ModelError as exc:
            raise DriverStartupError(
                f"camera {self.config.id}: snapshots are enabled but the face model is refused: {exc}", retry=False
            ) from None
        self.face_model_name = manifest.name
        return Snapshotter(
            self.config.id,
            faces,
            persons=self._persons,
            vehicles=self._vehicles,
            max_width=snap.max_width,
            jpeg_quality=snap.jpeg_quality,
        )

    async def stop(self) -> None:
        """Stop the capture thread and the worker; never raises."""
        if self.capture is not None:
            self.capture.stop()
            await asyncio.to_thread(self.capture.join, 5.0)
            self.capture = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Every 1/fps take the latest frame, analyse it in the worker thread, yield its events."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.config.fps
        next_at = time.monotonic()
        next_report = time.monotonic() + self.config.report_interval
        while True:
            self._drain_capture_events()
            readings: list[Reading] = []
            grabbed = self.slot.take()
            if grabbed is not None and self._executor is not None:
                age = time.monotonic() - grabbed.at
                self.stats["frame_age_ms_max"] = max(float(self.stats["frame_age_ms_max"]), age * 1e3)
                result = await loop.run_in_executor(self._executor, self.analyse, grabbed.frame)
                for model, seconds in result.inferences:
                    self.context.observe_inference(model, seconds)
                readings.extend(result.readings)
            now = time.monotonic()
            if now >= next_report:
                readings.extend(self.full_report())
                self._log_stats()
                next_report = now + self.config.report_interval
            if readings:
                yield readings
            next_at += period
            now = time.monotonic()
            if next_at < now:  # analysis overran: skip the missed slots (latest frame, no catch-up)
                next_at += ((now - next_at) // period + 1) * period
            await asyncio.sleep(next_at - now)

    def _drain_capture_events(self) -> None:
        if self.capture is None:
            return
        while self.capture.events:
            ok, reason = self.capture.events.popleft()
            if ok:
                self.context.poll_ok()
            else:
                log.warning("camera %s: %s", self.config.id, reason)
                self.context.poll_failed(reason)

    # ---- analysis (worker thread) -----------------------------------------------------------

    def analyse(self, frame: Frame, mono: float | None = None, wall: float | None = None) -> Analysis:
        """Gate, detect if needed, apply the zone rules; the events that changed, and a still if due.

        Blocking (inference): runs in the worker thread. On a gated frame the last detections
        stand for this frame too, so a debounce keeps counting while nothing moves.
        """
        mono = time.monotonic() if mono is None else mono
        wall = time.time() if wall is None else wall
        self._fit_zones(frame)
        out = Analysis()
        moved = self.gate.moved(frame)
        self.stats["analysed"] = int(self.stats["analysed"]) + 1
        self._window_analysed += 1
        if moved or mono - self._last_detector_at >= self.config.max_interval or self._interval_still_due(mono):
            self._detect(frame, mono, out)
        else:
            self.stats["gated"] = int(self.stats["gated"]) + 1
        out.detections = self._last_detections
        out.readings = self._apply_rules(self._last_detections, mono, wall)
        if self.snapshotter is not None:
            still = self._still(frame, out, mono)
            if still is not None:
                out.readings.append(still)
        self._update_stats(mono)
        return out

    def _fit_zones(self, frame: Frame) -> None:
        """Zone polygons in this frame's pixels: relative zones need its size, known at the first frame.

        Made again when the size changes (a camera switched to another stream); bay states carry over.
        """
        size = (int(frame.shape[1]), int(frame.shape[0]))
        if size == self._zone_size:
            return
        cfg = self.config
        self._bays = [(b, Polygon(b.pixels(*size)), self._states[b.id]) for b in cfg.parking_bays]
        self._areas = [(a, Polygon(a.pixels(*size))) for a in cfg.waiting_areas]
        self.gate.rezone([z.pixels(*size) for z in [*cfg.parking_bays, *cfg.waiting_areas]])
        self._zone_size = size

    def latest_jpeg(self, max_bytes: int) -> tuple[bytes, int, int] | None:
        """The latest captured frame as a JPEG of at most ``max_bytes`` and the frame's (width, height).

        For the technician page's zone editor: the frame the capture thread already holds (no second
        capture of the device). Unblurred, so it goes only to a logged-in local session, never upstream.
        None: no frame yet. Blocking (encoding): call it in a thread.
        """
        grabbed = self.slot.latest()
        if grabbed is None:
            return None
        return jpeg_within(grabbed.frame, max_bytes), int(grabbed.frame.shape[1]), int(grabbed.frame.shape[0])

    def _detect(self, frame: Frame, mono: float, out: Analysis) -> None:
        started = time.perf_counter()
        result = self.detector.detect(frame)
        seconds = time.perf_counter() - started
        if out.detector_seconds is None:
            out.detector_seconds = seconds
        out.inferences.append((self.model_name, seconds))
        self._timings.append(seconds * 1e3)
        self._last_detections = list(result.detections)
        self._last_detector_at = mono
        self.stats["detector_runs"] = int(self.stats["detector_runs"]) + 1

    # ---- snapshots (worker thread) -----------------------------------------------------------

    def _interval_still_due(self, mono: float) -> bool:
        return self.snapshotter is not None and self.config.snapshots.interval > 0 and mono >= self._next_interval_still

    def _still(self, frame: Frame, out: Analysis, mono: float) -> Reading | None:
        """A ``city.camera.snapshot`` reading if one is due on this frame (and could be made safely)."""
        assert self.snapshotter is not None
        snap = self.config.snapshots
        trigger: str | None = None
        if self._interval_still_due(mono):
            reason = "interval"
            self._next_interval_still = mono + snap.interval
        elif snap.on_change and out.readings and mono - self._last_still_at >= snap.min_interval:
            reason, trigger = "change", _trigger(out.readings)
        else:
            return None
        # Timers move on even if the still fails, so a broken face model is not retried every frame.
        self._last_still_at = mono
        if out.detector_seconds is None:
            # A gated frame carries older boxes, and the gate only watches the zones: someone
            # walking elsewhere would have moved out of them. Blur only what is on this frame.
            self._detect(frame, mono, out)
        data = self.snapshotter.make(frame, self._last_detections, reason, trigger)
        if self.snapshotter.face_seconds is not None:
            out.inferences.append((self.face_model_name, self.snapshotter.face_seconds))
        self.stats["snapshots"] = self.snapshotter.made
        self.stats["snapshot_failures"] = self.snapshotter.failed
        return None if data is None else Reading(CAMERA_SNAPSHOT, data)

    def _apply_rules(self, detections: list[Detection], mono: float, wall: float) -> list[Reading]:
        readings: list[Reading] = []
        for bay, polygon, state in self._bays:
            occupied, confidence = bay_observation(polygon, detections, self._vehicles, bay.min_overlap)
            if state.observe(occupied, confidence, mono, wall):
                readings.append(self._bay_reading(bay.id, state))
        for area, polygon in self._areas:
            count = count_persons(polygon, detections, self._persons)
            self._max_counts[area.id] = max(self._max_counts[area.id], count)
            if count != self._counts[area.id]:
                self._counts[area.id] = count
                readings.append(self._area_reading(area.id))
        return readings

    def _bay_reading(self, bay: str, state: BayState) -> Reading:
        since = datetime.fromtimestamp(state.since, UTC)
        data = parking_occupancy(bay, bool(state.occupied), round(float(state.confidence), 3), since)
        return Reading(PARKING_OCCUPANCY, data)

    def _area_reading(self, area: str) -> Reading:
        data = crosswalk_presence(area, int(self._counts[area] or 0), int(self._max_counts[area]))
        return Reading(CROSSWALK_PRESENCE, data)

    def full_report(self) -> list[Reading]:
        """Every zone's current state (periodic); starts a new max_count window."""
        readings = [self._bay_reading(b, s) for b, s in self._states.items() if s.occupied is not None]
        for area in self.config.waiting_areas:
            if self._counts[area.id] is not None:
                readings.append(self._area_reading(area.id))
            self._max_counts[area.id] = int(self._counts[area.id] or 0)
        return readings

    # ---- figures ----------------------------------------------------------------------------

    def _update_stats(self, mono: float) -> None:
        s = self.stats
        s["frames_captured"] = self.slot.put_count
        s["frames_dropped"] = self.slot.dropped
        s["reopens"] = self.capture.reopens if self.capture is not None else 0
        s["gated_fraction"] = round(int(s["gated"]) / max(int(s["analysed"]), 1), 3)
        elapsed = mono - self._window_start
        if elapsed >= 5.0:  # a rate over a few seconds, not over the process's life
            s["analysed_fps"] = round(self._window_analysed / elapsed, 2)
            self._window_start, self._window_analysed = mono, 0
        if self._timings:
            p50, p99 = np.percentile(np.fromiter(self._timings, float), [50, 99])
            s["detector_ms_p50"], s["detector_ms_p99"] = round(float(p50), 1), round(float(p99), 1)

    def _log_stats(self) -> None:
        s = self.stats
        log.info(
            "camera %s (%s): %.2f analysed fps, detector p50 %.0f ms p99 %.0f ms, gated %.0f%%, "
            "%d detector runs, %d frames dropped, %d reopens",
            self.config.id, redact(self.config.source), s["analysed_fps"], s["detector_ms_p50"],
            s["detector_ms_p99"], 100 * float(s["gated_fraction"]), s["detector_runs"], s["frames_dropped"],
            s["reopens"],
        )  # fmt: skip
