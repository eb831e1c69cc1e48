"""One pass over a bundle file: the signed manifest first, then each member against it, hashed as it streams.

``scan`` names every problem it finds (``models/yolo.onnx: sha256 mismatch``) for ``inspect``;
with ``strict`` it stops at the first, for an apply, before anything of a bad bundle is used. A
``Sink`` receives each member's bytes as they are read (the store's staging folder): a member is
only ever as large as the manifest declared it, whatever its header says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError, FileEntry, Manifest, check_path, parse_unverified
from agent.fleet.bundles.tarball import ArchiveError, Member, MemberReader, members
from agent.fleet.envelope import MAX_ENVELOPE_BYTES

CHUNK = 1024 * 1024


class Sink(Protocol):
    """Where verified members go, chunk by chunk."""

    def begin(self, entry: FileEntry) -> None:
        """A member starts."""

    def write(self, data: bytes) -> None:
        """Its next bytes."""

    def end(self, entry: FileEntry) -> None:
        """It ended with the declared size and hash."""


@dataclass
class Scan:
    """What a pass found: the manifest (None if unreadable), whether it verified, and every problem."""

    manifest: Manifest | None = None
    envelope: bytes = b""
    verified: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)  # (code, message)
    checked: list[str] = field(default_factory=list)  # paths whose size and hash matched

    def add(self, code: str, message: str, *, strict: bool) -> None:
        """Record a problem; raise it at once when ``strict``."""
        self.problems.append((code, message))
        if strict:
            raise BundleError(code, [message])


def scan(
    path: Path,
    *,
    check_envelope: Callable[[bytes], Manifest],
    strict: bool,
    sink: Sink | None = None,
) -> Scan:
    """Read ``path`` once. ``check_envelope`` verifies the manifest (raising BundleError).

    Raises:
        BundleError: with ``strict``, the first problem; without, only a file that cannot be opened.
        OSError: from the sink (a full disk), untouched.
    """
    result = Scan()
    try:
        with path.open("rb") as stream:
            _scan(stream, result, check_envelope, strict, sink)
    except FileNotFoundError:
        result.add("unreadable", f"{path}: no such file", strict=True)
    except IsADirectoryError:
        result.add("unreadable", f"{path}: a folder, not a bundle file", strict=True)
    except PermissionError as exc:
        result.add("unreadable", f"{path}: {exc.strerror}", strict=True)
    except ArchiveError as exc:
        result.add(exc.code, exc.message, strict=strict)
    except BundleError as exc:
        if strict:
            raise
        result.problems.extend((exc.code, p) for p in exc.problems)
    return result


def _scan(
    stream: BinaryIO, result: Scan, check_envelope: Callable[[bytes], Manifest], strict: bool, sink: Sink | None
) -> None:
    items = members(stream)
    first = next(items, None)
    if first is None:
        raise BundleError("malformed", ["the bundle is empty (no manifest)"])
    member, data = first
    if member.path != MANIFEST_NAME:
        raise BundleError("malformed", [f"the first member is {member.path!r}, not the manifest {MANIFEST_NAME}"])
    if member.size > MAX_ENVELOPE_BYTES:
        raise BundleError("too_large", [f"{MANIFEST_NAME}: {member.size} bytes, over {MAX_ENVELOPE_BYTES}"])
    result.envelope = data.read()
    try:
        result.manifest = check_envelope(result.envelope)
        result.verified = True
    except BundleError as exc:
        if strict:
            raise
        result.problems.extend((exc.code, p) for p in exc.problems)
        result.manifest = parse_unverified(result.envelope)  # to list the files anyway
    expected = list(result.manifest.files)
    for member, data in items:
        _member(member, data, expected, result, strict, sink)
    for entry in expected:
        result.add("missing", f"{entry.path}: in the manifest, not in the bundle", strict=strict)


def _member(
    member: Member, data: MemberReader, expected: list[FileEntry], result: Scan, strict: bool, sink: Sink | None
) -> None:
    try:
        check_path(member.path, "member")
    except BundleError as exc:
        result.add("unsafe_path", exc.problems[0], strict=strict)
        return
    entry = next((e for e in expected if e.path == member.path), None)
    if entry is None:
        result.add("unlisted", f"{member.path}: not in the manifest (or there twice)", strict=strict)
        return
    if entry is not expected[0]:
        result.add("malformed", f"{member.path}: out of the manifest's order", strict=strict)
    expected.remove(entry)
    if member.size != entry.size:
        result.add(
            "size_mismatch", f"{entry.path}: {member.size} bytes, the manifest declares {entry.size}", strict=strict
        )
        return
    digest = hashlib.sha256()
    if sink is not None:
        sink.begin(entry)
    while chunk := data.read(CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    if digest.hexdigest() != entry.sha256:
        result.add("sha256_mismatch", f"{entry.path}: sha256 mismatch", strict=strict)
        return
    if sink is not None:
        sink.end(entry)
    result.checked.append(entry.path)
