"""The fixed vocabulary of meter quantities and their units: part of the event contract."""

from __future__ import annotations

# quantity -> the unit every event carries for it (profiles convert with scale). Extending
# this table is a compatible change; renaming an entry is not.
QUANTITY_UNITS: dict[str, str] = {
    "active_energy": "kWh",
    "active_energy_export": "kWh",
    "reactive_energy": "kvarh",
    "active_power": "kW",
    "reactive_power": "kvar",
    "apparent_power": "kVA",
    "voltage": "V",
    "current": "A",
    "frequency": "Hz",
    "power_factor": "",
    "volume": "m3",
    "flow": "m3/h",
    "temperature": "degC",
    "pressure": "bar",
    "humidity": "%",
    "distance": "mm",
    "digital_input": "",
    "counter": "",
}
