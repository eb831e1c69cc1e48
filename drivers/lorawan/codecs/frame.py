"""Bounds-checked reads from one uplink payload, raising :class:`CodecError` that names field and offset.

Every codec reads through a :class:`Frame`, so a short payload never becomes an IndexError: the
first field that does not fit is the one the error names.
"""

from __future__ import annotations

from drivers.lorawan.codecs.api import CodecError, Reason

# LoRaWAN application ports; 0 carries MAC commands only, 224 and up are reserved.
APPLICATION_PORTS = range(1, 224)


def unknown_port(codec: str, f_port: int, known: tuple[int, ...] | None = None) -> CodecError:
    """The error for a port a codec defines no message on (``known``: the ports it does define)."""
    listed = f" (it defines {', '.join(map(str, known))})" if known else ""
    return CodecError(f"fPort {f_port}", "fPort", None, f"no {codec} message on this port{listed}", "unknown_port")


class Frame:
    """A payload being read: ``where`` ("fPort 2 heartbeat") prefixes errors; ``size`` is the length it needs."""

    def __init__(self, where: str, payload: bytes, size: int) -> None:
        self.where = where
        self.payload = payload
        self.size = size

    def error(self, field: str, offset: int | None, problem: str, reason: Reason) -> CodecError:
        return CodecError(self.where, field, offset, problem, reason)

    def take(self, offset: int, count: int, field: str) -> bytes:
        """``count`` bytes at ``offset``; too short names ``field`` at ``offset``."""
        end = offset + count
        if end > len(self.payload):
            need = max(self.size, end)
            problem = f"payload too short ({len(self.payload)} of {need} bytes)"
            raise self.error(field, offset, problem, "too_short")
        return self.payload[offset:end]

    def u8(self, offset: int, field: str) -> int:
        return self.take(offset, 1, field)[0]

    def i8(self, offset: int, field: str) -> int:
        return int.from_bytes(self.take(offset, 1, field), "little", signed=True)

    def u16le(self, offset: int, field: str) -> int:
        return int.from_bytes(self.take(offset, 2, field), "little")

    def i16le(self, offset: int, field: str) -> int:
        return int.from_bytes(self.take(offset, 2, field), "little", signed=True)

    def u32le(self, offset: int, field: str) -> int:
        return int.from_bytes(self.take(offset, 4, field), "little")

    def u32be(self, offset: int, field: str) -> int:
        return int.from_bytes(self.take(offset, 4, field), "big")

    def choice(self, offset: int, field: str, labels: tuple[str | None, ...]) -> str:
        """The label a code byte stands for; a code with no label reads ``code N`` (firmware may add causes)."""
        code = self.u8(offset, field)
        label = labels[code] if code < len(labels) else None
        return label if label is not None else f"code {code}"
