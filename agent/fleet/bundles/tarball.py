"""The bundle file: an uncompressed POSIX ustar archive, written and read member by member.

Why uncompressed tar, not zip: a tar is read front to back, so the signed manifest (the first
member) is verified before any other byte is used, and each member's size is known from its
header before its data, checked against the manifest's. Without compression nothing can expand:
no member is larger than the file on disk, no compression bomb. Zip keeps its directory at the end
and repeats each size in two places that may disagree; models (the bulk) barely compress anyway.

The reader is ours, not ``tarfile``'s: it accepts only regular files in plain ustar headers
(checksum checked), so a symbolic or hard link, a device file, a FIFO, a directory entry or a pax
or GNU extension header (which ``tarfile`` would read whole into memory) is refused by name.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
_KINDS = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory entry",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
}


class ArchiveError(Exception):
    """The archive's structure is wrong (``code``: ``truncated``, ``unsafe_member`` or ``malformed``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Member:
    """A regular file's header: its path and size (its data follows)."""

    path: str
    size: int


def _octal(field: bytes, what: str, path: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ArchiveError("malformed", f"{path}: the header's {what} is not an octal number") from None


def _header(block: bytes, offset: int) -> Member:
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    raw = prefix + b"/" + name if prefix else name
    path = raw.decode("utf-8", "replace")
    where = path or f"member at byte {offset}"
    stored = _octal(block[148:156], "checksum", where)
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise ArchiveError("malformed", f"{where}: header checksum mismatch (damaged at byte {offset})")
    if block[257:263] != b"ustar\0":
        raise ArchiveError("malformed", f"{where}: not a POSIX ustar header")
    kind = block[156:157]
    if kind not in (b"0", b"\0"):
        described = _KINDS.get(kind, f"a member of type {kind!r}")
        raise ArchiveError("unsafe_member", f"{where}: {described}; a bundle holds regular files only")
    return Member(path, _octal(block[124:136], "size", where))


def members(stream: BinaryIO) -> Iterator[tuple[Member, MemberReader]]:
    """Each member and a reader of exactly its ``size`` bytes, which must be read (or skipped) before the next.

    Raises:
        ArchiveError: a damaged or unsafe header, the file ending early, or bytes after the end.
    """
    offset = 0
    while True:
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            raise ArchiveError("truncated", f"the file ends at byte {offset + len(block)}, inside a header")
        if block == bytes(BLOCK):
            _end(stream, offset + BLOCK)
            return
        member = _header(block, offset)
        offset += BLOCK
        data = MemberReader(stream, member)
        yield member, data
        data.finish()
        offset += -(-member.size // BLOCK) * BLOCK


def _end(stream: BinaryIO, offset: int) -> None:
    """After the end-of-archive block: only zeros (a writer pads to its record size)."""
    while chunk := stream.read(64 * 1024):
        if chunk.count(0) != len(chunk):
            raise ArchiveError("malformed", f"data after the end of the archive (near byte {offset})")
        offset += len(chunk)


class MemberReader(io.RawIOBase):
    """Reads at most the member's size; a short read is the file truncated, named by member."""

    def __init__(self, stream: BinaryIO, member: Member) -> None:
        self._stream = stream
        self._member = member
        self._left = member.size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = self._stream.read(want) if want else b""
        if len(data) < want:
            done = self._member.size - self._left + len(data)
            raise ArchiveError(
                "truncated", f"{self._member.path}: the file ends after {done} of its {self._member.size} bytes"
            )
        self._left -= len(data)
        return data

    def finish(self) -> None:
        """Skip what the caller did not read, and the padding to the next block."""
        while self._left:
            self.read(min(self._left, 1024 * 1024))
        padding = -self._member.size % BLOCK
        if padding and len(self._stream.read(padding)) < padding:
            raise ArchiveError("truncated", f"{self._member.path}: the file ends inside its padding")


def _info(path: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # the same inputs give the same bytes
    return info


def header(path: str, size: int) -> bytes:
    """The ustar header block of a regular file."""
    return _info(path, size).tobuf(format=tarfile.USTAR_FORMAT)


def add(archive: tarfile.TarFile, path: str, data: BinaryIO, size: int) -> None:
    """Append a regular file (mode 0644, owner 0, time 0)."""
    archive.addfile(_info(path, size), data)


def writer(stream: BinaryIO) -> tarfile.TarFile:
    """A ustar writer onto ``stream`` (no pax headers: the reader refuses them)."""
    return tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)
