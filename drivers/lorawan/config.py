"""Config keys of the ``lorawan`` driver: the network server's MQTT integration, and one device on it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from agent.devices.api import DeviceConfig, Duration, StrictModel, TlsFiles, readable_file, resolve_path

PLAIN_PORT, TLS_PORT = 1883, 8883
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# TTS ids: lowercase letters, digits and dashes (its identifier rules), application@tenant.
_TTS_APP = re.compile(r"^[a-z0-9](?:[-]?[a-z0-9]){1,35}@[a-z0-9](?:[-]?[a-z0-9]){1,35}$")


class ServerTls(TlsFiles):
    """TLS to the network server's broker, always verified (the system's CAs unless ``ca_file``)."""


class NetworkServer(StrictModel):
    """Where the network server's MQTT integration publishes. Devices naming the same broker and
    application share one connection, so these settings must be the same on each of them."""

    type: Literal["chirpstack", "tts"] = Field(
        description="chirpstack (v4 MQTT integration, json=true) or tts (The Things Stack v3 MQTT server)."
    )
    broker: str = Field(description="host or host:port (default port 1883, 8883 with tls).")
    tls: ServerTls | None = Field(default=None, description="TLS settings; null: plain MQTT.")
    username: str | None = Field(default=None, description="MQTT user; tts: default the application (app@tenant).")
    password_file: Path | None = Field(
        default=None, description="File holding the password (tts: an API key); never logged."
    )
    client_id: str | None = Field(
        default=None,
        max_length=64,
        description="MQTT client id, fixed so the broker keeps the session (chirpstack) across restarts. "
        "null: derived from broker and application; two gateways reading one application need their own.",
    )
    state_dir: Path = Field(
        default=Path("var/lorawan"),
        validate_default=True,
        description="Where each device's dedupe state is kept (0600 files, 0700 folder); relative to the config file.",
    )

    _paths = field_validator("password_file", "state_dir", mode="before")(resolve_path)

    @field_validator("password_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if not host or any(c.isspace() for c in host) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"{value!r}: give host or host:port (port 1..65535)")
        return value

    @property
    def host(self) -> str:
        return self.broker.rpartition(":")[0] if self.broker.count(":") == 1 else self.broker

    @property
    def port(self) -> int:
        if self.broker.count(":") == 1:
            return int(self.broker.rpartition(":")[2])
        return TLS_PORT if self.tls is not None else PLAIN_PORT


class LorawanConfig(DeviceConfig):
    """A LoRaWAN device (parking detector or sensor) read from its network server's MQTT integration."""

    driver: Literal["lorawan"] = Field(description="LoRaWAN device behind a network server.")
    network_server: NetworkServer = Field(description="The network server's MQTT integration.")
    application: str = Field(
        description="chirpstack: the application id (a lowercase UUID, not the JoinEUI); tts: application@tenant."
    )
    dev_eui: str = Field(description="The device's DevEUI: 16 hex digits, any case.")
    codec: str = Field(
        description="Payload codec: nwave-nps405, nwave-nps310, bosch-tps110, milesight-em300-th, milesight-em400-mud "
        "(edge-agent scan lorawan guesses one)."
    )
    bay: str | None = Field(
        default=None, validate_default=True, description="Detectors: the parking bay it watches (required for them)."
    )
    interval: Duration = Field(default=3600.0, gt=0, description="How often the device reports (its heartbeat).")
    offline_after: int = Field(
        default=2, ge=1, description="Intervals without anything heard before city.device.status offline."
    )
    health_interval: Duration = Field(
        default=3600.0, gt=0, description="city.device.health at most this often (and on a battery-class change)."
    )

    @field_validator("dev_eui")
    @classmethod
    def _dev_eui(cls, value: str) -> str:
        compact = value.replace("-", "").replace(":", "")
        if not re.fullmatch(r"[0-9a-fA-F]{16}", compact):
            raise ValueError(f"{value!r} is not a DevEUI: 16 hex digits (any case, - or : between bytes allowed)")
        return compact.lower()

    @field_validator("application")
    @classmethod
    def _application(cls, value: str, info: ValidationInfo) -> str:
        server = info.data.get("network_server")
        if server is None:
            return value  # its own error is reported
        if server.type == "chirpstack" and not _UUID.fullmatch(value):
            if _UUID.fullmatch(value.lower()):
                hint = "ChirpStack's topics are case-sensitive: write it in lowercase"
            else:
                hint = "ChirpStack names an application by its id, a UUID; not the JoinEUI"
            raise ValueError(f"{value!r} is not a lowercase UUID ({hint})")
        if server.type == "tts" and not _TTS_APP.fullmatch(value):
            raise ValueError(f"{value!r}: The Things Stack wants application@tenant (lowercase, e.g. parking@ttn)")
        return value

    @field_validator("codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        from drivers.lorawan.codecs import UnknownCodec, get_codec

        try:
            get_codec(value)
        except UnknownCodec as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("bay")
    @classmethod
    def _bay(cls, value: str | None, info: ValidationInfo) -> str | None:
        from drivers.lorawan.codecs import get_codec

        name = info.data.get("codec")
        if name is None:
            return value  # the codec's own error is reported
        role = get_codec(name).role
        if role == "detector" and not value:
            raise ValueError(f"codec {name} is a parking detector: give the bay it watches")
        if role != "detector" and value:
            raise ValueError(f"codec {name} is a sensor, not a parking detector: remove bay")
        return value

    def connection_key(self) -> str:
        """Devices with the same key share one MQTT connection."""
        return f"{self.network_server.type}:{self.network_server.host}:{self.network_server.port}/{self.application}"

    def client_id(self) -> str:
        """The fixed MQTT client id of this device's connection."""
        if self.network_server.client_id:
            return self.network_server.client_id
        digest = hashlib.sha256(self.connection_key().encode()).hexdigest()[:16]
        return f"edge-agent-lorawan-{digest}"


def differing_key(a: NetworkServer, b: NetworkServer) -> str | None:
    """The first key two devices' network_server settings disagree on (None: they agree)."""
    one: dict[str, Any] = a.model_dump()
    other: dict[str, Any] = b.model_dump()
    return next((key for key in NetworkServer.model_fields if one[key] != other[key]), None)
