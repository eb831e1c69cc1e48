"""Cutting frames out of a serial byte stream, whatever the chunking, and naming each fault.

Both parsers are fed bytes as they arrive and return, in stream order, every complete
:class:`Frame` and every :class:`BadFrame`. They never raise on input and never grow
without bound. The result does not depend on how the stream was split into chunks.

How faults are counted (one count per damaged stretch, so counts can be checked exactly):

Binary framing
    - ``no_sync``: a run of bytes before a sync that belong to no frame (line noise,
      the head of a frame whose sync was lost). A run counts once however long it is.
    - ``bad_checksum``: a sync followed by a frame whose checksum fails: a corrupted or a
      cut-off frame. After one, the parser looks for the next sync from the byte after the
      failed sync (a cut-off frame is followed by a good one *inside* its length). The failed
      frame owns ``length`` bytes: another failing candidate or skipped bytes within them
      belong to it and are not counted again; skipped bytes beyond them are a new ``no_sync``.

Line framing
    - ``no_sync``: bytes before the frame on a line (noise, or a cut-off line the next frame
      was glued to) when ``resync`` finds a matching tail; or a line longer than ``max_line``
      bytes (counted before a trailing CR is dropped).
    - ``undecodable``: a line that is not valid text in the encoding (and has no matching tail).
    - ``mismatch``: a line that is valid text but does not match the pattern.
    Empty lines are skipped without counting (CR LF and blank keep-alives are common).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.contract.floats import shortest_float32
from drivers.serial.checksums import FUNCTIONS, SIZES
from drivers.serial.config import FramingConfig

FaultReason = Literal["no_sync", "bad_checksum", "mismatch", "undecodable"]
FAULT_REASONS: tuple[FaultReason, ...] = ("no_sync", "bad_checksum", "mismatch", "undecodable")
FrameValue = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Frame:
    """A good frame: values by group name (line framing) or by index (binary framing)."""

    values: dict[str | int, FrameValue]
    raw: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A damaged stretch of the stream; ``detail`` is for the log (short, printable)."""

    reason: FaultReason
    detail: str


Result = Frame | BadFrame


class FrameParser(Protocol):
    """What the driver needs from a parser."""

    def feed(self, data: bytes) -> list[Result]:
        """Take the next bytes of the stream; return the frames and faults they complete."""
        ...

    def reset(self) -> None:
        """Forget buffered bytes (the port was reopened: they will never be completed)."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        ...


def _groups(match: re.Match[str]) -> dict[str | int, FrameValue]:
    return dict(match.groupdict().items())


def _show(data: bytes, limit: int = 24) -> str:
    """A short hex excerpt for a log line."""
    text = data[:limit].hex(" ")
    return text + (" ..." if len(data) > limit else "")


def float32_fields(layout: str) -> tuple[int, ...]:
    """Indexes of the values a struct layout unpacks from ``f`` (float32) items.

    ``x`` pads give no value, ``s``/``p`` one value whatever their count, others one per count.
    """
    found: list[int] = []
    index, count = 0, ""
    for char in layout.lstrip("@=<>!"):
        if char.isdigit():
            count += char
            continue
        n = int(count) if count else 1
        count = ""
        if char == "x":
            continue
        if char in "sp":
            index += 1
            continue
        if char == "f":
            found += range(index, index + n)
        index += n
    return tuple(found)


class BinaryParser:
    """Fixed-length frames: ``sync + payload (struct layout) + checksum``."""

    def __init__(self, framing: FramingConfig) -> None:
        """Prepare from a validated ``kind: binary`` framing."""
        assert framing.layout is not None, "kind: binary framing expected"
        assert framing.checksum is not None, "kind: binary framing expected"
        self._sync = framing.sync_bytes
        self._layout = struct.Struct(framing.layout)
        self._float32 = float32_fields(framing.layout)
        self._length = framing.frame_length
        self._check = FUNCTIONS[framing.checksum]
        self._check_size = SIZES[framing.checksum]
        self._byteorder: Literal["little", "big"] = framing.checksum_byteorder
        self._covers_sync = framing.checksum_over == "sync+payload"
        self.reset()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (at most one frame's length)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget buffered bytes and fault state."""
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._claimed = 0  # stream offset up to which bytes belong to a counted fault
        self._skip_run_open = False  # the last bytes skipped started (or continued) a no_sync run

    def feed(self, data: bytes) -> list[Result]:
        """Append ``data`` and return what it completes."""
        self._buf += data
        out: list[Result] = []
        sync, length = self._sync, self._length
        while True:
            at = self._buf.find(sync)
            if at < 0:
                # Keep a tail that may be the start of a sync split across chunks.
                self._skip(len(self._buf) - (len(sync) - 1), out)
                return out
            self._skip(at, out)
            if len(self._buf) < length:
                return out  # wait for the rest of the frame
            frame = bytes(self._buf[:length])
            values = self._decode(frame)
            if values is not None:
                out.append(Frame(dict(enumerate(values)), frame))
                self._consume(length)
                self._skip_run_open = False
                self._claimed = self._pos
                continue
            if self._pos >= self._claimed:
                out.append(BadFrame("bad_checksum", _show(frame)))
                self._claimed = self._pos + length
            # else: a sync inside an already counted damaged frame, part of that damage.
            self._skip_run_open = False
            # Resynchronise from the next byte: a cut-off frame is followed by a good one
            # that starts within this candidate's length.
            self._consume(1)

    def _decode(self, frame: bytes) -> tuple[int | float | bool, ...] | None:
        sync_len = len(self._sync)
        payload_end = len(frame) - self._check_size
        if self._check_size:
            covered = frame[:payload_end] if self._covers_sync else frame[sync_len:payload_end]
            expected = self._check(covered).to_bytes(self._check_size, self._byteorder)
            if frame[payload_end:] != expected:
                return None
        values: tuple[int | float | bool, ...] = self._layout.unpack(frame[sync_len:payload_end])
        if self._float32:
            # 230.1, not 230.10000610351562: the digits a float32 holds (agent/contract/floats.py).
            listed = list(values)
            for i in self._float32:
                listed[i] = shortest_float32(float(listed[i]))
            values = tuple(listed)
        return values

    def _skip(self, count: int, out: list[Result]) -> None:
        """Drop ``count`` bytes that belong to no frame, counting a new no_sync run once."""
        if count <= 0:
            return
        start, end = self._pos, self._pos + count
        if end > self._claimed:
            if not self._skip_run_open:
                skipped = bytes(self._buf[max(0, self._claimed - start) : count])
                out.append(BadFrame("no_sync", f"{end - max(start, self._claimed)}+ bytes: {_show(skipped)}"))
            self._skip_run_open = True
            self._claimed = end
        self._consume(count)

    def _consume(self, count: int) -> None:
        del self._buf[:count]
        self._pos += count


