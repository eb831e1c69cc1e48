"""Milesight's channel/type/value (TLV) payloads: one decoder, one channel table per model.

Written from Milesight-IoT/SensorDecoders at commit e79c9d8b25ec66b6aad34c9240cfaa2ccd1353e3: the
payload tables of ``em-series/em300-th/README.md`` and ``em-series/em400-mud/README.md`` (last
changed in commit 6aeb1ebd1fb403f14073c77954ff47a86ab887f2), with the attribute lengths (serial
number: 8 bytes) as ``em-series/*/…-decoder.js`` of that commit read them.

A payload is a run of channels: channel id (1 byte), type (1 byte), then a fixed number of data
bytes that the pair determines. Numbers are little-endian. A model's table is data
(:class:`Channel` and :class:`Field`); adding a model means adding a table, not code.

An unknown pair cannot be skipped (its length is unknown). Under channel 0xFE/0xFF it is a reply
to a configuration downlink, which the agent does not send; decoding stops there and keeps the
rest as hex in ``extra["unparsed"]``. Any other unknown pair is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from drivers.lorawan.codecs.api import Decoded, Kind, Reading, Role
from drivers.lorawan.codecs.frame import APPLICATION_PORTS, Frame, unknown_port

Format = Literal["u8", "i16le", "u16le", "u32le", "hex8", "hardware", "firmware", "tsl"]
# reading: a Reading (value / divisor); flag: a Reading of whether the code is 1; battery: battery_percent;
# extra: extra[name] (a label when labels are given); time: the timestamp of the channel's readings listed after it.
Target = Literal["reading", "flag", "battery", "extra", "time"]
SIZES: Mapping[str, int] = {
    "u8": 1,
    "i16le": 2,
    "u16le": 2,
    "u32le": 4,
    "hex8": 8,
    "hardware": 2,
    "firmware": 2,
    "tsl": 2,
}


@dataclass(frozen=True)
class Field:
    """One value inside a channel's data, ``offset`` bytes from its start."""

    name: str
    offset: int
    fmt: Format
    to: Target = "reading"
    divisor: int = 1  # the value sent is this many times the reading
    unit: str | None = None
    labels: Mapping[int, str] | None = None  # the codes the value may take (others are out of range)
    limit: float | None = None  # the largest valid value (after the divisor)


@dataclass(frozen=True)
class Channel:
    label: str
    length: int
    fields: tuple[Field, ...]


TEMPERATURE = Field("temperature", 0, "i16le", divisor=10, unit="degC")
ALARM = {0: "threshold_alarm_release", 1: "threshold_alarm"}

ATTRIBUTES: Mapping[tuple[int, int], Channel] = {
    (0xFF, 0x01): Channel("ipso version", 1, (Field("ipso_version", 0, "u8", "extra"),)),
    (0xFF, 0x09): Channel("hardware version", 2, (Field("hardware_version", 0, "hardware", "extra"),)),
    (0xFF, 0x0A): Channel("firmware version", 2, (Field("firmware", 0, "firmware", "extra"),)),
    (0xFF, 0xFF): Channel("tsl version", 2, (Field("tsl_version", 0, "tsl", "extra"),)),
    (0xFF, 0x16): Channel("serial number", 8, (Field("serial_number", 0, "hex8", "extra"),)),
    (0xFF, 0x0F): Channel(
        "lorawan class",
        1,
        (Field("lorawan_class", 0, "u8", "extra", labels={0: "A", 1: "B", 2: "C", 3: "CtoB"}),),
    ),
    (0xFF, 0xFE): Channel("reset event", 1, (Field("reset_event", 0, "u8", "extra"),)),
    (0xFF, 0x0B): Channel("device status", 1, (Field("device_status", 0, "u8", "extra"),)),
    (0x01, 0x75): Channel("battery", 1, (Field("battery", 0, "u8", "battery", unit="%", limit=100),)),
    (0x03, 0x67): Channel("temperature", 2, (TEMPERATURE,)),
}

EM300_TH: Mapping[tuple[int, int], Channel] = {
    **ATTRIBUTES,
    (0x04, 0x68): Channel("humidity", 1, (Field("humidity", 0, "u8", divisor=2, unit="%", limit=100),)),
    (0x20, 0xCE): Channel(
        "stored record",
        8,
        (
            Field("time", 0, "u32le", "time"),
            Field("temperature", 4, "i16le", divisor=10, unit="degC"),
            Field("humidity", 6, "u8", divisor=2, unit="%", limit=100),
        ),
    ),
}

