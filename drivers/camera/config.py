"""The camera's config: source, model, analysis rate, motion gating and zones (pure, no I/O)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.driver_api import DeviceConfig, Duration, StrictModel

MODELS = Path(__file__).resolve().parent.parent.parent / "models"
DEFAULT_MODEL = "yolov3-tiny-coco.yaml"  # a bare name: one of the models built at install time
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


def _check_polygon(points: list[Point]) -> list[Point]:
    if len(points) < 3:
        raise ValueError("a polygon needs at least 3 points [[x, y], ...]")
    if any(x < 0 or y < 0 for x, y in points):
        raise ValueError("polygon points are pixel coordinates of the source frame (>= 0)")
    return points


class ParkingBay(StrictModel):
    """One parking bay, drawn on the ground in the source frame's pixels."""

    id: str = Field(min_length=1, max_length=64, description="Bay id, as published in city.parking.occupancy.")
    polygon: list[Point] = Field(description="[[x, y], ...] in source-frame pixels, at least 3 points.")
    min_overlap: float = Field(
        default=0.3, gt=0, le=1, description="Fraction of the bay's area a vehicle box must cover to occupy it."
    )
    debounce: Duration = Field(default=5.0, ge=0, description="How long a new state must hold before it is published.")

    _polygon = field_validator("polygon")(_check_polygon)


class WaitingArea(StrictModel):
    """A crosswalk waiting area: persons whose foot point lies inside are counted."""

    id: str = Field(min_length=1, max_length=64, description="Area id, as published in city.crosswalk.presence.")
    polygon: list[Point] = Field(description="[[x, y], ...] in source-frame pixels, at least 3 points.")

    _polygon = field_validator("polygon")(_check_polygon)


class Snapshots(StrictModel):
    """Blurred commissioning snapshots. Not implemented yet: only ``enabled: false`` is accepted."""

    enabled: bool = Field(default=False, description="Must stay false: snapshots are not implemented yet.")

    @field_validator("enabled")
    @classmethod
    def _not_yet(cls, v: bool) -> bool:
        if v:
            raise ValueError("snapshots are not implemented yet; no image ever leaves the gateway")
        return v


class Labels(StrictModel):
    """Which detector labels count as vehicles (bays) and as persons (waiting areas)."""

    vehicles: list[str] = Field(default_factory=lambda: list(VEHICLES), min_length=1)
    persons: list[str] = Field(default_factory=lambda: list(PERSONS), min_length=1)


class CameraConfig(DeviceConfig):
    """A camera watched locally: only occupancy and presence events leave the gateway."""

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
    parking_bays: list[ParkingBay] = Field(default_factory=list)
    waiting_areas: list[WaitingArea] = Field(default_factory=list)
    labels: Labels = Field(default_factory=Labels)
    snapshots: Snapshots = Field(default_factory=Snapshots)

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
        """The detector's manifest, whose sha256 ``edge-agent doctor`` verifies."""
        return [self.manifest_path()]
