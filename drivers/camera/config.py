"""The camera's config: source, model, analysis rate, motion gating and zones (pure, no I/O)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.contract.units import parse_duration
from agent.devices.api import DeviceConfig, Duration, StrictModel

MODELS = Path(__file__).resolve().parent.parent.parent / "models"
DEFAULT_MODEL = "yolov3-tiny-coco.yaml"  # a bare name: one of the models built at install time
DEFAULT_FACE_MODEL = "centerface.yaml"
VEHICLES = ("car", "truck", "bus", "motorbike")
PERSONS = ("person",)

Point = tuple[float, float]


def model_path(model: str) -> str:
    """A manifest path; a bare file name is looked up in the checkout's and the installed models/."""
    if "/" in model:
        return model
    for folder in (MODELS, Path(sys.prefix) / "share" / "edge-agent" / "models"):
        if (folder / model).is_file():
            return str(folder / model)
    return str(MODELS / model)


MAX_RELATIVE_POINTS = 32  # the zone editor's bound; pixel polygons of older files keep any number


class Zone(StrictModel):
    """A polygon on the source frame, in its pixels or relative to its size (``units``)."""

    id: str = Field(min_length=1, max_length=64)
    units: Literal["pixels", "relative"] = Field(
        default="pixels",
        description="pixels: [x, y] in source-frame pixels (>= 0); relative: fractions of the frame's "
        "width and height (0..1), so the zone fits any resolution of the same view.",
    )
    polygon: list[Point] = Field(description="[[x, y], ...], at least 3 points (relative: 3..32).")

    @model_validator(mode="after")
    def _polygon_fits_units(self) -> Zone:
        points = self.polygon
        if len(points) < 3:
            raise ValueError("polygon: a polygon needs at least 3 points [[x, y], ...]")
        if self.units == "pixels":
            if any(x < 0 or y < 0 for x, y in points):
                raise ValueError("polygon: with units: pixels, points are pixel coordinates of the source frame (>= 0)")
            return self
        if len(points) > MAX_RELATIVE_POINTS:
            raise ValueError(f"polygon: at most {MAX_RELATIVE_POINTS} points with units: relative, got {len(points)}")
        for n, (x, y) in enumerate(points, 1):
            if not (0 <= x <= 1 and 0 <= y <= 1):
                raise ValueError(
                    f"polygon: point {n} [{x}, {y}] is outside 0..1; with units: relative, x and y are fractions "
                    "of the frame's width and height (pixel coordinates need units: pixels)"
                )
        return self

    def pixels(self, width: int, height: int) -> list[Point]:
        """The polygon in pixels of a ``width`` x ``height`` frame (pixel zones as written)."""
        if self.units == "pixels":
            return list(self.polygon)
        return [(x * width, y * height) for x, y in self.polygon]


class ParkingBay(Zone):
    """One parking bay, drawn on the ground in the source frame."""

    id: str = Field(min_length=1, max_length=64, description="Bay id, as published in city.parking.occupancy.")
    min_overlap: float = Field(
        default=0.3, gt=0, le=1, description="Fraction of the bay's area a vehicle box must cover to occupy it."
    )
    debounce: Duration = Field(default=5.0, ge=0, description="How long a new state must hold before it is published.")


class WaitingArea(Zone):
    """A crosswalk waiting area: persons whose foot point lies inside are counted."""

    id: str = Field(min_length=1, max_length=64, description="Area id, as published in city.crosswalk.presence.")


