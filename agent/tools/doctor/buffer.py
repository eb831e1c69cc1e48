"""The buffer: its folder writable by the service user, room on its volume, the file itself sound."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from agent.config.model import AgentConfigBase
from agent.store.inspect import disk_bytes, inspect_buffer
from agent.tools.doctor.access import R, ServiceUser, W, X, access_fix, denied, describe
from agent.tools.doctor.report import Row, human_size

MIN_FREE_BYTES = 16 * 1024 * 1024  # below this the buffer cannot work at all


def check_buffer(config: AgentConfigBase, user: ServiceUser) -> list[Row]:
    """The buffer's folder (writable), its volume's free space, and the file itself if present."""
    path = config.buffer.path
    folder = path.parent
    rows: list[Row] = []
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        return [
            Row(
                "buffer",
                str(folder),
                "FAIL",
                f"not a folder: {describe(folder.stat())}",
                "set buffer.path to a file in a folder",
            )
        ]
    problem = denied(existing, user, W | X)
    if problem is not None:
        fix = access_fix(problem, user, home="/var/lib/edge-agent, systemd's StateDirectory=edge-agent")
        rows.append(Row("buffer", str(folder), "FAIL", problem.finding, fix))
    elif existing == folder:
        rows.append(Row("buffer", str(folder), "ok", f"folder writable by {user.name}"))
    else:
        rows.append(Row("buffer", str(folder), "ok", f"missing; {user.name} can create it in {existing}"))
    rows.append(_space_row(existing, path, config.buffer.max_bytes))
    if path.exists():
        rows.append(check_buffer_file(path, user))
    return rows


def _space_row(existing: Path, path: Path, max_bytes: int) -> Row:
    vfs = os.statvfs(existing)
    return space_row(vfs.f_bavail * vfs.f_frsize, disk_bytes(path), max_bytes, existing)


def space_row(free: int, used: int, max_bytes: int, volume: Path = Path("/")) -> Row:
    """FAIL under 16 MiB free; warn if a full buffer (``max_bytes``) would not fit in free + ``used``."""
    finding = f"{human_size(free)} free, buffer bound {human_size(max_bytes)}"
    if free < MIN_FREE_BYTES:
        return Row(
            "buffer",
            "free space",
            "FAIL",
            finding,
            f"free space on the volume of {volume} (journalctl --vacuum-size, old logs), "
            "or move buffer.path to a larger volume",
        )
    if free + used < max_bytes:
        return Row(
            "buffer",
            "free space",
            "warn",
            finding + ": a full buffer would not fit",
            f"lower buffer.max_bytes to {human_size((free + used) * 0.8)} or free space on the volume of {volume}",
        )
    return Row("buffer", "free space", "ok", finding)


def check_buffer_file(path: Path, user: ServiceUser) -> Row:
    """Access for the service user, the file checked read-only (quick_check), its size and events buffered."""
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if file.exists():
            problem = denied(file, user, R | W)
            if problem is not None:
                return Row(
                    "buffer",
                    str(path),
                    "FAIL",
                    f"{file.name}: {problem.finding}",
                    f"chown {user.name}:{user.group_name} {path}*",
                )
    summary = inspect_buffer(path)
    if summary.problem is not None:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            summary.problem,
            "the agent quarantines a corrupt buffer at start and salvages what it can; "
            "or stop it and move the file away",
        )
    if summary.newer_schema:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"schema version {summary.schema_version} is newer than this agent's",
            "run the newer agent, or stop and move the file away",
        )
    events = f"{summary.rows} events buffered"
    if summary.rows and summary.oldest_created is not None:
        oldest = datetime.fromtimestamp(summary.oldest_created, UTC)
        events += f", oldest from {oldest.strftime('%Y-%m-%d %H:%M:%S UTC')}"
    return Row("buffer", str(path), "ok", f"quick_check ok, {human_size(summary.disk_bytes)}, {events}")
