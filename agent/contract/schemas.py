"""JSON Schemas of the event contract, as pydantic models.

These are the documentation and the test oracle (the schema files in schemas/ and docs/events.md are
generated from them by ``python -m agent.contract.schema_files --write``); the hot path builds plain dicts
and does not use them.
Consumers must ignore fields they do not know: new optional fields are not a breaking change.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.contract import events
from agent.contract.vocabulary import QUANTITY_UNITS

Quality = Literal["good", "stale", "bad"]
_TIME_PATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"  # RFC 3339, UTC, milliseconds


class _Open(BaseModel):
    """Consumers tolerate unknown fields; producers only add optional ones."""

    model_config = ConfigDict(extra="allow")


class CloudEvent(_Open):
    """The envelope: CloudEvents 1.0, JSON structured mode, with the contract's extension attributes."""

    specversion: Literal["1.0"]
    id: str = Field(
        description="32 lowercase hex digits (128 random bits, no dashes); unique per event and the same on every "
        "re-send of that event. Compare it as an opaque string. Events of a LoRaWAN uplink derive it from the "
        "network server's dedupe key (a hash), so an uplink the server delivers twice makes the same id."
    )
    source: str = Field(
        pattern=r"^/gateways/[a-z0-9-]+/devices/[a-z0-9_-]+$", description="/gateways/{gateway}/devices/{device}"
    )
    type: str = Field(description="city.meter.reading, city.parking.occupancy, ...")
    time: str = Field(
        pattern=_TIME_PATTERN,
        description="When the reading was taken: RFC 3339, UTC, milliseconds.",
    )
    datacontenttype: Literal["application/json"]
    dataschema: str | None = Field(
        default=None,
        pattern="^" + events.SCHEMA_BASE.replace(".", r"\.") + r"[a-z0-9.]+\.json$",
        description="The JSON Schema of `data`: its schema file's $id, naming the contract version (v1) and the "
        "type. Absent on events from agents before it was introduced.",
    )
    gateway: str = Field(description="Extension: gateway id.")
    device: str = Field(description="Extension: device id ('gateway' for gateway-level events).")
    seq: int = Field(
        ge=1,
        description="Extension: per-device sequence number, +1 per event, "
        "persistent across restarts. (device, seqepoch, seq) is the idempotency key.",
    )
    seqepoch: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{16}$",
        description="Extension: the sequence epoch. It changes only when the gateway lost track of its "
        "numbering (its buffer file was damaged, lost or replaced); seq is unique within one epoch. "
        "Absent on events from agents before it was introduced (treat as '').",
    )
    recordedtime: str | None = Field(
        default=None,
        pattern=_TIME_PATTERN,
        description="Extension (CloudEvents recordedtime): when the gateway accepted the event into its buffer, by "
        "its own clock; RFC 3339, UTC, milliseconds. Equal to time unless the driver stamped the reading itself. "
        "The same on every re-send. Absent on events from agents before it was introduced.",
    )
    timequality: events.TimeQuality | None = Field(
        default=None,
        description="Extension: was the gateway's clock synchronised when it accepted the event (the kernel's NTP "
        "state, read at most 1 s before and at once after the clock steps)? synced, unsynced (time and "
        "recordedtime may be far off: flagged, never corrected), unknown (the state cannot be read). Absent on "
        "events from agents before it was introduced.",
    )
    partitionkey: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+/[a-z0-9_-]+$",
        description="Extension (CloudEvents partitioning): {gateway}/{device}, the unit whose order the contract "
        "keeps; a bridge to Kafka uses it as the record key. Absent on events from agents before it was introduced.",
    )
    backlog: bool | None = Field(
        default=None,
        description="Extension: true when this delivery comes from the gateway's backlog: the event was accepted "
        "while the uplink had no connection (an outage, or before the first connection after a start, including "
        "what an earlier run left buffered), so it arrives late. Absent on live deliveries (never false). A "
        "property of the delivery, not the event: copies of one event may differ in it.",
    )
    data: dict[str, Any]


