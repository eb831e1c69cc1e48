"""Recorded sessions for the TCK-lite modules: ours (a real edge-agent), ours over MQTT 5.0, and the
control (Tahu's sparkplug-client). Each is recorded once per test run and judged by every module.

Under pytest-xdist the modules may land on both workers; the first worker to need a session records
it and leaves it (pickled) for the other, keyed by the run's id, so the agent runs once per run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import exclusive
from tests.sparkplug.scenario import record_ours, record_ours_mqtt5
from tests.sparkplug.scenario_control import record_control
from tests.sparkplug.session import Session
from tests.sparkplug.verdicts import Verdict, evaluate

Verdicts = dict[str, Verdict]
Judged = tuple[Session, Verdicts]


def _shared(name: str, record: Callable[[Path], Session], tmp: pytest.TempPathFactory) -> Judged:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        recorded = record(tmp.mktemp(name))
        return recorded, evaluate(recorded)
    cache = Path(tempfile.gettempdir()) / "edge-agent-test-locks" / f"sparkplug-{name}-{run}.pickle"
    with exclusive(f"sparkplug-{name}"):
        if cache.exists():
            session: Session = pickle.loads(cache.read_bytes())  # noqa: S301 - written by this run's other worker
        else:
            session = record(tmp.mktemp(name))
            cache.write_bytes(pickle.dumps(session))
    return session, evaluate(session)


@pytest.fixture(scope="session")
def both_of_ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Judged, Judged]:
    """Our main session and the MQTT 5.0 one, recorded side by side (own brokers, own agents): the
    suite waits for the longer, not the sum."""
    # The factory makes its base folder at first use, and two threads doing that at once collide
    # (FileExistsError: .../popen-gw1, seen when this was the worker's first use of it).
    tmp_path_factory.getbasetemp()
    with ThreadPoolExecutor(2) as pool:
        main = pool.submit(_shared, "ours", record_ours, tmp_path_factory)
        mqtt5 = pool.submit(_shared, "ours-mqtt5", record_ours_mqtt5, tmp_path_factory)
        return main.result(), mqtt5.result()


@pytest.fixture(scope="session")
def ours(both_of_ours: tuple[Judged, Judged]) -> Verdicts:
    return both_of_ours[0][1]


@pytest.fixture(scope="session")
def ours_mqtt5(both_of_ours: tuple[Judged, Judged]) -> Verdicts:
    return both_of_ours[1][1]


@pytest.fixture(scope="session")
def our_sessions(both_of_ours: tuple[Judged, Judged]) -> list[Session]:
    return [both_of_ours[0][0], both_of_ours[1][0]]


@pytest.fixture(scope="session")
def control_judged(tmp_path_factory: pytest.TempPathFactory) -> Judged:
    return _shared("control", record_control, tmp_path_factory)


@pytest.fixture(scope="session")
def control(control_judged: Judged) -> Verdicts:
    return control_judged[1]
