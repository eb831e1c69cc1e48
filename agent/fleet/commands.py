"""The commands the fleet channel runs: ``ping``, ``read`` a point, ``write`` an allowed point.

(``status`` is the agent's own: the health data.) Each returns a reply; none raises.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.contract.events import format_time
from agent.errors import DriverWriteError
from agent.fleet.config import FleetConfig
from agent.fleet.latest import LatestValues
from agent.uplinks.api import Command, Inbound, Reply

# A write the device may or may not have applied is not a refusal: the operator must look.
_FAILED_KINDS = frozenset({"timeout", "device_error", "unavailable"})


class FleetCommands:
    """Handlers registered on the inbound router when the fleet channel is on."""

    def __init__(self, gateway: str, latest: LatestValues, inbound: Inbound, config: Callable[[], FleetConfig]) -> None:
        """``config`` gives the current ``fleet:`` section (a reload may change the writable points)."""
        self.gateway = gateway
        self.latest = latest
        self._inbound = inbound
        self._config = config

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


def _text(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    return value if isinstance(value, str) and value else None
