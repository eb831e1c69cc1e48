"""``fleet.identity.renew`` in the site file: when the gateway asks for a new certificate."""

from __future__ import annotations

from pydantic import Field

from agent.devices.api import Duration, StrictModel


class RenewConfig(StrictModel):
    """Certificate renewal over the operational connection (docs/fleet.md, "Certificate renewal")."""

    enabled: bool = Field(default=True, description="Renew the client certificate before it expires.")
    at_fraction: float = Field(
        default=2 / 3,
        gt=0,
        lt=1,
        description="Renew once this share of the certificate's lifetime has passed (2/3: day 60 of 90)...",
    )
    before_expiry_days: float = Field(
        default=30, ge=0, description="...or this many days before it expires, whichever comes first."
    )
    retry_hours: float = Field(
        default=24, gt=0, description="After a failed renewal, try again after this long (±20 % jitter)."
    )
    expiring_days: float = Field(
        default=7,
        ge=0,
        description="With this many days or fewer left, a city.gateway.cert.expiring event goes out (once a day).",
    )
    answer_timeout: Duration = Field(
        default=60.0, ge=1, description="How long to wait for the responder's answer to a renewal request."
    )
    swap_timeout: Duration = Field(
        default=120.0,
        ge=1,
        description="How long the uplink may take to connect once with the new certificate before the "
        "attempt counts as failed (the old certificate stays).",
    )
