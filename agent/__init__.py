"""City edge gateway agent: field devices in, CloudEvents over MQTT out."""

__version__ = "0.1.0"
