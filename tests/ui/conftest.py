"""Fixtures the page's tests share: one chromium per test module (Debian's, no download), a pseudo-terminal."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's package (./dev installs it): no browser download


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless chromium for the module's tests; each test opens its own context."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def pty_port() -> Iterator[str]:
    """A real pseudo-terminal's path: a serial port that exists on this machine."""
    leader, follower = os.openpty()
    try:
        yield os.ttyname(follower)
    finally:
        os.close(leader)
        os.close(follower)
