"""Fixtures of the store's tests."""

from __future__ import annotations

import pytest

from agent.store import feed as feed_module


@pytest.fixture
def tiny_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three events per class in memory: the tail overflows and the file path is exercised too."""
    monkeypatch.setattr(feed_module, "TAIL_MAX", 3)
