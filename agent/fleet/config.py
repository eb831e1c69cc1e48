"""``fleet:`` in the site file: who may sign commands for this gateway, and what they may do."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.contract.events import TOPIC_ROOT_PATTERN
from agent.devices.api import DevicePoint, StrictModel
from agent.fleet.identity.config import IdentityConfig

Scope = Literal["config", "read", "write", "restart", "diagnostics", "keys", "bundle"]
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
GROUP_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class FleetKey(StrictModel):
    """An operator key trusted to sign documents and commands for this gateway."""

    id: str = Field(pattern=KEY_ID_PATTERN, description="Key id, as `edge-agent fleet keygen` printed it.")
    public_key: str = Field(description="The public key, `ed25519:<base64>`, as `edge-agent fleet keygen` printed it.")
    scopes: list[Scope] = Field(
        min_length=1, description="What it may sign: config, read, write, restart, diagnostics, keys, bundle."
    )

    @field_validator("public_key")
    @classmethod
    def _parses(cls, value: str) -> str:
        from agent.fleet.envelope import TrustedKey

        TrustedKey.from_text("check", value, ())  # raises ValueError naming the problem
        return value


class FleetConfig(StrictModel):
    """The control channel from the operations centre (docs/fleet.md); off by default."""

    enabled: bool = Field(default=False, description="Take signed commands over the MQTT uplink's connection.")
    root: str = Field(
        default="fleet/v1",
        pattern=TOPIC_ROOT_PATTERN,
        description="Topic root of the control channel: requests on {root}/{gateway}/req/{id}/{command}, "
        "replies on {root}/{gateway}/res/{id}/{status}. Never under the events' topic_prefix.",
    )
    groups: list[str] = Field(
        default_factory=list, description="Groups this gateway belongs to: a document may target `group:<name>`."
    )
    keys: list[FleetKey] = Field(default_factory=list, description="Operator keys trusted to sign.")
    writable: list[DevicePoint] = Field(
        default_factory=list, description="Points remote `write` commands may set (none by default)."
    )
    clock: Literal["kernel", "trusted"] = Field(
        default="kernel",
        description="kernel: refuse time-bound requests while the kernel says the clock is not synchronised "
        "(NTP); trusted: the clock is set by other means the kernel does not report (GPS, PTP, an RTC).",
    )
    requests_per_minute: int = Field(
        default=120, ge=1, le=6000, description="Inbound requests taken per minute at most; the rest are refused."
    )
    identity: IdentityConfig | None = Field(
        default=None, description="The MQTT client certificate comes from the provisioning responder (null: off)."
    )

    @field_validator("groups")
    @classmethod
    def _group_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(GROUP_PATTERN, name):
                raise ValueError(f"group {name!r}: lowercase letters, digits, - and _ only")
        return value

    @model_validator(mode="after")
    def _usable(self) -> FleetConfig:
        if self.enabled and not self.keys:
            raise ValueError("enabled without keys: nobody could sign a command (run edge-agent fleet keygen)")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key ids must be unique")
        return self
