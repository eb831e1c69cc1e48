"""The Sparkplug B 3.0 edge node: devices' values to SCADA hosts over MQTT, DCMD writes back."""

from __future__ import annotations

from agent.uplinks.api import UplinkPlugin
from agent.uplinks.sparkplug.config import SparkplugConfig

PLUGIN = UplinkPlugin(
    name="sparkplug",
    config_model=SparkplugConfig,
    kind="durable",
    factory="agent.uplinks.sparkplug.uplink:create",
    summary="A Sparkplug B 3.0 edge node for SCADA hosts (off by default).",
    title="Sparkplug",
    default_on=True,
)
