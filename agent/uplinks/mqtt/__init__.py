"""The MQTT uplink: CloudEvents JSON to the operations centre's broker, at least once."""

from __future__ import annotations

from agent.uplinks.api import UplinkPlugin
from agent.uplinks.mqtt.config import MqttConfig

PLUGIN = UplinkPlugin(
    name="mqtt",
    config_model=MqttConfig,
    kind="durable",
    factory="agent.uplinks.mqtt.uplink:create",
    summary="MQTT broker of the operations centre.",
    title="MQTT",
    default_on=True,
    owns_buffer_file=True,
    checker="agent.tools.doctor.steps:check_uplink",  # the doctor's broker checks, step by step
)
