"""A test uplink: accepted events appended to a JSON-lines file, each batch fsynced before it is acknowledged.

It exists to prove the uplink seam (issue 14): a new uplink is one folder plus an entry point,
with no edit in the core. Nothing registers it in pyproject.toml; tests/uplinks/test_seam.py
registers it for an agent process of its own through a ``*.dist-info`` folder on PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from agent.devices.api import Duration, resolve_path
from agent.uplinks.api import UplinkPlugin, UplinkSettings


class JsonlConfig(UplinkSettings):
    """``uplink.jsonl``: where the events go, how many per write, how soon to try again."""

    path: Path = Field(
        description="The JSON-lines file (relative to the config file). Its folder missing is an outage: "
        "events stay buffered and the uplink tries again."
    )
    batch: int = Field(default=500, ge=1, le=10000, description="Events per write (one fsync each).")
    retry: Duration = Field(default=0.2, gt=0, description="Wait after a failed write, and between idle checks.")
    enabled: bool = Field(default=True, description="false: configured but not running.")

    _path = field_validator("path", mode="before")(resolve_path)

    def active(self) -> bool:
        """Off when ``enabled`` is false."""
        return self.enabled


PLUGIN = UplinkPlugin(
    name="jsonl",
    config_model=JsonlConfig,
    kind="durable",
    factory="tests.uplinks.jsonl_uplink.uplink:create",
    summary="Test uplink: every accepted event as one line of a JSON-lines file.",
    title="JSON lines",
)
