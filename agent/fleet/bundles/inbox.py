"""The local hand-over: ``edge-agent bundle apply FILE`` gives a bundle to the running agent through a folder.

``<bundles>/inbox/`` (0700, the agent's user) is the channel: the tool copies the file in as
``<token>.part`` and renames it ``<token>.bundle``; the agent, looking every ``POLL`` seconds,
claims it by renaming it ``<token>.taken`` (a rename either side wins exactly once), applies it
and writes each step to ``<token>.status.json``, the last one ``applied``, ``rolled_back`` or
``refused``. ``agent.pid`` says an agent is there to take it.

Why a folder, not the loopback HTTP server: every local user can reach a loopback port, and that
server has no authentication; the folder's mode makes the file system the authentication (only
the agent's user or root may hand a bundle over), and a bundle is a file already.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from agent.fleet.nonces import _write_atomically

log = logging.getLogger(__name__)

POLL = 0.25  # seconds between looks at the inbox (a directory listing: cheap)
CLAIM_TIMEOUT = 10.0  # seconds the tool waits for a running agent to take the file
PID_NAME = "agent.pid"
FINAL = ("applied", "rolled_back", "refused")

Apply = Callable[[Path, Callable[[dict[str, Any]], None], bytes | None], Awaitable[dict[str, Any]]]


def inbox_dir(root: Path) -> Path:
    """The inbox of the bundles folder ``root``."""
    return root / "inbox"


# ---- the agent's side ----------------------------------------------------------------
async def serve(root: Path, apply: Apply) -> None:
    """Take bundles from the inbox until cancelled; ``apply(path, on_status)`` applies one."""
    folder = inbox_dir(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # parents=True alone would leave root at the umask's mode
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    pid = folder / PID_NAME
    _write_atomically(pid, str(os.getpid()).encode())
    try:
        for stale in folder.glob("*.taken"):  # an apply this agent's predecessor never finished
            stale.unlink(missing_ok=True)
        while True:
            for taken in _claim(folder):
                token = taken.name.removesuffix(".taken")
                status = folder / f"{token}.status.json"

                def write(doc: dict[str, Any], status: Path = status) -> None:
                    _write_atomically(status, json.dumps(doc, default=str).encode())

                allow = folder / f"{token}.allow"  # a downgrade directive, if the tool was given one
                try:
                    directive = allow.read_bytes() if allow.exists() else None
                    write(await apply(taken, write, directive))
                except Exception as exc:  # a bug: the tool still gets an answer
                    log.exception("the bundle handed over as %s could not be applied", token)
                    write({"state": "refused", "code": "internal", "reason": f"{type(exc).__name__}: {exc}"})
                finally:
                    taken.unlink(missing_ok=True)
                    allow.unlink(missing_ok=True)
            await asyncio.sleep(POLL)
    finally:
        with suppress(OSError):
            if pid.read_text() == str(os.getpid()):
                pid.unlink()


def _claim(folder: Path) -> Iterator[Path]:
    for offered in sorted(folder.glob("*.bundle")):
        taken = offered.with_suffix(".taken")
        try:
            offered.rename(taken)
        except FileNotFoundError:  # withdrawn by the tool meanwhile
            continue
        yield taken


# ---- the tool's side -----------------------------------------------------------------
def agent_running(root: Path) -> int | None:
    """The pid of the agent serving this inbox, if it is alive."""
    try:
        pid = int((inbox_dir(root) / PID_NAME).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def hand_over(
    root: Path, file: Path, on_status: Callable[[dict[str, Any]], None], *, wait: float, allow: bytes | None = None
) -> dict[str, Any] | None:
    """Give ``file`` to the running agent and follow it to its outcome; None if no agent took it.

    Raises:
        OSError: the file could not be copied into the inbox (a full disk: nothing was handed over).
        TimeoutError: taken, but no outcome within ``wait`` seconds (the agent goes on with it), or the
            agent stopped meanwhile.
    """
    folder = inbox_dir(root)
    size = file.stat().st_size
    vfs = os.statvfs(folder)
    free, reserve = vfs.f_bavail * vfs.f_frsize, max(1024 * 1024, vfs.f_blocks * vfs.f_frsize // 20)
    if 2 * size + reserve > free:  # the copy, then its unpacked files, and the buffer's reserve
        raise OSError(errno.ENOSPC, f"{file} ({size} bytes) would not fit twice with {reserve} bytes left for the"
                      f" buffer: {free} are free on {folder}")  # fmt: skip
    token = secrets.token_hex(8)
    part, offered = folder / f"{token}.part", folder / f"{token}.bundle"
    if allow is not None:  # beside the bundle before the bundle appears: the agent reads both together
        _write_atomically(folder / f"{token}.allow", allow)
    try:
        with file.open("rb") as src, open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        part.rename(offered)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    deadline = time.monotonic() + CLAIM_TIMEOUT
    while offered.exists():
        if time.monotonic() > deadline:
            try:
                offered.unlink()  # withdrawn: the agent never took it
                (folder / f"{token}.allow").unlink(missing_ok=True)
                return None
            except FileNotFoundError:
                break  # taken at this very moment
        time.sleep(0.05)
    status_path = folder / f"{token}.status.json"
    seen: dict[str, Any] | None = None
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            with suppress(FileNotFoundError, ValueError):
                doc = json.loads(status_path.read_bytes())
                if doc != seen:
                    seen = doc
                    on_status(doc)
                    if doc.get("state") in FINAL:
                        return dict(doc)
            if agent_running(root) is None:
                raise TimeoutError(
                    "the agent stopped before the outcome: its next start rolls an unfinished apply back"
                )
            time.sleep(0.1)
    finally:
        if seen is not None and seen.get("state") in FINAL:
            status_path.unlink(missing_ok=True)
    raise TimeoutError(f"no outcome within {wait:.0f} s; the agent goes on: see its bundle report and log")
