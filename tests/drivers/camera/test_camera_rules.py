"""Bay debounce, on synthetic detections and a synthetic clock.

The one place in the camera tests without the real model: what is checked is timing (a new
state is published only once it has held for ``debounce``; shorter flickers never publish),
which footage cannot drive precisely. Real detections on real footage are in
tests/drivers/camera/test_camera.py and tests/drivers/camera/test_camera_sources.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.events import PARKING_OCCUPANCY
from agent.inference import Detection
from drivers.camera.config import CameraConfig
from drivers.camera.driver import CameraDriver
from drivers.camera.rules import BayState, Polygon, bay_observation
from tests.conftest import Recorder

BAY = Polygon([(100, 100), (200, 100), (200, 160), (100, 160)])
VEHICLES = {"car", "truck", "bus", "motorbike"}
CAR = Detection("car", 2, 0.8, (90.0, 60.0, 210.0, 165.0))  # covers the whole bay
PASSER_BY = Detection("person", 0, 0.9, (120.0, 80.0, 150.0, 160.0))  # a person in the bay: not a vehicle
NEIGHBOUR = Detection("car", 2, 0.6, (180.0, 60.0, 300.0, 165.0))  # next bay's car, touching 20 % of this one
DEBOUNCE = 5.0
PERIOD = 0.25  # 4 analysed frames a second; a binary fraction, so the clock adds up exactly


def observe(state: BayState, occupied: bool, t: float) -> bool:
    detections = [CAR] if occupied else [PASSER_BY, NEIGHBOUR]
    verdict, confidence = bay_observation(BAY, detections, VEHICLES, 0.3)
    assert verdict is occupied
    return state.observe(verdict, confidence, t, 1_000_000.0 + t)


def feed(state: BayState, segments: list[tuple[bool, int]], start: float = 0.0) -> list[tuple[float, bool, float]]:
    """Observe ``segments`` (state, frames) at PERIOD; the publications as (time, occupied, since)."""
    published = []
    t = start
    for occupied, frames in segments:
        for _ in range(frames):
            if observe(state, occupied, t):
                assert state.occupied is not None
                published.append((round(t, 6), state.occupied, round(state.since - 1_000_000.0, 6)))
            t += PERIOD
    return published


def test_observation_verdicts_and_confidence() -> None:
    assert bay_observation(BAY, [CAR], VEHICLES, 0.3) == (True, 0.8)
    # Free: one minus the best score of a vehicle that touches the bay without occupying it.
    assert bay_observation(BAY, [PASSER_BY, NEIGHBOUR], VEHICLES, 0.3) == (False, 1.0 - 0.6)
    assert bay_observation(BAY, [PASSER_BY], VEHICLES, 0.3) == (False, 1.0)
    assert bay_observation(BAY, [NEIGHBOUR], VEHICLES, 0.2)[0] is True  # 20 % of the bay meets min_overlap 0.2


def test_first_state_at_once_then_a_change_only_after_the_debounce() -> None:
    state = BayState(DEBOUNCE)
    # Occupied for 10 s, then free for good from t = 10.0.
    published = feed(state, [(True, 40), (False, 40)])
    first_free_seen = 10.0
    assert published == [(0.0, True, 0.0), (first_free_seen + DEBOUNCE, False, first_free_seen)]
    assert state.confidence == 1.0 - 0.6  # the latest observation's, once published


def test_flickers_shorter_than_the_debounce_never_publish() -> None:
    state = BayState(DEBOUNCE)
    # Free for 20 frames (first seen at t, last at t + 4.75), back to occupied, and so on: the
    # detector losing the car for a while, a van passing in front, single-frame misses.
    segments = [(True, 8)] + [(False, 20), (True, 1)] * 6 + [(False, 1), (True, 5)] * 10 + [(True, 30)]
    assert feed(state, segments) == [(0.0, True, 0.0)]
    assert state.occupied is True
    # One frame more and the same flicker is a change, published exactly DEBOUNCE after it began.
    state = BayState(DEBOUNCE)
    assert feed(state, [(True, 8), (False, 21)])[1:] == [(2.0 + DEBOUNCE, False, 2.0)]


def test_a_flicker_during_the_debounce_restarts_it() -> None:
    state = BayState(DEBOUNCE)
    # Free from t = 2.0, one occupied frame at 6.0 (the car seen again), free again from 6.25.
    published = feed(state, [(True, 8), (False, 16), (True, 1), (False, 40)])
    assert published == [(0.0, True, 0.0), (6.25 + DEBOUNCE, False, 6.25)]


def test_zero_debounce_publishes_every_change() -> None:
    state = BayState(0.0)
    published = feed(state, [(True, 2), (False, 1), (True, 1)])
    assert [(t, occupied) for t, occupied, _ in published] == [(0.0, True), (0.5, False), (0.75, True)]


def expected_publications(segments: list[tuple[bool, int]], debounce: float) -> list[tuple[float, bool, float]]:
    """The rule stated over runs: a run of the other state that lasts debounce (first to latest frame) flips it."""
    out: list[tuple[float, bool, float]] = []
    published: bool | None = None
    t = 0.0
    present = [s for s in segments if s[1] > 0]  # an empty segment does not split a run
    runs = [(state, sum(n for _, n in group)) for state, group in itertools.groupby(present, key=lambda s: s[0])]
    for occupied, frames in runs:
        if published is None:
            out.append((0.0, occupied, 0.0))
            published = occupied
        elif occupied != published and (frames - 1) * PERIOD >= debounce - 1e-9:
            at = t + int(np.ceil(debounce / PERIOD - 1e-9)) * PERIOD
            out.append((round(at, 6), occupied, round(t, 6)))
            published = occupied
        t += frames * PERIOD
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=1, max_size=25),
    st.sampled_from([0.0, 0.6, 1.0, 5.0]),
)
def test_debounce_matches_the_rule_on_random_sequences(segments: list[tuple[bool, int]], debounce: float) -> None:
    state = BayState(debounce)
    assert feed(state, segments) == expected_publications(segments, debounce)


# ---- through the driver: gated frames keep the debounce running ------------------------------------


@dataclass
class Scripted:
    """A detector whose detections depend on the frame it gets (its mean grey level), and that counts calls."""

    calls: int = 0

    def detect(self, frame: np.ndarray) -> Any:
        self.calls += 1

        @dataclass
        class Result:
            detections: list[Detection]

        return Result([CAR] if frame[100:160, 100:200].mean() > 100 else [PASSER_BY])


def test_the_debounce_completes_on_gated_frames_and_since_is_when_it_began() -> None:
    config = CameraConfig.model_validate({
        "id": "cam", "driver": "camera", "source": "/srv/cam.avi", "max_interval": "60s",
        "parking_bays": [{"id": "P1", "polygon": BAY.points.tolist(), "debounce": f"{DEBOUNCE}s"}],
    })  # fmt: skip
    driver = CameraDriver(config, Recorder("cam"))
    detector = Scripted()
    driver.detector = detector
    parked = np.full((240, 320, 3), 200, np.uint8)  # the car: bright over the bay
    empty = parked.copy()
    empty[100:160, 100:200] = 40  # the car gone: the bay's asphalt
    wall0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC).timestamp()
    events: list[tuple[float, dict[str, Any]]] = []
    for k in range(80):  # 20 s: parked until t = 4.0, then the bay is empty and nothing moves
        t = k * PERIOD
        result = driver.analyse(parked if t < 4.0 - 1e-9 else empty, mono=t, wall=wall0 + t)
        events += [(round(t, 6), r.data) for r in result.readings if r.type == PARKING_OCCUPANCY]
    # The detector ran on the first frame and when the car left; every other frame was gated,
    # and the departure was published DEBOUNCE later from the standing detections.
    assert detector.calls == 2 and driver.stats["gated"] == 78
    assert [(t, e["occupied"], e["since"]) for t, e in events] == [
        (0.0, True, "2025-06-01T08:00:00.000Z"),
        (4.0 + DEBOUNCE, False, "2025-06-01T08:00:04.000Z"),
    ]
