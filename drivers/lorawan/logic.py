"""What one LoRaWAN device's messages mean: dedupe, frame counters, decoding, and the events they make.

Pure (no I/O, no clock but the ones passed in): the driver feeds it the messages of one DevEUI
and publishes what it returns.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import datetime
from typing import Any

from agent.contract.data import measurement, meter_reading, parking_occupancy
from agent.contract.events import DEVICE_HEALTH, DEVICE_UNDECODED, METER_READING, PARKING_OCCUPANCY, Reading
from agent.contract.vocabulary import QUANTITY_UNITS
from drivers.lorawan.codecs import Codec, CodecError, Decoded
from drivers.lorawan.config import LorawanConfig
from drivers.lorawan.messages import Join, Status, Uplink
from drivers.lorawan.state import DeviceState

log = logging.getLogger(__name__)

# A battery reported only as a percentage (Milesight, ChirpStack's status) gets a class from it.
LOW_PERCENT, CRITICAL_PERCENT = 25.0, 10.0


def event_id(dev_eui: str, key: str, event_type: str, n: int = 0) -> str:
    """The CloudEvent id of the ``n``-th event of ``event_type`` an uplink made: the same on a redelivery."""
    return hashlib.sha256(f"{dev_eui}/{key}/{event_type}/{n}".encode()).hexdigest()[:32]


def percent_class(percent: float) -> str:
    """ok, low or critical from a charge percentage."""
    return "critical" if percent < CRITICAL_PERCENT else "low" if percent < LOW_PERCENT else "ok"


class DeviceLogic:
    """One device's running state between messages (the persistent part is :class:`DeviceState`)."""

    # No per-instance dict: one of these per configured device, 10,000 in a big site.
    __slots__ = (
        "_health_at",
        "_since",
        "battery",
        "codec",
        "config",
        "dirty",
        "dr",
        "duplicates",
        "gateways",
        "margin",
        "missed",
        "new_keys",
        "rssi",
        "snr",
        "state",
        "undecoded",
    )  # fmt: skip

    def __init__(self, config: LorawanConfig, codec: Codec, state: DeviceState) -> None:
        self.config = config
        self.codec = codec
        self.state = state
        self.dirty = False  # state changed since the driver last recorded it
        self.new_keys: list[int] = []  # digests of the keys kept since then
        self.missed = 0
        self.duplicates = 0
        self.undecoded: list[str] = []  # reasons since the driver last looked (it counts them)
        self.rssi: float | None = None
        self.snr: float | None = None
        self.gateways = 0
        self.dr: int | None = None
        self.battery: dict[str, Any] = {}
        self.margin: int | None = None
        self._health_at: float | None = None  # monotonic time of the last health event
        self._since: datetime | None = datetime.fromisoformat(state.since) if state.since else None

    # ---- messages ---------------------------------------------------------------------------
    def uplink(self, up: Uplink, now: float) -> list[Reading] | None:
        """The events of one uplink; None for an uplink already handled (a duplicate or redelivery)."""
        state = self.state
        if state.seen(up.key):
            self.duplicates += 1
            return None
        self.new_keys.append(state.remember(up.key))
        self.dirty = True
        self._frame_counter(up.f_cnt)
        self.rssi, self.snr, self.gateways, self.dr = up.rssi, up.snr, up.gateways, up.dr
        try:
            decoded = self.codec.decode(up.f_port, up.payload, up.received)
        except CodecError as exc:
            self.undecoded.append(exc.reason)
            return [self._undecoded(up, exc)]
        readings = self._occupancy(up, decoded) if self.codec.role == "detector" else self._readings(up, decoded)
        changed = self._battery(decoded.battery_volts, decoded.battery_percent, decoded.battery_class)
        health = self._health(up.received, up.key, now, changed, up.f_cnt)
        return readings + health

    def join(self, join: Join) -> None:
        """A new session: the frame counter starts again (a redelivered join changes nothing)."""
        if self.state.seen(join.key):
            return
        self.new_keys.append(self.state.remember(join.key))
        log.info("device %s (DevEUI %s) joined: a new session, frame counter tracking restarts (was %s)",
                 self.config.id, self.config.dev_eui, self.state.f_cnt)  # fmt: skip
        self.state.f_cnt = None
        self.dirty = True

    def status(self, status: Status, now: float) -> list[Reading]:
        """ChirpStack's battery and margin report: a health event if the class changed or one is due."""
        self.margin = status.margin
        if status.external_power is not None:
            self.battery["external_power"] = status.external_power
        percent = status.battery_percent
        changed = self._battery(None, percent, percent_class(percent) if percent is not None else None)
        key = f"status/{status.received.isoformat()}"
        return self._health(status.received, key, now, changed, self.state.f_cnt or 0)

    # ---- parts ------------------------------------------------------------------------------
    def _frame_counter(self, f_cnt: int) -> None:
        last = self.state.f_cnt
        if last is not None and f_cnt > last + 1:
            self.missed += f_cnt - last - 1
            log.info("device %s: frame counter %d after %d: %d uplink(s) missed (%d in all)", self.config.id,
                     f_cnt, last, f_cnt - last - 1, self.missed)  # fmt: skip
        elif last is not None and f_cnt < last:
            log.info("device %s: frame counter went back from %d to %d without a join: a new session",
                     self.config.id, last, f_cnt)  # fmt: skip
        if last is None or f_cnt > last or f_cnt < last:
            self.state.f_cnt = f_cnt

    def _undecoded(self, up: Uplink, exc: CodecError) -> Reading:
        data = {"dev_eui": self.config.dev_eui, "f_port": up.f_port, "f_cnt": up.f_cnt,
                "payload": base64.b64encode(up.payload).decode(), "codec": self.codec.name, "reason": exc.reason,
                "error": str(exc), "correlation_id": up.correlation}  # fmt: skip
        log.warning("device %s (DevEUI %s): uplink f_cnt %d (%s) not decoded by %s: %s", self.config.id,
                    self.config.dev_eui, up.f_cnt, up.correlation, self.codec.name, exc,
                    extra={"device": self.config.id})  # fmt: skip
        return Reading(DEVICE_UNDECODED, data, up.received, id=event_id(self.config.dev_eui, up.key, DEVICE_UNDECODED))

    def _occupancy(self, up: Uplink, decoded: Decoded) -> list[Reading]:
        """A status uplink publishes the bay; any other only when it contradicts the known state (a correction)."""
        state, occupied = self.state, decoded.occupied
        if occupied is None or self.config.bay is None:
            return []
        changed = state.occupied is None or state.occupied != occupied
        if not changed and decoded.kind not in ("status", "registration"):
            return []
        if changed:
            if state.occupied is not None and decoded.kind not in ("status", "registration"):
                log.info("device %s: %s says bay %s is %s, not %s: published as a correction", self.config.id,
                         decoded.kind, self.config.bay, _word(occupied), _word(state.occupied))  # fmt: skip
            self._since = up.received
            state.occupied, state.since = occupied, up.received.isoformat()
        since = self._since or up.received
        data = parking_occupancy(self.config.bay, occupied, 1.0, since)
        return [Reading(PARKING_OCCUPANCY, data, up.received, id=event_id(self.config.dev_eui, up.key,
                                                                           PARKING_OCCUPANCY))]  # fmt: skip

    def _readings(self, up: Uplink, decoded: Decoded) -> list[Reading]:
        """Sensor values as city.meter.reading: one event now, one per stored record at its own time."""
        groups: dict[datetime, list[dict[str, Any]]] = {}
        for r in decoded.readings:
            if isinstance(r.value, bool):
                value: float = float(r.value)
            else:
                value = r.value
            unit = r.unit if r.unit is not None else QUANTITY_UNITS.get(r.name, "")
            groups.setdefault(r.time or up.received, []).append(measurement(r.name, value, unit))
        out = []
        for n, (moment, measurements) in enumerate(sorted(groups.items())):
            ident = event_id(self.config.dev_eui, up.key, METER_READING, n)
            out.append(Reading(METER_READING, meter_reading(measurements), moment, id=ident))
        return out

    def _battery(self, volts: float | None, percent: float | None, battery_class: str | None) -> bool:
        """Keep what the message says of the battery; whether its class changed."""
        if volts is not None:
            self.battery["volts"] = volts
        if percent is not None:
            self.battery["percent"] = percent
        if battery_class is None and percent is not None:
            battery_class = percent_class(percent)
        if battery_class is None:
            return False
        self.battery["class"] = battery_class
        changed = self.state.battery_class is not None and self.state.battery_class != battery_class
        if self.state.battery_class != battery_class:
            self.state.battery_class = battery_class
            self.dirty = True
        return changed

    def _health(self, moment: datetime, key: str, now: float, changed: bool, f_cnt: int) -> list[Reading]:
        due = self._health_at is None or now - self._health_at >= self.config.health_interval
        if not (changed or due):
            return []
        self._health_at = now
        data = {"battery": dict(self.battery), "rssi": self.rssi, "snr": self.snr, "gateways": self.gateways,
                "missed_uplinks": self.missed, "margin": self.margin, "f_cnt": f_cnt,
                "dev_eui": self.config.dev_eui, "dr": self.dr}  # fmt: skip
        return [Reading(DEVICE_HEALTH, data, moment, id=event_id(self.config.dev_eui, key, DEVICE_HEALTH))]


def _word(occupied: bool | None) -> str:
    return "occupied" if occupied else "free"
