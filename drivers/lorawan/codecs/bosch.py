"""Bosch Parking Lot Sensor TPS110, firmware 0.29.2: status, heartbeat, startup, info, usage, debug.

Written from TheThingsNetwork/lorawan-devices: ``vendor/bosch/tpl110-0292.js`` at commit
0a254aaa3adb0237faed50aa34916df1d07cf417 and ``vendor/bosch/tps110-0292-codec.yaml`` at commit
3410a4b514782f139bb5d4e6c9cb27fe01971022.

Device information (fPort 4) and usage (fPort 5) are published there as raw bytes only; they
are passed on as hex in ``extra["bytes"]``, not guessed at.
"""

from __future__ import annotations

from datetime import datetime

from drivers.lorawan.codecs.api import Decoded, Reading, Role
from drivers.lorawan.codecs.frame import Frame, unknown_port

RESET = (None, "watchdog", "power on", "system request", "other")


class Tps110:
    """Bosch TPS110 parking detector (firmware 0.29.x); the heartbeat carries a temperature, no battery."""

    name: str = "bosch-tps110"
    role: Role = "detector"
    ports = (1, 2, 3, 4, 5, 6)

    def decode(self, f_port: int, payload: bytes, received: datetime) -> Decoded:
        if f_port == 1:
            state = Frame("fPort 1 status", payload, 1).u8(0, "state")
            return Decoded(kind="status", occupied=state & 1 == 1)
        if f_port == 2:
            return self.heartbeat(payload)
        if f_port == 3:
            return self.startup(payload)
        if f_port in (4, 5):
            return Decoded(kind="info" if f_port == 4 else "usage", extra={"bytes": payload.hex()})
        if f_port == 6:
            return self.debug(payload)
        raise unknown_port(self.name, f_port, self.ports)

    def heartbeat(self, payload: bytes) -> Decoded:
        """Byte 0 the state; byte 1, when sent, the temperature in whole degC (int8)."""
        frame = Frame("fPort 2 heartbeat", payload, 1)
        occupied = frame.u8(0, "state") & 1 == 1
        if len(payload) < 2:
            return Decoded(kind="heartbeat", occupied=occupied)
        reading = Reading("temperature", frame.i8(1, "temperature"), "degC")
        return Decoded(kind="heartbeat", occupied=occupied, readings=(reading,))

    def startup(self, payload: bytes) -> Decoded:
        """Three 12-bit debug codes (0: none) at bytes 0, 4, 8; firmware at 12-14; reset cause 15; state 16."""
        frame = Frame("fPort 3 startup", payload, 17)
        codes = []
        for offset in (0, 4, 8):
            code = frame.u16le(offset, "debug code") & 0x0FFF
            if code:
                codes.append(code)
        firmware = ".".join(str(frame.u8(i, "firmware version")) for i in (12, 13, 14))
        cause = frame.choice(15, "reset cause", RESET)
        occupied = frame.u8(16, "state") & 1 == 1
        extra = {"debug_codes": tuple(codes), "firmware": firmware, "reset_cause": cause}
        return Decoded(kind="startup", occupied=occupied, extra=extra)

    def debug(self, payload: bytes) -> Decoded:
        """A timestamp (uint32 LE), a 12-bit debug code at 4-5 and a sequence number (uint16 LE) at 8-9."""
        frame = Frame("fPort 6 debug", payload, 10)
        timestamp = frame.u32le(0, "timestamp")
        code = frame.u16le(4, "debug code") & 0x0FFF
        sequence = frame.u16le(8, "sequence number")
        return Decoded(kind="debug", extra={"timestamp": timestamp, "debug_code": code, "sequence": sequence})
