"""What a driver is: its config model, its lifecycle, and the context the runtime gives it.

A driver lives in its own folder under ``drivers/`` and registers a :class:`DriverPlugin`
under the ``edge_agent.drivers`` entry point group. The core never imports a driver.

Lifecycle, in the runtime's order:

1. ``config_model`` validates the device's YAML (pure, no I/O) when the config is loaded.
2. ``start()`` connects. Raise :class:`~agent.errors.DriverStartupError` if the device is
   unreachable; the runtime retries with backoff (per ``startup_error_behavior``).
3. ``stream()`` yields batches of :class:`~agent.contract.events.Reading`. The default polls
   ``read()`` every ``interval``; push-style drivers (serial streams, cameras) override it.
4. ``stop()`` releases the device. It must not raise.
"""

from __future__ import annotations

import asyncio
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from agent.contract.events import Reading
from agent.contract.units import parse_duration, parse_size
from agent.errors import DriverWriteError

if TYPE_CHECKING:
    from agent.devices.bus_tools import BusTools

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 500ms, 1s, 5m, 2h, 1d, or a number of seconds.",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]i?[Bb]|[Bb])?\s*$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "A size: 512KiB, 64MiB, 1GiB, or a number of bytes.",
        }
    ),
]
DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
PriorityName = Literal["alarm", "event", "telemetry", "media"]


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    """A pydantic "before" validator for path keys: relative paths are taken from the config
    file's folder (the validation context's ``base_dir``), or from systemd's credentials folder
    when the file is there (``LoadCredential=``)."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / path).is_file():
        return Path(creds) / path
    base = (info.context or {}).get("base_dir")
    return (Path(base) / path) if base else path.absolute()


def readable_file(path: Path | None) -> Path | None:
    """``path`` if it is a file this user can read; a ValueError naming it otherwise."""
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable by this user: {path}")
    return path


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsFiles(StrictModel):
    """The files of a TLS client that always verifies its server: the uplink's broker, a network
    server's broker. Paths are taken from the config file's folder; each must be readable."""

    ca_file: Path | None = Field(
        default=None, description="CA bundle that signed the broker's certificate; default: system CAs."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")

    _paths = field_validator("ca_file", "cert_file", "key_file", mode="before")(resolve_path)

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


async def next_slot(last: float, interval: float) -> float:
    """Sleep until the poll slot after ``last`` (monotonic seconds) and return it.

    A poll that overran skips the slots it missed rather than bunching polls up, and keeps the
    schedule's phase.
    """
    next_at = last + interval
    now = time.monotonic()
    if next_at < now:
        next_at += ((now - next_at) // interval + 1) * interval
    await asyncio.sleep(next_at - now)
    return next_at


class DevicePoint(StrictModel):
    """One point of one device, as a rule names it (which points an uplink or the fleet may write)."""

    device: str = Field(description="Device id.")
    point: str = Field(description="Point name, as the device's events name it (point, or quantity[_phase]).")


class DeviceConfig(StrictModel):
    """Keys every device has, whatever its driver. Drivers subclass this.

    A subclass must narrow ``driver`` to ``Literal["<its name>"]``.
    """

    id: str = Field(
        pattern=DEVICE_ID_PATTERN,
        description="Device id, unique on this gateway; used in topics and event sources.",
    )
    driver: str = Field(description="Which driver reads this device.")
    interval: Duration = Field(default=1.0, gt=0, description="Poll or report interval.")
    enabled: bool = Field(default=True, description="Set false to keep a device configured but idle.")
    offline_after: int = Field(
        default=3,
        ge=1,
        description="Consecutive failed polls before a city.device.status offline event.",
    )
    startup_error_behavior: Literal["retry", "ignore", "error"] = Field(
        default="retry",
        description=(
            "When the device cannot be started: retry with backoff (default), ignore it "
            "(reported once, not retried), or error (the agent refuses to start)."
        ),
    )
    priorities: dict[str, PriorityName] = Field(
        default_factory=dict,
        description="Per event type delivery class for this device, overriding the gateway's.",
    )

    def device_paths(self) -> list[str]:
        """Local device files this device needs (serial ports, /dev/videoN); ``edge-agent doctor`` checks them."""
        return []

    def model_manifests(self) -> list[str]:
        """Manifests (JSON/YAML with ``file`` and ``sha256``) of the model files this device loads.

        ``edge-agent doctor`` verifies each file's checksum; relative paths are taken from the
        config file's folder.
        """
        return []

    def profile_files(self, base_dir: Path | None) -> dict[str, Path | None]:
        """Device profiles (register maps) this device was built from: name -> the file the search
        finds now (None: none). The fleet inventory reports their sha256; ``base_dir`` is the
        config file's folder.
        """
        return {}

    def warnings(self, field: str) -> list[str]:
        """What this device's valid config allows but likely did not mean: ``field.path: finding; fix`` lines."""
        del field
        return []


