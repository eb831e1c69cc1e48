"""Session lifetimes (30 min idle, 8 h absolute), and the setup link kept out of diagnostics bundles."""

from __future__ import annotations

import logging

import pytest

from agent.fleet.logring import log_ring
from agent.ui import sessions as sessions_module
from agent.ui.server import keep_setup_out_of_rings, setup_log
from agent.ui.sessions import ABSOLUTE_SECONDS, IDLE_SECONDS, Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(sessions_module.time, "monotonic", c)
    return c


def test_a_session_ends_after_30_idle_minutes(clock: Clock) -> None:
    s = Sessions()
    sid = s.open("technician", "stamp")
    clock.now += IDLE_SECONDS - 1
    assert s.get(sid, "stamp") is not None  # a request: the idle time restarts
    clock.now += IDLE_SECONDS - 1
    assert s.get(sid, "stamp") is not None
    clock.now += IDLE_SECONDS + 1
    assert s.get(sid, "stamp") is None
    assert s.get(sid, "stamp") is None  # gone, not revived


def test_a_session_ends_8_hours_after_login_however_busy(clock: Clock) -> None:
    s = Sessions()
    sid = s.open("technician", "stamp")
    while clock.now < 1000.0 + ABSOLUTE_SECONDS - 600:
        clock.now += 600
        assert s.get(sid, "stamp") is not None
    clock.now += 601
    assert s.get(sid, "stamp") is None


def test_a_new_password_ends_sessions_and_failures_age_out(clock: Clock) -> None:
    s = Sessions()
    sid = s.open("technician", "old")
    assert s.get(sid, "new") is None
    for _ in range(5):
        s.failed()
    assert s.limited()
    clock.now += 61
    assert not s.limited()


def test_the_setup_link_stays_out_of_the_log_ring() -> None:
    ring = log_ring()
    keep_setup_out_of_rings()
    logging.getLogger("agent.ui").warning("ui: an ordinary line")
    setup_log.warning("ui: first start: open http://127.0.0.1:9180/#setup=secret-link-token-1234")
    text = ring.text(None)
    assert "an ordinary line" in text and "secret-link-token-1234" not in text