class Measurement(_Open):
    """One measured quantity of a meter."""

    quantity: str = Field(
        description="From a fixed vocabulary, each with one unit: "
        + ", ".join(f"{q} {u or repr('')}" for q, u in QUANTITY_UNITS.items())
        + ". New quantities may be added; existing ones keep their name and unit."
    )
    value: float | None = Field(description="Value in `unit`; null when quality is bad.")
    unit: str = Field(description="kWh, kW, V, A, Hz, m3, m3/h, ... ('' for dimensionless).")
    quality: Quality = Field(description="good, stale (last known value) or bad.")
    reason: str | None = Field(default=None, description="Why quality is not good.")
    phase: str | None = Field(default=None, description="L1, L2, L3, N when per phase.")
    point: str | None = Field(default=None, description="The device point it was read from (field drivers).")


class MeterReading(_Open):
    """``city.meter.reading`` (class telemetry): electricity, water or I/O module values."""

    measurements: list[Measurement]


class ParkingOccupancy(_Open):
    """``city.parking.occupancy`` (class event): one bay's state."""

    bay: str
    occupied: bool
    confidence: float = Field(ge=0, le=1)
    since: str = Field(description="When the bay entered this state (RFC 3339 UTC).")
    point: str | None = Field(default=None, description="The device point it was read from (field drivers).")


class CrosswalkPresence(_Open):
    """``city.crosswalk.presence`` (class event): people waiting in an area."""

    area: str
    count: int = Field(ge=0, description="People waiting now.")
    max_count: int = Field(ge=0, description="Most people waiting in the current window.")
    point: str | None = Field(default=None, description="The device point it was read from (field drivers).")


class DeviceStatus(_Open):
    """``city.device.status`` (class alarm): a device went offline or came (back) online."""

    status: Literal["online", "offline"]
    reason: str | None = Field(description="Why offline (the last error); null when online.")
    driver: str
    consecutive_failures: int = Field(ge=0)
    since: str


class DeviceBattery(_Open):
    """A battery as the device (or its network server) reports it; each field null when not reported."""

    volts: float | None = Field(default=None, description="Battery voltage (V).")
    percent: float | None = Field(default=None, ge=0, le=100, description="Charge (%).")
    battery_class: Literal["ok", "low", "critical"] | None = Field(
        default=None,
        alias="class",
        description="The vendor's verdict (Nwave: from its voltage thresholds, lower below -5 °C) or one from percent.",
    )
    external_power: bool | None = Field(default=None, description="ChirpStack status: runs on external power.")


class DeviceHealth(_Open):
    """``city.device.health`` (class telemetry): a LoRaWAN device's battery and radio.

    Sent when the battery class changes, and otherwise at most every ``health_interval``.
    """

    battery: DeviceBattery
    rssi: float | None = Field(description="Best RSSI (dBm) over the gateways that heard the last uplink.")
    snr: float | None = Field(description="Best SNR (dB) over those gateways.")
    gateways: int = Field(ge=0, description="Gateways that heard the last uplink.")
    missed_uplinks: int = Field(ge=0, description="Uplinks missed (f_cnt gaps) since the agent started.")
    margin: int | None = Field(default=None, description="ChirpStack status: link margin (dB), last DevStatusAns.")
    f_cnt: int = Field(ge=0, description="Frame counter of the last uplink.")
    dev_eui: str = Field(pattern=r"^[0-9a-f]{16}$", description="The device's DevEUI, lowercase.")
    dr: int | None = Field(default=None, ge=0, description="Data rate of the last uplink, when the server says it.")


class DeviceUndecoded(_Open):
    """``city.device.undecoded`` (class event): an uplink whose payload the device's codec could not decode.

    Nothing is lost: the bytes are here. The device's next uplinks, and other devices, go on.
    """

    dev_eui: str = Field(pattern=r"^[0-9a-f]{16}$", description="The device's DevEUI, lowercase.")
    f_port: int = Field(ge=0, le=255)
    f_cnt: int = Field(ge=0)
    payload: str = Field(description="The application payload, base64.")
    codec: str = Field(description="The codec that refused it.")
    reason: Literal["too_short", "unknown_port", "out_of_range", "malformed"]
    error: str = Field(description="What failed, naming the field and byte offset.")
    correlation_id: str | None = Field(
        default=None,
        description="What the network server's console finds the uplink by: ChirpStack's deduplicationId, TTS's "
        "as:up: correlation id.",
    )


