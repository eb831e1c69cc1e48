"""Settings of the Sparkplug B edge node (``uplink.sparkplug`` in the site file).

Broker, TLS and password rules are ``uplink.mqtt``'s (its :class:`TlsConfig` and password file
handling); the Sparkplug ids may not hold the MQTT topic characters ``/``, ``+`` or ``#``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from agent.config.model import is_loopback
from agent.devices.api import DevicePoint, Duration, StrictModel, resolve_path
from agent.uplinks.api import UplinkSettings
from agent.uplinks.mqtt.config import PLAIN_PORT, TLS_PORT, BrokerLogin, TlsConfig, check_password_file

PASSWORD_ENV = "EDGE_AGENT_SPARKPLUG_PASSWORD"  # noqa: S105 - the variable's name, not a secret
TOPIC_CHARS = ("/", "+", "#")


def sparkplug_id(value: str | None) -> str | None:
    """A group, edge node, host or device id: one topic level, so none of ``/ + #``."""
    if value is None:
        return None
    if not value:
        raise ValueError("must not be empty")
    bad = [c for c in TOPIC_CHARS if c in value]
    if bad:
        raise ValueError(f"{value!r} contains {' '.join(bad)}: a Sparkplug id is one MQTT topic level")
    return value


class Server(StrictModel):
    """One MQTT server; the edge node tries them in order."""

    host: str = Field(min_length=1, description="Broker host name or address.")
    port: int | None = Field(default=None, ge=1, le=65535, description="Default 8883 with TLS, else 1883.")


class WritablePoint(DevicePoint):
    """A point SCADA may write with DCMD (its device config must also say ``writable: true``)."""

    _ids = field_validator("device", "point")(sparkplug_id)


class SparkplugConfig(BrokerLogin, UplinkSettings):
    """A Sparkplug B 3.0 edge node: the devices' values for SCADA hosts, DCMD writes back."""

    password_env: ClassVar[str] = PASSWORD_ENV
    enabled: bool = Field(default=False, description="Run the Sparkplug B edge node.")
    servers: list[Server] = Field(
        default_factory=lambda: [Server(host="127.0.0.1")],
        min_length=1,
        description="MQTT servers, tried in order; after one fails or its primary host goes offline, the next.",
    )
    group_id: str = Field(default="edge", description="Sparkplug group id (topic level 2).")
    edge_node_id: str | None = Field(default=None, description="Edge node id; default the gateway id.")
    primary_host_id: str | None = Field(
        default=None,
        description="SCADA host whose STATE gates the session: no BIRTH until it is online; offline: next server.",
    )
    aliases: bool = Field(default=True, description="Metric aliases: BIRTHs carry name and alias, DATA the alias.")
    writable: list[WritablePoint] = Field(default_factory=list, description="Points SCADA may write with DCMD.")
    client_id: str | None = Field(default=None, description="MQTT client id; default spb-{group}-{edge node}.")
    username: str | None = Field(default=None, description="Broker user name.")
    password_file: Path | None = Field(
        default=None, description=f"File holding the broker password (or set ${PASSWORD_ENV}). Never inline."
    )
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT protocol version.")
    keepalive: Duration = Field(
        default=30.0, ge=1, le=3600,
        description="MQTT keepalive; buffered DATA counts as delivered once the connection outlived it.",
    )  # fmt: skip
    reconnect_min: Duration = Field(default=1.0, gt=0, description="Least wait between two rounds of the servers.")
    reconnect_max: Duration = Field(default=10.0, gt=0, description="Most wait between two rounds of the servers.")
    write_timeout: Duration = Field(default=3.0, gt=0, le=60, description="How long a DCMD write waits for the device.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings, as uplink.mqtt's.")

    _ids = field_validator("group_id", "edge_node_id", "primary_host_id")(sparkplug_id)
    _paths = field_validator("password_file", mode="before")(resolve_path)

    _password = field_validator("password_file")(check_password_file)

    @model_validator(mode="after")
    def _secure(self) -> SparkplugConfig:
        tls = self.tls.model_copy()
        tls._remote_broker = any(not is_loopback(s.host) for s in self.servers)
        object.__setattr__(self, "tls", tls)
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        self.check_login(next((s.host for s in self.servers if not is_loopback(s.host)), None))
        return self

    def active(self) -> bool:
        """Off unless ``enabled``."""
        return self.enabled

    def port(self, server: Server) -> int:
        """A server's port: its own, else the TLS or plain default."""
        return server.port or (TLS_PORT if self.tls.active else PLAIN_PORT)

    def warnings(self, prefix: str) -> list[str]:
        """Plain MQTT to another host."""
        remote = [s.host for s in self.servers if not is_loopback(s.host)]
        if self.tls.enabled is False and remote:
            return [f"{prefix}.tls.enabled: plain MQTT to {remote[0]}: Sparkplug traffic travels unencrypted; "
                    f"remove 'enabled: false' and use the broker's TLS port ({TLS_PORT})"]  # fmt: skip
        return []
