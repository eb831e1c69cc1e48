"""The birth/death sequence number, kept in the state folder so a restart never reuses one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class BdSeq:
    """``next()`` before each CONNECT: the last value + 1, wrapping 255 -> 0; 0 the first time."""

    def __init__(self, path: Path) -> None:
        """``path``: the file (0600) holding the last value used."""
        self.path = path
        self.value: int | None = None

    def _last(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            last = int(text)
        except ValueError:
            return None  # damaged: any value differs from a dead session's with high odds; 0 is as good as any
        return last if 0 <= last <= 255 else None

    def next(self) -> int:
        """The value for the next session, written to the file before it is used (fsynced)."""
        last = self._last()
        value = 0 if last is None else (last + 1) % 256
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{value}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self.value = value
        return value
