"""Frame capture in a thread: a one-slot latest-frame buffer, looping files, reopening lost streams."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

log = logging.getLogger("drivers.camera")

Frame = npt.NDArray[np.uint8]
DEFAULT_FILE_FPS = 25.0  # when a file does not say its rate
STREAM_READ_FAILURES = 3  # consecutive failed reads before a live stream counts as lost
# A network stream that gives no frame for this long is lost. OpenCV's own FFmpeg default is
# 30 s per read, and a read that times out is retried: an RTSP camera whose connection died
# (measured with a local RTSP server stopped mid-stream) read as alive for over a minute.
# Cameras send at least a frame a second; 5 s also bounds how long stop() waits for a read.
STREAM_READ_TIMEOUT = 5.0
STREAM_OPEN_TIMEOUT = 10.0  # connect + RTSP handshake + FFmpeg's probing of the first frames (~2 s)


@dataclass(frozen=True)
class Grabbed:
    """One captured frame, its sequence number and when it was read (monotonic)."""

    frame: Frame
    seq: int
    at: float


class LatestFrame:
    """A one-slot buffer: a new frame replaces an unread one, so the reader only ever sees the latest.

    Memory is bounded by one frame whatever the reader's speed; ``dropped`` counts frames that
    were replaced before anyone took them.
    """

    def __init__(self) -> None:
        """An empty slot."""
        self._lock = threading.Lock()
        self._item: Grabbed | None = None
        self._taken = True
        self.dropped = 0
        self.put_count = 0

    def put(self, frame: Frame, at: float) -> None:
        """Store ``frame`` (read at monotonic ``at``), replacing any unread one."""
        with self._lock:
            if not self._taken:
                self.dropped += 1
            self.put_count += 1
            self._item = Grabbed(frame, self.put_count, at)
            self._taken = False

    def take(self) -> Grabbed | None:
        """The latest frame if it was not taken yet, else None."""
        with self._lock:
            if self._taken or self._item is None:
                return None
            self._taken = True
            return self._item

    def latest(self) -> Grabbed | None:
        """The latest frame, taken or not (None before the first): for a look, not for analysis."""
        with self._lock:
            return self._item

    def backlog(self) -> int:
        """Frames waiting: 0 or 1, by construction."""
        with self._lock:
            return 0 if self._taken else 1


def is_device_source(source: str) -> bool:
    """A V4L2 camera: /dev/videoN, or a stable name such as /dev/v4l/by-id/usb-...-video-index0."""
    return source.startswith("/dev/")


def is_file_source(source: str) -> bool:
    """A video file (looped, paced at its frame rate) rather than a stream or a device."""
    return "://" not in source and not is_device_source(source)


def check_device(path: str) -> None:
    """Raise OSError saying what is wrong with a camera device file before OpenCV is asked to open it.

    OpenCV's own failure ("can't open camera by index") names neither the cause nor the fix,
    and a technician at the cabinet needs both: unplugged, wrong name, or not allowed.
    """
    device = Path(path)
    if not device.exists():
        raise OSError(
            f"camera device {path} does not exist: is the USB camera plugged in? "
            "(`ls /dev/video* /dev/v4l/by-id/` lists the cameras the kernel sees)"
        )
    if not stat.S_ISCHR(device.stat().st_mode):
        raise OSError(f"{path} is not a character device: a V4L2 camera is /dev/videoN")
    if not os.access(device, os.R_OK | os.W_OK):
        raise OSError(
            f"camera device {path}: permission denied for this user (cameras belong to group video; "
            "the service runs with SupplementaryGroups=video)"
        )


def open_capture(source: str) -> Any:
    """A cv2.VideoCapture for ``source``; raises OSError with the reason when it does not open."""
    if is_device_source(source):
        check_device(source)
        cap = cv2.VideoCapture(source, cv2.CAP_V4L2)
        what = f"{source} as a V4L2 camera (a metadata node of the camera, or not a camera?)"
    elif is_file_source(source):
        if not Path(source).is_file():
            raise OSError(f"video file {source} does not exist")
        cap = cv2.VideoCapture(source)
        what = source
    else:
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, round(STREAM_OPEN_TIMEOUT * 1000),
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, round(STREAM_READ_TIMEOUT * 1000)]  # fmt: skip
        cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)
        what = redact(source)
    if not cap.isOpened():
        cap.release()
        raise OSError(f"cannot open {what}")
    return cap


def redact(source: str) -> str:
    """The source without credentials (rtsp://user:pass@host -> rtsp://***@host), for logs and events."""
    if "://" in source and "@" in source.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = source.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return source


class Capture(threading.Thread):
    """Reads frames into a :class:`LatestFrame` until stopped.

    Files are paced at their native frame rate and looped by reopening them at their end (so a
    replaced file is picked up). A source that fails to open, or a live stream that stops
    giving frames, is reopened with exponential backoff. Status changes go into ``events``
    as ``(ok, reason)``; the driver drains them on the event loop.
    """

    def __init__(self, source: str, slot: LatestFrame, *, backoff_min: float = 1.0, backoff_max: float = 30.0) -> None:
        """Prepare; the thread starts with ``start()``."""
        super().__init__(name=f"camera-capture {redact(source)}", daemon=True)
        self.source = source
        self.slot = slot
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.events: deque[tuple[bool, str]] = deque(maxlen=64)
        self.reopens = 0
        self.frames = 0
        self._stop_event = threading.Event()
        self._got_frames = False

    def stop(self) -> None:
        """Ask the thread to end (it does within one frame or one backoff step)."""
        self._stop_event.set()

    def run(self) -> None:
        """Open, read, reopen; never raises."""
        delay = self.backoff_min
        while not self._stop_event.is_set():
            try:
                cap = open_capture(self.source)
            except OSError as exc:
                reason: str | None = str(exc)
                self._got_frames = False
            else:
                reason = self._read_all(cap)
                cap.release()
            if reason is None:  # a file reached its end: loop at once, no failure
                delay = self.backoff_min
                continue
            self.reopens += 1
            self.events.append((False, reason))
            if self._got_frames:  # it worked a moment ago: retry soon, not after a long backoff
                delay = self.backoff_min
            self._stop_event.wait(delay)
            delay = min(delay * 2, self.backoff_max)
        log.debug("capture of %s stopped", redact(self.source))

    def _read_all(self, cap: Any) -> str | None:
        """Read until the end (None for a file) or a failure (its reason)."""
        file = is_file_source(self.source)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if file else 0.0
        period = 1.0 / (fps if 0 < fps <= 240 else DEFAULT_FILE_FPS) if file else 0.0
        next_at = time.monotonic()
        last_frame_at = time.monotonic()
        failures = 0
        first = True
        self._got_frames = False
        while not self._stop_event.is_set():
            ok, frame = cap.read()
            if not ok or frame is None:
                if file:
                    return None if not first else f"video file {self.source} gives no frames"
                failures += 1
                # A read that timed out took STREAM_READ_TIMEOUT already: do not wait that again twice.
                if failures >= STREAM_READ_FAILURES or time.monotonic() - last_frame_at >= STREAM_READ_TIMEOUT:
                    return f"stream {redact(self.source)} stopped giving frames"
                continue
            failures = 0
            last_frame_at = time.monotonic()
            if first:
                first = False
                self._got_frames = True
                self.events.append((True, "frames"))
            self.frames += 1
            self.slot.put(frame, time.monotonic())
            if file:  # a file reads as fast as it decodes: pace it like the camera it stands for
                next_at += period
                wait = next_at - time.monotonic()
                if wait > 0:
                    self._stop_event.wait(wait)
                else:
                    next_at = time.monotonic()
        return None
