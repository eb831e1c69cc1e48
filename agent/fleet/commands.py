"""The commands the fleet channel runs: ``ping``, ``read`` a point, ``write`` an allowed point,
``restart`` a device.

(``status`` is the agent's own: the health data; ``doctor`` and ``diagnostics`` are in
agent/fleet/diagnostics.py.) Each returns a reply; none raises.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.contract.events import format_time
from agent.errors import DriverWriteError
from agent.fleet.config import FleetConfig
from agent.fleet.latest import LatestValues
from agent.uplinks.api import Command, Inbound, Reply

if TYPE_CHECKING:
    from agent.runtime.devices import DeviceSet

# A write the device may or may not have applied is not a refusal: the operator must look.
_FAILED_KINDS = frozenset({"timeout", "device_error", "unavailable"})
RESTART_SETTLE = 5.0  # seconds a restart waits for the device's first poll before answering


class FleetCommands:
    """Handlers registered on the inbound router when the fleet channel is on."""

    def __init__(
        self,
        gateway: str,
        latest: LatestValues,
        inbound: Inbound,
        config: Callable[[], FleetConfig],
        devices: DeviceSet | None = None,
        enabled: Callable[[str], bool | None] | None = None,
    ) -> None:
        """``config`` gives the current ``fleet:`` section (a reload may change the writable points).

        ``devices``: the running devices, for ``restart``; ``enabled(id)``: whether the site
        file enables that device (None: it has no such device).
        """
        self.gateway = gateway
        self.latest = latest
        self._inbound = inbound
        self._config = config
        self._devices = devices
        self._enabled = enabled

    async def ping(self, command: Command) -> Reply:
        """Proof of life, with the gateway's clock."""
        return Reply("ok", data={"gateway": self.gateway, "time": format_time(datetime.now(UTC))})

    async def read(self, command: Command) -> Reply:
        """The latest value of ``args.device``'s ``args.point``, and its age."""
        device, point = _text(command.args, "device"), _text(command.args, "point")
        if device is None or point is None:
            return Reply("rejected", code="bad_args", error="read needs args.device and args.point (text)")
        found = self.latest.read(device, point)
        if found is None:
            known = device in self.latest.devices()
            why = f"no point {point!r} in {device}'s readings" if known else f"no readings from {device!r}"
            return Reply("rejected", code="unknown_point", error=why)
        return Reply("ok", data=found)

    async def write(self, command: Command) -> Reply:
        """Write ``args.value`` to a point the site file opens to remote writes."""
        device, point = _text(command.args, "device"), _text(command.args, "point")
        if device is None or point is None or "value" not in command.args:
            return Reply("rejected", code="bad_args", error="write needs args.device, args.point and args.value")
        allowed = {(w.device, w.point) for w in self._config().writable}
        if (device, point) not in allowed:
            return Reply("rejected", code="not_writable", error=f"{device}/{point} is not in fleet.writable")
        value: Any = command.args["value"]
        try:
            await self._inbound.write(device, point, value, origin="fleet")
        except DriverWriteError as exc:
            if exc.kind in _FAILED_KINDS:
                return Reply("failed", code=exc.kind, error=str(exc))
            return Reply("rejected", code=exc.kind, error=str(exc))
        return Reply("ok", data={"device": device, "point": point, "value": value})

    async def restart(self, command: Command) -> Reply:
        """Stop ``args.device`` and start it again; the others keep polling, its seq continues."""
        device = _text(command.args, "device")
        if device is None:
            return Reply("rejected", code="bad_args", error="restart needs args.device (text)")
        if self._devices is None or self._enabled is None:
            return Reply("unsupported", code="unknown_command", error="this agent cannot restart devices")
        enabled = self._enabled(device)
        if enabled is None:
            return Reply("rejected", code="unknown_device", error=f"no device {device!r} in the site file")
        if not enabled:
            return Reply("rejected", code="device_disabled", error=f"{device} is disabled (enabled: false)")
        runner = await self._devices.restart(device, settle=RESTART_SETTLE)
        if runner is None:
            return Reply("rejected", code="unavailable", error=f"{device} is not running (the agent is stopping?)")
        data: dict[str, Any] = {"device": device, "status": runner.status}
        if runner.reason:
            data["reason"] = runner.reason
        return Reply("ok", data=data)


def _text(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    return value if isinstance(value, str) and value else None