EM400_MUD: Mapping[tuple[int, int], Channel] = {
    **ATTRIBUTES,
    (0x04, 0x82): Channel("distance", 2, (Field("distance", 0, "u16le", unit="mm"),)),
    (0x05, 0x00): Channel("position", 1, (Field("tilt", 0, "u8", "flag", labels={0: "normal", 1: "tilt"}),)),
    (0x83, 0x67): Channel(
        "temperature alarm", 3, (TEMPERATURE, Field("temperature_alarm", 2, "u8", "extra", labels=ALARM))
    ),
    (0x84, 0x82): Channel(
        "distance alarm",
        3,
        (Field("distance", 0, "u16le", unit="mm"), Field("distance_alarm", 2, "u8", "extra", labels=ALARM)),
    ),
}


def raw(frame: Frame, at: int, field: Field) -> int | str:
    """The field's value as sent: a number, or the text of a version or serial number."""
    if field.fmt == "u8":
        return frame.u8(at, field.name)
    if field.fmt == "i16le":
        return frame.i16le(at, field.name)
    if field.fmt == "u16le":
        return frame.u16le(at, field.name)
    if field.fmt == "u32le":
        return frame.u32le(at, field.name)
    data = frame.take(at, SIZES[field.fmt], field.name)
    if field.fmt == "hex8":
        return data.hex()
    if field.fmt == "hardware":  # 01 10 -> v1.1
        return f"v{data[0]:x}.{data[1] >> 4}"
    if field.fmt == "firmware":  # 01 10 -> v1.10
        return f"v{data[0]:x}.{data[1]:x}"
    return f"v{data[0]}.{data[1]}"


class Milesight:
    """A Milesight sensor whose uplinks are TLV channels from ``table``."""

    role: Role = "sensor"

    def __init__(self, name: str, table: Mapping[tuple[int, int], Channel]) -> None:
        self.name = name
        self.table = table

    def decode(self, f_port: int, payload: bytes, received: datetime) -> Decoded:
        if f_port not in APPLICATION_PORTS:
            raise unknown_port(self.name, f_port)
        readings: list[Reading] = []
        extra: dict[str, Any] = {}
        battery: float | None = None
        offset = 0
        while offset < len(payload) or offset == 0:  # an empty payload fails at its first header
            header = Frame(f"fPort {f_port} channel", payload, offset + 2)
            key = (header.u8(offset, "channel id"), header.u8(offset + 1, "channel type"))
            channel = self.table.get(key)
            if channel is None:
                if key[0] in (0xFE, 0xFF):
                    extra["unparsed"] = payload[offset:].hex()
                    break
                raise header.error("channel", offset, f"unknown channel {key[0]:02X} {key[1]:02X}", "malformed")
            where = f"fPort {f_port} {channel.label} ({key[0]:02X} {key[1]:02X})"
            frame = Frame(where, payload, offset + 2 + channel.length)
            battery = self.read(frame, offset + 2, channel, readings, extra, battery)
            offset += 2 + channel.length
        kind: Kind = "measurement" if readings or battery is not None else "info"
        return Decoded(kind=kind, readings=tuple(readings), battery_percent=battery, extra=extra)

    def read(
        self,
        frame: Frame,
        start: int,
        channel: Channel,
        readings: list[Reading],
        extra: dict[str, Any],
        battery: float | None,
    ) -> float | None:
        """Read one channel's fields into ``readings`` and ``extra``; returns the battery level so far."""
        time: datetime | None = None
        for field in channel.fields:
            at = start + field.offset
            value = raw(frame, at, field)
            if isinstance(value, str):
                extra[field.name] = value
                continue
            if field.labels is not None and value not in field.labels:
                codes = ", ".join(f"{code} {label}" for code, label in field.labels.items())
                raise frame.error(field.name, at, f"code {value} is none of {codes}", "out_of_range")
            scaled = value / field.divisor if field.divisor != 1 else value
            if field.limit is not None and scaled > field.limit:
                raise frame.error(field.name, at, f"{scaled} is over {field.limit}", "out_of_range")
            if field.to == "time":
                time = datetime.fromtimestamp(value, UTC)
            elif field.to == "battery":
                battery = scaled
            elif field.to == "extra":
                extra[field.name] = field.labels[value] if field.labels is not None else value
            elif field.to == "flag":
                readings.append(Reading(field.name, value == 1, None, time))
            else:
                readings.append(Reading(field.name, scaled, field.unit, time))
        return battery
