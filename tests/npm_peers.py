"""The suite's independent peers written for Node (node-opcua, Eclipse Tahu's Sparkplug packages):
``node`` with a folder's pinned packages installed by ``npm ci``."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest


def node_with_packages(folder: Path, peer: str) -> str:
    """The ``node`` executable, with ``folder``'s lockfile installed if missing or older than it.

    Fails (never skips) without node or npm: ``peer`` (what the tests run there) is an independent
    implementation the suite relies on.
    """
    hint = f"on Debian: apt-get install nodejs npm (the tests run npm ci in {folder} themselves)"
    found = shutil.which("node") or shutil.which("nodejs")
    if found is None:
        pytest.fail(f"node is not installed: the tests run {peer}; {hint}")
    lock = folder / "package-lock.json"
    installed = folder / "node_modules" / ".edge-agent-npm-ci"  # touched once npm ci succeeded
    with (folder / ".npm-ci.lock").open("w") as guard:  # pytest-xdist workers or parallel runs: one npm ci
        fcntl.flock(guard, fcntl.LOCK_EX)
        if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
            return found
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"npm is not installed, so {peer} cannot be: {hint}")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"npm ci in {folder} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        installed.touch()
    return found
