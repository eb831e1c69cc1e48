"""Nwave parking detectors: NPS405 (status, heartbeat with battery and temperature, startup, tag registration)
and NPS310 (status, heartbeat, startup).

Written from TheThingsNetwork/lorawan-devices at commit 62c8acdd7f0f1e43b65a86f6c158d83b3d0cd200:
``vendor/nwave/nps405.js`` and ``vendor/nwave/nps405-codec.yaml``; NPS310 from commit
0a254aaa3adb0237faed50aa34916df1d07cf417: ``vendor/nwave/nps310sm.js`` and, at commit
74279b603e52483873390f57188903111fa3a17e, ``vendor/nwave/nps310sm-codec.yaml``.

The occupied flag: revisions of nps405.js read it from bit 7 of byte 0 (the duration in bits
0-6, e.g. commit 0a254aaa) or from bit 0 (the duration in bits 1-7, commit 62c8acdd). The codec
file's own example, ``0x95`` -> occupied, 74 minutes, fits bit 0 only, and so does its tag
registration example; this module pins bit 0. The heartbeat's hardware health is then the
other seven bits of byte 0 (the JS keeps ``byte0 & 0x7F``, a leftover of the bit-7 layout).

Tag registration: the yaml of commit 62c8acdd sends the tag id in bytes 1-4 (5 bytes); a later
yaml (commit 2ed97bce0f2b64b8f9ca90d9e218ba8c618b758e) puts the tag's battery (tenths of a
volt) in byte 1 and the id in bytes 2-5 (6 bytes). Both are read, told apart by length.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from drivers.lorawan.codecs.api import BatteryClass, Decoded, Reading, Role
from drivers.lorawan.codecs.frame import Frame, unknown_port

NPS405_RESET = ("rejoining_lorawan_network", "watchdog", "power_on", "user_request", None, None, "brownout", "other")
NPS310_RESET = (None, "watchdog", "power_on", "user_request", "brownout", "other")


def previous_state(code: int) -> tuple[int | None, dict[str, object]]:
    """A compressed duration (0-127) -> (minutes, extra): exact to 89, 5-minute steps to 235, hours to 600.

    127 is overflow (660 minutes or more): minutes None, ``previous_state_overflow`` True.
    ``previous_state_error_minutes`` is how much longer than ``minutes`` the state may have lasted.
    """
    if code < 90:
        return code, {"previous_state_error_minutes": 0, "previous_state_overflow": False}
    if code < 120:
        return 90 + (code - 90) * 5, {"previous_state_error_minutes": 4, "previous_state_overflow": False}
    if code < 127:
        return 240 + (code - 120) * 60, {"previous_state_error_minutes": 59, "previous_state_overflow": False}
    return None, {"previous_state_error_minutes": None, "previous_state_overflow": True}


def battery_class(millivolts: int, celsius: float) -> BatteryClass:
    """Nwave's health thresholds: low under 3,000 mV, critical under 2,900; 100 mV lower below -5 degC."""
    low, critical = (3000, 2900) if celsius >= -5 else (2900, 2800)
    if millivolts >= low:
        return "ok"
    return "low" if millivolts >= critical else "critical"


def debug(f_port: int, payload: bytes) -> Decoded:
    return Decoded(kind="debug", extra={"bytes": payload.hex()})


def startup(f_port: int, payload: bytes, causes: tuple[str | None, ...]) -> Decoded:
    frame = Frame(f"fPort {f_port} startup", payload, 5)
    firmware = ".".join(str(frame.u8(i, "firmware version")) for i in range(3))
    cause = frame.choice(3, "reset cause", causes)
    occupied = frame.u8(4, "state") & 1 == 1
    return Decoded(kind="startup", occupied=occupied, extra={"firmware": firmware, "reset_cause": cause})


class Nps405:
    """Nwave NPS405 in-ground parking detector (surface- and flush-mount)."""

    name: str = "nwave-nps405"
    role: Role = "detector"
    ports = (1, 2, 3, 6, 10)

    def decode(self, f_port: int, payload: bytes, received: datetime) -> Decoded:
        if f_port == 1:
            return self.status(payload)
        if f_port == 2:
            return self.heartbeat(payload)
        if f_port == 3:
            return startup(f_port, payload, NPS405_RESET)
        if f_port == 6:
            return debug(f_port, payload)
        if f_port == 10:
            return self.registration(payload)
        raise unknown_port(self.name, f_port, self.ports)

    def status(self, payload: bytes) -> Decoded:
        state = Frame("fPort 1 status", payload, 1).u8(0, "state")
        minutes, extra = previous_state(state >> 1)
        return Decoded(kind="status", occupied=state & 1 == 1, previous_state_minutes=minutes, extra=extra)

    def heartbeat(self, payload: bytes) -> Decoded:
        frame = Frame("fPort 2 heartbeat", payload, 3)
        state = frame.u8(0, "state")
        millivolts = 2500 + 4 * frame.u8(1, "battery")
        celsius = frame.i8(2, "temperature") / 2 + 10
        return Decoded(
            kind="heartbeat",
            occupied=state & 1 == 1,
            readings=(Reading("temperature", celsius, "degC"),),
            battery_volts=millivolts / 1000,
            battery_class=battery_class(millivolts, celsius),
            extra={"hw_health_status": state >> 1},
        )

    def registration(self, payload: bytes) -> Decoded:
        """A user's tag (SDI) seen at the bay; the state is only known when bit 0 says occupied."""
        frame = Frame("fPort 10 registration", payload, 5)
        state = frame.u8(0, "state")
        extra: dict[str, object] = {}
        if len(payload) >= 6:
            extra["tag_battery_volts"] = frame.u8(1, "tag battery") / 10
            extra["tag_id"] = f"{frame.u32be(2, 'tag id'):08X}"
        else:
            extra["tag_id"] = f"{frame.u32be(1, 'tag id'):08X}"
        if not state & 1:
            return Decoded(kind="registration", extra=extra)
        minutes, duration = previous_state(state >> 1)
        return Decoded(kind="registration", occupied=True, previous_state_minutes=minutes, extra=extra | duration)


class Nps310:
    """Nwave NPS310 parking detector: occupancy only, no battery or temperature on the air."""

    name: str = "nwave-nps310"
    role: Role = "detector"
    ports = (1, 2, 3, 6)

    def decode(self, f_port: int, payload: bytes, received: datetime) -> Decoded:
        if f_port in (1, 2):
            kind: Literal["status", "heartbeat"] = "status" if f_port == 1 else "heartbeat"
            state = Frame(f"fPort {f_port} {kind}", payload, 1).u8(0, "state")
            return Decoded(kind=kind, occupied=state & 1 == 1)
        if f_port == 3:
            return startup(f_port, payload, NPS310_RESET)
        if f_port == 6:
            return debug(f_port, payload)
        raise unknown_port(self.name, f_port, self.ports)