class BlurredCounts(_Open):
    """What was blurred in a snapshot."""

    persons: int = Field(ge=0)
    vehicles: int = Field(ge=0)
    faces: int = Field(ge=0)


class CameraSnapshot(_Open):
    """``city.camera.snapshot`` (class media): a still for commissioning or an incident.

    Only when the camera's ``snapshots.enabled`` is true (off by default). Every detected person
    and vehicle box and every detected face is blurred before the image leaves the camera
    driver; if the face model cannot run, no snapshot is taken at all.
    """

    reason: Literal["interval", "change"] = Field(
        description="interval: the periodic commissioning still; change: a bay or waiting area changed."
    )
    trigger: str | None = Field(default=None, description="For reason change: what changed, e.g. 'bay P-07 occupied'.")
    media_type: Literal["image/jpeg"]
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    image: str = Field(description="The blurred image, base64 (RFC 4648, with padding).")
    blurred: BlurredCounts


class BufferHealth(_Open):
    """Depth of the store-and-forward buffer."""

    events: int
    bytes: int
    max_bytes: int
    oldest_age_s: float | None
    by_class: dict[str, int]


class Accounting(_Open):
    """Always balances: accepted = delivered + buffered + sum(dropped)."""

    accepted: int
    delivered: int
    buffered: int
    dropped: dict[str, int] = Field(
        description="By reason: capacity, disk_full, media_quota, corrupt (lost with a damaged buffer file)."
    )
    not_accepted: int = Field(description="Readings refused before reaching the buffer (disk stalled or failing).")


class DropReport(_Open):
    """Events dropped since the previous health event, per device, type and reason."""

    device: str = Field(description="The device; '' when a damaged buffer file did not say whose events it held.")
    type: str = Field(description="The event type; '' for reason corrupt (known per device only).")
    reason: Literal["capacity", "disk_full", "media_quota", "corrupt"]
    count: int
    seqs: str | None = Field(
        default=None, description="Reason corrupt: the seq ranges lost, e.g. '120-180, 184' (estimated)."
    )
    uplink: str | None = Field(
        default=None, description="The durable uplink whose own buffer dropped them; absent for the main (MQTT) one."
    )


class UplinkHealth(_Open):
    """State of the MQTT uplink."""

    connected: bool
    connects: int
    disconnects: int
    last_error: str | None


class DurableUplinkHealth(_Open):
    """One durable uplink with its own buffer file and accounting (docs/delivery.md, section 9)."""

    connected: bool
    last_error: str | None
    buffer: BufferHealth
    accounting: Accounting


class DevicesHealth(_Open):
    """How many devices run and which are offline."""

    total: int
    online: int
    offline: list[str]


class ProcessHealth(_Open):
    """The agent process. Optional: gateways older than this field do not send it."""

    cpu_percent: float | None = Field(
        description="CPU time the agent used since the previous health event, in % of one core "
        "(all threads; 200 = two cores busy)."
    )
    rss_bytes: int | None = Field(description="Resident memory of the agent process.")
    threads: int = Field(ge=1, description="Threads in the agent process.")


class HostHealth(_Open):
    """The machine the agent runs on (optional, like ProcessHealth). null: not available there."""

    load_avg: list[float] | None = Field(
        min_length=3, max_length=3, description="System load average over 1, 5 and 15 minutes."
    )
    cpus: int | None = Field(description="CPU cores of the machine.")
    mem_total_bytes: int | None = Field(description="Memory of the machine.")
    mem_available_bytes: int | None = Field(
        description="Memory available to new work (MemAvailable; free + buffers where /proc/meminfo is hidden)."
    )
    disk_free_bytes: int | None = Field(description="Free space on the file system holding the buffer.")
    disk_total_bytes: int | None = Field(description="Size of the file system holding the buffer.")
    temperature_c: float | None = Field(
        description="SoC/CPU temperature in degrees Celsius from /sys/class/thermal (cpu-thermal on a "
        "Raspberry Pi); null when the board exposes none."
    )


