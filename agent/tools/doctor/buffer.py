"""The buffer: its folder writable by the service user, room on its volume, the file itself sound."""

from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

from agent.config.model import AgentConfigBase
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
    used = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return space_row(vfs.f_bavail * vfs.f_frsize, used, max_bytes, existing)


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
    """Access for the service user, ``PRAGMA quick_check`` read-only, size and events buffered."""
    from agent.store.outbox import SCHEMA_VERSION

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
    try:
        quick, version, count, oldest = read_buffer(path)
    except sqlite3.DatabaseError as exc:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"unreadable: {exc}",
            "the agent quarantines a corrupt buffer at start and salvages what it can; "
            "or stop it and move the file away",
        )
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    if quick != ["ok"]:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"quick_check: {'; '.join(quick[:2])}",
            "the agent quarantines a corrupt buffer at start and salvages what it can; "
            "or stop it and move the file away",
        )
    if version > SCHEMA_VERSION:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"schema version {version} is newer than this agent's",
            "run the newer agent, or stop and move the file away",
        )
    events = f"{count} events buffered"
    if count and oldest is not None:
        events += f", oldest from {datetime.fromtimestamp(oldest, UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}"
    return Row("buffer", str(path), "ok", f"quick_check ok, {human_size(size)}, {events}")


def read_buffer(path: Path) -> tuple[list[str], int, int, float | None]:
    """(quick_check lines, user_version, rows in outbox, oldest created) without writing anything.

    A read-only WAL connection creates ``-wal``/``-shm`` files when they are missing, and
    they would belong to whoever runs the doctor (root), locking the agent out. Without them
    the file is complete, so it is opened immutable; with them SQLite only reads; files it
    still creates are given the database's owner.
    """
    sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    existed = {p: p.exists() for p in sidecars}
    mode = "mode=ro" if any(existed.values()) else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=5)
    try:
        quick = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        count, oldest = (
            conn.execute("SELECT count(*), min(created) FROM outbox").fetchone() if "outbox" in tables else (0, None)
        )
    finally:
        conn.close()
        owner = path.stat()
        for p in sidecars:
            if not existed[p] and p.exists():
                with suppress(OSError):
                    os.chown(p, owner.st_uid, owner.st_gid)
    return quick, version, int(count), oldest
