"""The MQTT uplink: CloudEvents JSON to the operations centre's broker, at least once."""

from __future__ import annotations

from agent.uplinks.api import UplinkFactory, UplinkPlugin
from agent.uplinks.mqtt.config import MqttConfig


def _factory() -> UplinkFactory:
    from agent.uplinks.mqtt.uplink import create

    return create


PLUGIN = UplinkPlugin(
    name="mqtt",
    config_model=MqttConfig,
    kind="durable",
    factory=_factory,
    summary="MQTT broker of the operations centre.",
    title="MQTT",
    default_on=True,
    owns_buffer_file=True,
)