class LineParser:
    """Text lines matched whole by a regular expression with named groups."""

    def __init__(self, framing: FramingConfig) -> None:
        """Prepare from a validated ``kind: line`` framing."""
        assert framing.pattern is not None, "kind: line framing expected"
        self._pattern = re.compile(framing.pattern)
        self._encoding = framing.encoding
        self._terminator = framing.terminator.encode(framing.encoding)
        self._strip_cr = self._terminator == b"\n"
        self._max_line = framing.max_line
        self._resync = framing.resync
        self.reset()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line (at most max_line plus a terminator)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget buffered bytes."""
        self._buf = bytearray()
        self._discarding = False  # inside an overlong line, already counted

    def feed(self, data: bytes) -> list[Result]:
        """Append ``data`` and return what it completes."""
        self._buf += data
        out: list[Result] = []
        term = self._terminator
        while True:
            end = self._buf.find(term)
            if end < 0:
                if len(self._buf) > self._max_line + len(term) - 1:
                    # Keep a tail that may be the start of a split terminator.
                    keep = len(term) - 1
                    if not self._discarding:
                        out.append(BadFrame("no_sync", f"no terminator within {self._max_line} bytes"))
                        self._discarding = True
                    del self._buf[: len(self._buf) - keep]
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + len(term)]
            if self._discarding:
                self._discarding = False  # the end of the overlong line
                continue
            # Measured before the CR is dropped, as while the line is still incomplete:
            # the verdict must not depend on where the chunks were cut.
            if len(line) > self._max_line:
                out.append(BadFrame("no_sync", f"line of {len(line)} bytes, longer than max_line"))
                continue
            if self._strip_cr and line.endswith(b"\r"):
                line = line[:-1]
            if line:
                out += self._parse(line)

    def _parse(self, line: bytes) -> list[Result]:
        text = self._text(line)
        if text is not None and (match := self._pattern.fullmatch(text)):
            return [Frame(_groups(match), line)]
        if self._resync:
            # The longest matching tail: noise or a cut-off frame glued to the front of a good one.
            for start in range(1, len(line)):
                tail = self._text(line[start:])
                if tail is not None and (match := self._pattern.fullmatch(tail)):
                    skipped = BadFrame("no_sync", f"{start} bytes before the frame: {_show(line[:start])}")
                    return [skipped, Frame(_groups(match), line[start:])]
        if text is None:
            return [BadFrame("undecodable", f"not {self._encoding}: {_show(line)}")]
        return [BadFrame("mismatch", repr(text[:60]))]

    def _text(self, line: bytes) -> str | None:
        try:
            return line.decode(self._encoding)
        except UnicodeDecodeError:
            return None
