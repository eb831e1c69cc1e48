"""Unpacking a bundle's members into a staging folder: each file created new (0600), fsynced, folders 0700.

Only paths the manifest declared (already checked: relative, no ``..``) are created, each with
``O_EXCL | O_NOFOLLOW`` below a folder this process made, so nothing outside the staging folder
can be reached, even through a link planted there.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from pathlib import Path

from agent.fleet.bundles.manifest import FileEntry


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFull(OSError):
    """The file system filled while unpacking (or could not be written): names the member."""


class StagingSink:
    """Writes verified members under ``folder`` (made by the caller, mode 0700)."""

    def __init__(self, folder: Path) -> None:
        """``folder``: an empty folder on the store's file system."""
        self.folder = folder
        self._fd: int | None = None
        self._entry: FileEntry | None = None
        self._dirs: set[Path] = {folder}

    def begin(self, entry: FileEntry) -> None:
        """Create the member's file (and its folders), empty."""
        target = self.folder / entry.path
        self._entry = entry
        try:
            for parent in reversed(target.relative_to(self.folder).parents[:-1]):
                folder = self.folder / parent
                if folder not in self._dirs:
                    os.mkdir(folder, 0o700)
                    self._dirs.add(folder)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(target, flags, 0o600)
        except OSError as exc:
            raise self._named(exc) from exc

    def write(self, data: bytes) -> None:
        """Append the next bytes of the current member."""
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise self._named(exc) from exc

    def end(self, entry: FileEntry) -> None:
        """The member is complete: fsync and close it."""
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise self._named(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        """Close a member left open by an error."""
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def sync_folders(self) -> None:
        """Every folder made, deepest first: their entries reach the disk before the rename."""
        for folder in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)

    def _named(self, exc: OSError) -> DiskFull:
        where = self._entry.path if self._entry is not None else "?"
        what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return DiskFull(exc.errno or 0, f"cannot unpack {where}: {what}")
