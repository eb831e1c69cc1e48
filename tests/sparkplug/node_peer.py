"""The Node peers in tests/sparkplug/peer (Eclipse Tahu's JavaScript libraries), installed by
``npm ci`` from the committed lockfile, and run as subprocesses speaking JSON lines."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.npm_peers import node_with_packages

PEER = Path(__file__).parent / "peer"


def node() -> str:
    """The ``node`` executable, with the pinned Tahu packages installed (the suite's independent Sparkplug peers)."""
    return node_with_packages(PEER, "Eclipse Tahu's Sparkplug peers")


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
