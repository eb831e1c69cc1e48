"""What the edge node knows of its devices: each metric's definition, alias and current value.

The metrics are learned from the events: a device is born with the metrics its events have shown,
and a metric not seen before (a reload added a point) re-births the device with fresh aliases,
unique across the node (payloads-alias-uniqueness).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.uplinks.sparkplug.metrics import HEALTH_METRICS, NODE, Value, coerce


@dataclass(slots=True)
class Device:
    """One device: its metrics by name (current values), their aliases, whether it is born and online."""

    id: str
    current: dict[str, Value] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    born: bool = False  # a DBIRTH went out this session and no DDEATH since
    online: bool = True  # until a status event says otherwise
    status_at: int = -1  # the time (UTC ms) of the newest status event learned; -1: none yet


class Model:
    """Every device seen; alias numbers handed out from one counter for the whole node."""

    def __init__(self) -> None:
        """No device yet; alias 1 first (the node's own metrics are not aliased)."""
        self.devices: dict[str, Device] = {}
        self._next_alias = 1
        self.by_alias: dict[int, tuple[str, str]] = {}
        # The edge node's own metrics (the gateway's health): in NBIRTH, null until first heard of.
        self.node = Device(NODE, {name: Value(name, None, datatype, None, "good", 0) for name, _, datatype
                                  in HEALTH_METRICS})  # fmt: skip
        self.realias(self.node)

    def device(self, device_id: str) -> Device:
        """The device (the node itself for :data:`NODE`), created the first time."""
        if device_id == NODE:
            return self.node
        found = self.devices.get(device_id)
        if found is None:
            found = self.devices[device_id] = Device(device_id)
        return found

    def learn(self, device: Device, values: list[Value], *, historical: bool = False) -> tuple[list[Value], bool]:
        """File ``values`` as the device's current ones where they are the newest known; returns
        them typed as born, and whether one is new (the device must be born again before DATA may
        name it).

        A BIRTH carries each metric's latest known value, so a buffered reading (``historical``:
        taken while the node waited for a connection or for its primary host) becomes current when
        it is newer than the one known; an older one never does (the backlog of a reconnect comes
        oldest first, after values the last session already knew). Live readings always do: they
        are the newest by arrival, even if the clock stepped back.
        """
        new = False
        typed = []
        for v in values:
            known = device.current.get(v.name)
            if known is None:
                new = True
            else:
                v.datatype = known.datatype
                if v.unit is None:
                    v.unit = known.unit
                try:
                    v.value = coerce(v.value, v.datatype)
                except (TypeError, ValueError):
                    v.value, v.quality = None, "bad"
            if known is None or not historical or v.timestamp >= known.timestamp:
                device.current[v.name] = v
            typed.append(v)
        return typed, new

    def status(self, device: Device, online: bool, timestamp: int) -> None:
        """A device status event: the newest by time decides (status events and readings come in
        different priority classes, so an older status may arrive after a newer one)."""
        if timestamp >= device.status_at:
            device.online, device.status_at = online, timestamp

    def typed(self, device: Device, values: list[Value]) -> list[Value]:
        """Backlog values with the datatype and unit of their metric's BIRTH (unknown ones left out)."""
        out = []
        for v in values:
            known = device.current.get(v.name)
            if known is not None:
                v.datatype, v.unit = known.datatype, known.unit
                out.append(v)
        return out

    def realias(self, device: Device) -> None:
        """Fresh aliases for every metric of the device (before its DBIRTH after a change)."""
        for alias in device.aliases.values():
            self.by_alias.pop(alias, None)
        device.aliases = {}
        for name in device.current:
            device.aliases[name] = self._next_alias
            self.by_alias[self._next_alias] = (device.id, name)
            self._next_alias += 1

    def resolve(self, device: Device, name: str | None, alias: int | None) -> str | None:
        """The metric name a DCMD means, by alias or name; None if the device has no such metric."""
        if alias is not None:
            found = self.by_alias.get(alias)
            if found is None or found[0] != device.id:
                return None
            return found[1]
        return name if name in device.current else None
