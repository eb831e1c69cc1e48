"""Diagnostics bundles on the gateway: built once as a ``.tar.gz``, then fetched part by part.

A reply is at most 128 KiB, so a bundle travels in parts of ``PART_SIZE`` bytes (base64 in
JSON: about 87 KiB a reply). The files live in ``<buffer folder>/fleet/diagnostics/`` (folder
0700, files 0600) for ``KEEP_SECONDS``, at most ``KEEP_BUNDLES`` of them; older ones are
removed whenever a bundle is built or asked for.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

MAX_BUNDLE = 5 * 1000 * 1000  # bytes of .tar.gz at most
PART_SIZE = 64 * 1024  # raw bytes per reply: 5 MB is 77 parts, within 120 requests a minute
KEEP_SECONDS = 600.0
KEEP_BUNDLES = 2
SUFFIX = ".tar.gz"
BUNDLE_ID = re.compile(r"^diag-[0-9TZ]{16}-[0-9a-f]{8}$")


@dataclass(frozen=True)
class Bundle:
    """A built bundle: its id, size, sha256 and how many parts it travels in."""

    id: str
    size: int
    sha256: str
    parts: int
    part_size: int = PART_SIZE

    def to_json(self) -> dict[str, object]:
        """The reply to the build request."""
        return {
            "bundle": self.id,
            "size": self.size,
            "sha256": self.sha256,
            "parts": self.parts,
            "part_size": self.part_size,
        }


class BundleTooLarge(Exception):
    """Even the smallest version of the bundle is over ``MAX_BUNDLE``."""


class BundleStore:
    """The folder of bundles: write one, read a part, forget old ones."""

    def __init__(self, folder: Path) -> None:
        """Nothing is created until the first bundle."""
        self.folder = folder

    def write(self, members: dict[str, bytes], now: float | None = None) -> Bundle:
        """A ``.tar.gz`` of ``members`` (name -> content) under a new id (blocking: run it in a thread).

        Raises:
            BundleTooLarge: the archive would exceed ``MAX_BUNDLE``.
        """
        moment = time.time() if now is None else now
        stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y%m%dT%H%M%SZ")
        bundle_id = f"diag-{stamp}-{secrets.token_hex(4)}"
        data = _archive(bundle_id, members, moment)
        if len(data) > MAX_BUNDLE:
            raise BundleTooLarge(f"the bundle is {len(data)} bytes, over {MAX_BUNDLE}")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)  # made earlier, or under a wider umask
        self.prune(moment, keep=KEEP_BUNDLES - 1)
        final = self.folder / f"{bundle_id}{SUFFIX}"
        partial = final.with_name(f".{final.name}.part")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            partial.replace(final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        parts = max(1, -(-len(data) // PART_SIZE))
        return Bundle(bundle_id, len(data), hashlib.sha256(data).hexdigest(), parts)

    def part(self, bundle_id: str, index: int, now: float | None = None) -> bytes | None:
        """Part ``index`` (from 0) of a kept bundle; None if there is no such bundle (or it expired)."""
        self.prune(time.time() if now is None else now)
        if not BUNDLE_ID.match(bundle_id):
            return None
        try:
            with (self.folder / f"{bundle_id}{SUFFIX}").open("rb") as file:
                file.seek(index * PART_SIZE)
                return file.read(PART_SIZE)
        except FileNotFoundError:
            return None

    def prune(self, now: float, keep: int = KEEP_BUNDLES) -> None:
        """Remove bundles older than ``KEEP_SECONDS``, and all but the newest ``keep``; leftovers too."""
        try:
            entries = list(self.folder.iterdir())
        except FileNotFoundError:
            return
        bundles: list[tuple[float, Path]] = []
        for path in entries:
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if path.name.endswith(SUFFIX) and not path.name.startswith("."):
                bundles.append((age, path))
            elif age > KEEP_SECONDS:  # a partial file a crash left behind
                path.unlink(missing_ok=True)
        bundles.sort()
        for index, (age, path) in enumerate(bundles):
            if age > KEEP_SECONDS or index >= keep:
                path.unlink(missing_ok=True)


def _archive(bundle_id: str, members: dict[str, bytes], moment: float) -> bytes:
    """The members as files under ``<bundle_id>/``, mode 0600, gzip-compressed."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=6) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(f"{bundle_id}/{name}")
            info.size, info.mtime, info.mode = len(content), int(moment), 0o600
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()