class Snapshots(StrictModel):
    """Blurred stills for commissioning and incidents (off by default; see drivers/camera/README.md).

    Defaults: a still every 15 min is enough to check aim and zones without filling a cellular
    uplink; a change still at most once a minute shows what the rules saw without turning a
    busy crossing into video; 960 px and JPEG quality 70 keep a still under about 100 KB and are
    enough to judge a scene and draw zones.
    """

    enabled: bool = Field(
        default=False, description="Send blurred stills; off: no frame, crop or pixel leaves the gateway."
    )
    interval: Duration = Field(
        default=900.0,
        ge=0,
        description="A periodic still (reason interval), the first at start; 0 or null: none.",
    )
    on_change: bool = Field(
        default=True, description="A still when a bay changes state or a waiting area's count changes."
    )
    min_interval: Duration = Field(
        default=60.0, ge=0, description="At most one change still per this long (since the previous still)."
    )
    max_width: int = Field(default=960, ge=64, le=8192, description="Stills wider than this are scaled down.")
    jpeg_quality: int = Field(default=70, ge=10, le=100, description="JPEG quality, 10..100.")
    face_model: str = Field(
        default=DEFAULT_FACE_MODEL,
        min_length=1,
        description="Face detector manifest (YAML, task faces): a path or the name of a built model; "
        "its sha256 is checked at start.",
    )

    @field_validator("interval", mode="before")
    @classmethod
    def _none_is_zero(cls, v: object) -> object:
        return 0 if v is None else v

    @field_validator("interval")
    @classmethod
    def _still_not_video(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError("interval must be 0 (no periodic still) or at least 1s: stills, not video")
        return v

    @model_validator(mode="after")
    def _some_trigger(self) -> Snapshots:
        if self.enabled and not self.interval and not self.on_change:
            raise ValueError("enabled is true but interval is 0 and on_change is false: no still would be taken")
        return self

    def face_manifest_path(self) -> str:
        """The face model's manifest: ``face_model`` as given, or a bare name found among the built models."""
        return model_path(self.face_model)


def _describe(model: type[StrictModel]) -> str:
    """``key (default), ...`` of a nested section, for the generated configuration reference."""
    parts = []
    for name, info in model.model_fields.items():
        value = info.default
        if isinstance(value, bool):
            shown = str(value).lower()
        elif parse_duration in {getattr(m, "func", None) for m in info.metadata}:
            shown = _human_duration(float(value))
        else:
            shown = str(value)
        parts.append(f"{name} ({shown})")
    return ", ".join(parts)


def _human_duration(seconds: float) -> str:
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{round(seconds * 1000)}ms"


class Labels(StrictModel):
    """Which detector labels count as vehicles (bays) and as persons (waiting areas)."""

    vehicles: list[str] = Field(default_factory=lambda: list(VEHICLES), min_length=1)
    persons: list[str] = Field(default_factory=lambda: list(PERSONS), min_length=1)


class CameraConfig(DeviceConfig):
    """A camera watched locally: occupancy and presence events leave the gateway; blurred stills only if enabled."""

    driver: Literal["camera"]
    source: str = Field(
        min_length=1,
        description="rtsp://..., http(s)://..., /dev/videoN, or a video file (looped at its native frame rate).",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Detector manifest (YAML): a path, or the name of a model built at install time "
        "(models/); its sha256 is checked at start.",
    )
    threads: int = Field(default=1, ge=1, le=16, description="onnxruntime intra-op threads.")
    fps: float = Field(default=2.0, gt=0, le=30, description="Analysed frames per second (the latest frame is taken).")
    max_interval: Duration = Field(
        default=10.0, gt=0, description="Run the detector at least this often, even without motion."
    )
    motion_threshold: float = Field(
        default=0.002, ge=0, le=1, description="Fraction of zone pixels that must change to run the detector."
    )
    report_interval: Duration = Field(
        default=60.0, gt=0, description="Full report of every zone (and a stats log line)."
    )
    reconnect_min: Duration = Field(default=1.0, gt=0, description="First wait before reopening a lost source.")
    reconnect_max: Duration = Field(default=30.0, gt=0, description="Longest wait between reopen attempts.")
    parking_bays: list[ParkingBay] = Field(
        default_factory=list,
        description="Bays: {id, polygon, units, min_overlap (0.3), debounce (5s)}. units: pixels (the default: "
        "[x, y] in source-frame pixels) or relative (0..1 of the frame's width and height, 3..32 points; "
        "what the page's zone editor writes).",
    )
    waiting_areas: list[WaitingArea] = Field(
        default_factory=list, description="Crosswalk waiting areas: {id, polygon, units}, units as for parking_bays."
    )
    labels: Labels = Field(default_factory=Labels)
    snapshots: Snapshots = Field(
        default_factory=Snapshots,
        description="Blurred stills (city.camera.snapshot), off by default: "
        + _describe(Snapshots)
        + ". Every person, vehicle and face is blurred; see drivers/camera/README.md.",
    )

    @model_validator(mode="after")
    def _zones(self) -> CameraConfig:
        if not self.parking_bays and not self.waiting_areas:
            raise ValueError("a camera needs at least one zone (parking_bays or waiting_areas)")
        seen: set[str] = set()
        for zone_id in [b.id for b in self.parking_bays] + [a.id for a in self.waiting_areas]:
            if zone_id in seen:
                raise ValueError(f"zone id {zone_id!r} is used twice; zone ids are unique per camera")
            seen.add(zone_id)
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        return self

    def device_paths(self) -> list[str]:
        """A USB camera's device file, for ``edge-agent doctor``."""
        return [self.source] if self.source.startswith("/dev/") else []

    def manifest_path(self) -> str:
        """The manifest file: ``model`` as given, or a bare name found among the built models."""
        return model_path(self.model)

    def model_manifests(self) -> list[str]:
        """The detector's manifest and, with snapshots on, the face model's: ``edge-agent doctor`` verifies them."""
        manifests = [self.manifest_path()]
        if self.snapshots.enabled:
            manifests.append(self.snapshots.face_manifest_path())
        return manifests