class ClockHealth(_Open):
    """The gateway's system clock, which stamps every event's ``time``."""

    synchronised: bool | None = Field(
        description="Disciplined by network time (the kernel's NTP state); null where it cannot be read."
    )


class DriverLink(_Open):
    """A connection a driver's devices share upstream, and the driver's counters of it (since start)."""

    driver: str
    connected: bool
    messages: int | None = Field(default=None, ge=0, description="LoRaWAN: messages received.")
    bad_messages: int | None = Field(
        default=None, ge=0, description="LoRaWAN: messages not understood (not JSON, a required field missing)."
    )
    unknown_uplinks: int | None = Field(default=None, ge=0, description="LoRaWAN: uplinks of unconfigured DevEUIs.")
    qos0_uplinks: int | None = Field(
        default=None,
        ge=0,
        description="LoRaWAN, ChirpStack: uplinks that arrived at QoS 0 (lost while the agent is down).",
    )


class GatewayHealth(_Open):
    """``city.gateway.health`` (class alarm), device ``gateway``: every health_interval and after drops."""

    uptime_s: float
    site: str | None
    buffer: BufferHealth
    accounting: Accounting
    dropped_since_last_report: list[DropReport]
    uplink: UplinkHealth
    devices: DevicesHealth
    process: ProcessHealth | None = Field(default=None, description="The agent process (CPU, memory).")
    host: HostHealth | None = Field(default=None, description="The machine (load, memory, disk, temperature).")
    clock: ClockHealth | None = Field(default=None, description="The system clock (optional, like process).")
    version: str | None = Field(default=None, description="The agent's version (optional, like process).")
    links: dict[str, DriverLink] | None = Field(
        default=None,
        description="Only when drivers share upstream connections (a LoRaWAN network server's broker): each one's "
        "state, by name. While one is down its devices' silence timers stand still.",
    )
    uplinks: dict[str, DurableUplinkHealth] | None = Field(
        default=None,
        description="Only with two or more durable uplinks: each one's connection, buffer and accounting, by "
        "name; buffer, accounting and uplink above describe the main (MQTT) one.",
    )


class InventoryConfig(_Open):
    """The configuration the gateway runs."""

    version: int = Field(ge=0, description="The remote configuration's version; 0: the local site file only.")
    hash: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256 of the canonical JSON (sorted keys, no spaces) of the sections devices, priorities, "
        "observability, uplink and fleet.",
    )
    origin: str = Field(description="local: the site file only; remote: remote sections replace local ones.")


class InventoryModel(_Open):
    """One model a device loads, as its manifest names it."""

    manifest: str = Field(description="The manifest file.")
    name: str | None = Field(description="The manifest's model name; null if the manifest cannot be read.")
    path: str | None = Field(description="The model file.")
    sha256: str | None = Field(description="sha256 of the model file on disk; null if it cannot be read.")
    version: str | None = Field(description="The manifest's `version` (or `source.version`), if it has one.")
    verified: bool = Field(description="The file's sha256 is the manifest's.")
    devices: list[str] = Field(description="Devices that load it.")
    error: str | None = Field(default=None, description="Why the manifest or file could not be read.")


class InventoryProfile(_Open):
    """One device profile (a register map file) devices were built from."""

    name: str
    path: str | None = Field(description="The profile file that won the search; null if none was found.")
    sha256: str | None = Field(description="sha256 of that file; null if it cannot be read.")
    version: str | None = Field(description="The profile's `version` key, if it has one.")
    devices: list[str] = Field(description="Devices that use it.")


class InventoryRenewal(_Open):
    """Renewal of the gateway's own certificate (fleet.identity)."""

    renew_at: str | None = Field(description="When the next renewal is due (RFC 3339 UTC).")
    next_attempt: str | None = Field(description="After a failure: when it is tried again; null otherwise.")
    last_error: str | None = Field(description="Why the last attempt failed; null after a success.")
    renewals: int = Field(ge=0, description="Renewals since the agent started.")


