"""The Node peers in tests/sparkplug/peer (Eclipse Tahu's JavaScript libraries), installed by
``npm ci`` from the committed lockfile, and run as subprocesses speaking JSON lines."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

PEER = Path(__file__).parent / "peer"
HINT = "on Debian: apt-get install nodejs npm (the tests run npm ci in tests/sparkplug/peer themselves)"


def node() -> str:
    """The ``node`` executable, with the pinned packages installed if missing or older than the lockfile.

    Fails (never skips) without node or npm: these are the suite's independent Sparkplug peers.
    """
    found = shutil.which("node") or shutil.which("nodejs")
    if found is None:
        pytest.fail(f"node is not installed: {HINT}")
    lock = PEER / "package-lock.json"
    installed = PEER / "node_modules" / ".edge-agent-npm-ci"  # touched once npm ci succeeded
    with (PEER / ".npm-ci.lock").open("w") as guard:  # pytest-xdist workers or parallel runs: one npm ci
        fcntl.flock(guard, fcntl.LOCK_EX)
        if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
            return found
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"npm is not installed: {HINT}")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PEER, capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"npm ci in {PEER} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        installed.touch()
    return found


class NodeScript:
    """A script of tests/sparkplug/peer: commands on stdin, JSON lines on stdout, kept as they come."""

    def __init__(self, script: str, *args: str) -> None:
        self.lines: list[dict[str, Any]] = []
        self.garbage: list[str] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([node(), str(PEER / script), *args], cwd=PEER, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                parsed = json.loads(line)
            except ValueError:
                with self.lock:
                    self.garbage.append(line)
                continue
            with self.lock:
                self.lines.append(parsed)

    def seen(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [x for x in self.lines if x.get("event") == event]

    def wait(self, event: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = wait_for(lambda: len(self.seen(event)) >= count and self.seen(event), timeout,
                                               f"{count} '{event}' from the node peer")  # fmt: skip
        return found

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code