class DriverContext(ABC):
    """What the runtime offers a running driver."""

    device_id: str

    @abstractmethod
    def poll_ok(self) -> None:
        """Report that the device answered (clears the failure count, may emit online)."""

    @abstractmethod
    def poll_failed(self, reason: str) -> None:
        """Report a failed poll; after ``offline_after`` in a row the device goes offline."""

    def count_failure(self, reason: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Count a failure by reason (``edge_agent_device_poll_failures_total``) that says nothing of
        the device's status: a push device that sent a message it could not decode is still there."""

    def observe_poll(self, seconds: float) -> None:  # noqa: B027 - optional hook, no-op by default
        """Report how long one poll took (the default ``stream()`` does it for ``read()``)."""

    def observe_inference(self, model: str, seconds: float) -> None:  # noqa: B027 - optional hook
        """Report how long one inference run of ``model`` took (drivers that run models)."""


class Driver(ABC):  # noqa: B024 - every hook has a default; subclasses pick which to override
    """One running device. Subclasses implement ``start``/``read``/``stop`` or ``stream``."""

    def __init__(self, config: DeviceConfig, context: DriverContext) -> None:
        """Keep the validated config and the runtime context; do no I/O here."""
        self.config = config
        self.context = context

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Connect to the device. Raise DriverStartupError if it is not reachable."""

    async def read(self) -> list[Reading]:
        """Poll the device once and return its readings. Raise DriverReadError on failure."""
        raise NotImplementedError

    async def write(self, point: str, value: Any) -> None:
        """Write ``value`` to ``point`` (a write from the OPC UA server, when allowed by config).

        Raises:
            DriverWriteError: the driver cannot write, or the device refused.
        """
        raise DriverWriteError(f"driver {self.config.driver} cannot write points", "not_writable")

    async def stop(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release the device. Must not raise."""

    async def stream(self) -> AsyncIterator[list[Reading]]:
        """Yield batches of readings until cancelled.

        The default calls ``read()`` on a fixed schedule (``interval``), skipping slots it
        overran rather than bunching polls up, and reports each poll's outcome. A failing
        poll never ends the stream.
        """
        interval = self.config.interval
        next_at = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                readings = await self.read()
            except Exception as exc:
                self.context.observe_poll(time.monotonic() - started)
                self.context.poll_failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            else:
                self.context.observe_poll(time.monotonic() - started)
                self.context.poll_ok()
                if readings:
                    yield readings
            next_at = await next_slot(next_at, interval)


# A technician command: gets the arguments after ``edge-agent <verb> <driver>``, returns an exit code.
ToolMain = Callable[[list[str]], int]
# ``edge-agent doctor``'s check of a driver's devices, when starting each one is wrong for it: gets the
# devices and the seconds per check, returns rows (target, verdict ok | warn | FAIL, finding, fix or None).
DoctorCheck = Callable[[list[DeviceConfig], float], Awaitable[list[tuple[str, str, str, str | None]]]]


@dataclass(frozen=True)
class DriverPlugin:
    """The entry point object a driver package exposes (kept light: no heavy imports).

    Attributes:
        name: the ``driver:`` value in the config.
        config_model: pydantic model of the device's keys (``driver: Literal[name]``).
        factory: returns the Driver class; imported only when a device of this kind runs.
        summary: one line for ``edge-agent drivers``.
        tools: returns the driver's technician commands, verb -> ``main(argv) -> exit code``;
            ``edge-agent <verb> <driver> ...`` runs one (e.g. ``scan``, ``read``, ``simulate``).
            A verb the driver offers without a driver argument (``profiles``) is reached as
            ``edge-agent <verb>`` when exactly that verb is named in ``global_verbs``.
        check_devices: cross-device checks run when the config loads (e.g. two devices on one
            RS-485 port with different baud rates); gets ``(index, config)`` of this driver's
            devices, returns problems as ``devices[i].field: message``.
        links: the upstream connections its running devices share (a LoRaWAN network server's
            broker): name -> ``{"connected": bool, <counter>: int, ...}``; read from the metrics
            thread, so it must only read. They are in ``city.gateway.health`` (``links``),
            ``edge_agent_driver_link_up`` and ``edge_agent_driver_link_messages_total`` (by counter).
        doctor: checks this driver's devices for ``edge-agent doctor`` instead of starting each
            one (a LoRaWAN device reports hourly, and its driver would take over the running
            agent's session).
        add_hit: the technician page's "add a device from a scan hit": gets the site file's text,
            the hit the page posted and the file's path, returns (the text with the device added,
            its id); raises ValueError naming the hit's wrong field (``hit.unit: ...``).
        bus_tools: returns its scan and typed read for the technician page (agent/devices/bus_tools.py).
    """

    name: str
    config_model: type[DeviceConfig]
    factory: Callable[[], type[Driver]]
    summary: str = ""
    tools: Callable[[], dict[str, ToolMain]] | None = None
    global_verbs: tuple[str, ...] = ()
    check_devices: Callable[[list[tuple[int, DeviceConfig]]], list[str]] | None = None
    links: Callable[[], dict[str, dict[str, Any]]] | None = None
    doctor: DoctorCheck | None = None
    add_hit: Callable[[str, object, Path], tuple[str, str]] | None = None
    bus_tools: Callable[[], BusTools] | None = None