class InventoryCertificate(_Open):
    """The MQTT client certificate (the fleet identity's cert.pem, or uplink.mqtt.tls.cert_file)."""

    path: str
    subject: str | None = Field(description="RFC 4514, e.g. CN=gw-017; null if the file cannot be read.")
    not_after: str | None = Field(description="End of validity (RFC 3339 UTC).")
    days_left: int | None = Field(description="Whole days until not_after; negative once expired.")
    error: str | None = Field(default=None, description="Why the file could not be read.")
    renewal: InventoryRenewal | None = Field(default=None, description="With fleet.identity: renewal's state.")


class CertExpiring(_Open):
    """``city.gateway.cert.expiring`` (class alarm), device ``gateway``: the client certificate expires
    within ``fleet.identity.renew.expiring_days`` (default 7) and renewal has not replaced it yet; at
    most once a day."""

    subject: str | None = Field(description="The certificate's subject (RFC 4514), e.g. CN=gw-017.")
    serial_number: str | None = Field(description="The certificate's serial number (hex).")
    not_after: str | None = Field(description="End of validity (RFC 3339 UTC).")
    seconds_left: int = Field(description="Seconds until not_after; negative once expired.")
    days_left: int = Field(description="Whole days until not_after.")
    last_error: str | None = Field(description="Why the last renewal attempt failed; null if none failed.")
    next_attempt: str | None = Field(description="When renewal is tried again (RFC 3339 UTC); null if not scheduled.")


class InventoryClock(_Open):
    """How the gateway judges its clock (signed requests are refused while it is not synchronised)."""

    synced: bool | None = Field(description="Synchronised; null where the kernel cannot say.")
    source: Literal["kernel", "trusted", "unavailable"] = Field(
        description="kernel: the kernel's NTP state; trusted: fleet.clock says another source sets it; "
        "unavailable: the kernel's state cannot be read."
    )


class InventoryBuffer(_Open):
    """The main buffer's depth when the inventory was built."""

    rows: int = Field(ge=0)
    oldest_age_s: float | None = Field(description="Age of the oldest buffered event; null when empty.")


class GatewayInventory(_Open):
    """``city.gateway.inventory``, device ``gateway``: retained on {prefix}/{gateway}/inventory, no seq.

    Sent on each connection, within 10 s of a change and every 5 minutes (uptime and buffer figures
    are refreshed then, they alone never count as a change).
    """

    agent_version: str
    python: str = Field(description="The Python version the agent runs on.")
    started_at: str = Field(description="When the agent started (RFC 3339 UTC).")
    uptime_s: float = Field(ge=0)
    config: InventoryConfig
    models: list[InventoryModel]
    profiles: list[InventoryProfile]
    certificate: InventoryCertificate | None = Field(description="null: no client certificate configured.")
    clock: InventoryClock
    buffer: InventoryBuffer | None = Field(description="null: the buffer's figures could not be read in time.")


EVENT_MODELS: dict[str, type[BaseModel]] = {
    events.METER_READING: MeterReading,
    events.PARKING_OCCUPANCY: ParkingOccupancy,
    events.CROSSWALK_PRESENCE: CrosswalkPresence,
    events.DEVICE_STATUS: DeviceStatus,
    events.GATEWAY_HEALTH: GatewayHealth,
    events.CAMERA_SNAPSHOT: CameraSnapshot,
    events.GATEWAY_INVENTORY: GatewayInventory,
    events.GATEWAY_CERT_EXPIRING: CertExpiring,
    events.DEVICE_HEALTH: DeviceHealth,
    events.DEVICE_UNDECODED: DeviceUndecoded,
}


def schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of the envelope and of each type's ``data``."""
    out = {"envelope": CloudEvent.model_json_schema()}
    out.update({name: model.model_json_schema() for name, model in EVENT_MODELS.items()})
    return out
