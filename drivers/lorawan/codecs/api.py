"""The seam between the LoRaWAN driver and its payload codecs: what a codec takes, returns and raises.

A codec turns one uplink's application payload (``fPort`` and ``frm_payload`` bytes) into a
:class:`Decoded`, or raises :class:`CodecError` naming the field and byte offset that failed.
It raises nothing else, for any bytes on any port (the tests hold every codec to that with
random input), so the driver can count and report an undecodable uplink and carry on.

Readings of sensors use the meter vocabulary (agent/contract/vocabulary.py): ``name`` is a
quantity there when one fits (temperature, humidity, distance) and ``unit`` is its unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal, Protocol

Kind = Literal["status", "heartbeat", "startup", "registration", "info", "usage", "debug", "measurement"]
Role = Literal["detector", "sensor"]
BatteryClass = Literal["ok", "low", "critical"]
# Why a payload did not decode, for counting by reason (the driver's poll-failure metric label).
Reason = Literal["too_short", "unknown_port", "out_of_range", "malformed"]

EMPTY: Mapping[str, Any] = MappingProxyType({})


class CodecError(ValueError):
    """A payload the codec cannot decode; the message names the field and its byte offset.

    ``str(error)`` reads e.g. ``fPort 2 heartbeat: byte 1 (temperature): payload too short (1 of 3 bytes)``.
    """

    def __init__(self, where: str, field: str, offset: int | None, problem: str, reason: Reason) -> None:
        at = f"byte {offset} ({field})" if offset is not None else field
        super().__init__(f"{where}: {at}: {problem}")
        self.where = where  # "fPort 2 heartbeat"
        self.field = field
        self.offset = offset
        self.problem = problem
        self.reason: Reason = reason


@dataclass(frozen=True)
class Reading:
    """One measured value. ``time`` is set only for stored records that carry their own timestamp."""

    name: str
    value: float | bool | int
    unit: str | None
    time: datetime | None = None


@dataclass(frozen=True)
class Decoded:
    """What one uplink says. Fields a message does not carry stay None (empty for ``readings``/``extra``)."""

    kind: Kind
    occupied: bool | None = None  # detectors: the bay's state as the detector reports it
    previous_state_minutes: int | None = None  # how long the previous state lasted; None: overflow or not sent
    readings: tuple[Reading, ...] = ()
    battery_volts: float | None = None
    battery_percent: float | None = None
    battery_class: BatteryClass | None = None
    # firmware, reset cause, debug codes, tag ids...
    extra: Mapping[str, Any] = dataclass_field(default_factory=lambda: EMPTY)


class Codec(Protocol):
    """A device model's payload format."""

    name: str  # "nwave-nps405", "nwave-nps310", "bosch-tps110", "milesight-em300-th", "milesight-em400-mud"
    role: Role

    def decode(self, f_port: int, payload: bytes, received: datetime) -> Decoded:
        """Decode one uplink; ``received`` is the server's receive time (anchors relative timestamps).

        Raises :class:`CodecError` and nothing else.
        """
        ...
