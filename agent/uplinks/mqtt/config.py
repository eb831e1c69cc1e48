"""Settings of the MQTT uplink (``uplink.mqtt`` in the site file)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from agent.config.model import is_loopback
from agent.config.yaml_load import ECHO_CHARS, clip_text
from agent.contract.compact import DEFAULT_LEVEL
from agent.contract.events import TOPIC_ROOT_PATTERN
from agent.contract.units import parse_size
from agent.devices.api import Duration, Size, StrictModel, TlsFiles, readable_file, resolve_path
from agent.uplinks.api import UplinkSettings

PASSWORD_ENV = "EDGE_AGENT_MQTT_PASSWORD"  # noqa: S105 - the variable's name, not a secret
PLAIN_PORT, TLS_PORT = 1883, 8883


def check_password_file(value: Path | None) -> Path | None:
    """A ``password_file`` key's check: a readable file that is not empty."""
    value = readable_file(value)
    if value is not None and not _read_secret(value):
        raise ValueError(f"password file is empty: {value}")
    return value


class TlsConfig(TlsFiles):
    """TLS to the broker, always verified. On unless the broker is loopback (or ``enabled: false``)."""

    enabled: bool | None = Field(
        default=None,
        description="TLS on or off. null: on, unless the broker is loopback (127.0.0.1, ::1, localhost) and no "
        "TLS file is set. Plain MQTT to another host needs false, and validate and doctor warn about it.",
    )

    # Set by MqttConfig from its host: whether the default (enabled: null) is on.
    _remote_broker: bool = PrivateAttr(default=False)

    @property
    def active(self) -> bool:
        """Whether TLS is used."""
        if self.enabled is not None:
            return self.enabled
        return self._remote_broker or any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))

    def apply_to(self, client: Any) -> None:
        """Set up a paho client's TLS: the broker's certificate and host name always verified.

        The uplink and ``edge-agent doctor`` both use it, so the doctor tests what the agent does.
        """
        client.tls_set(
            ca_certs=str(self.ca_file) if self.ca_file else None,
            certfile=str(self.cert_file) if self.cert_file else None,
            keyfile=str(self.key_file) if self.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )


class BatchConfig(StrictModel):
    """Several events per MQTT message, for links that pay per message."""

    enabled: bool = Field(
        default=False,
        description="Publish JSON arrays of events (CloudEvents batch format) on {prefix}/{gateway}/batch.",
    )
    max_events: int = Field(default=100, ge=1, le=10000, description="Events per message at most.")
    max_bytes: Size = Field(
        default=parse_size("128KiB"), ge=1024, description="Message size at most (one event may exceed it alone)."
    )


class CompactConfig(StrictModel):
    """Compressed messages for metered links: a consumer must decode them (docs/events.md, "Compact payloads")."""

    enabled: bool = Field(
        default=False,
        description="Send every event message (single or batch) zlib-compressed with the contract's preset "
        "dictionary on {prefix}/{gateway}/deflate instead of the per-device and batch topics. The JSON inside "
        "is unchanged. Consumers must decode it (agent.contract.compact).",
    )
    level: int = Field(
        default=DEFAULT_LEVEL,
        ge=1,
        le=9,
        description="zlib level: 1 is fastest, 9 smallest (bench/payload.py: 9 costs up to 3.5x the CPU of 6 "
        "for 4-8% fewer bytes).",
    )


class BrokerLogin:
    """The login of an uplink to an MQTT broker (``uplink.mqtt``, ``uplink.sparkplug``): a password
    read at connect time from ``password_file`` or the ``password_env`` variable, never kept in the
    config, never logged, never sent in clear text off loopback."""

    password_env: ClassVar[str] = PASSWORD_ENV
    if TYPE_CHECKING:
        username: str | None
        password_file: Path | None
        tls: TlsConfig

    def check_login(self, remote: str | None) -> None:
        """Refuse a password without a user name, or sent without TLS to ``remote`` (a host off loopback)."""
        sends_password = self.password_file is not None or bool(os.environ.get(self.password_env))
        if sends_password and not self.tls.active and remote is not None:
            raise ValueError(f"refusing to send a password in clear text to {remote}: enable tls")
        if sends_password and self.username is None:
            raise ValueError("a password is set but no username")

    def password(self) -> str | None:
        """Read the secret at connect time (never kept in the config, never logged)."""
        if self.password_file is not None:
            return _read_secret(self.password_file)
        return os.environ.get(self.password_env) or None

    def secrets(self) -> list[str]:
        """The broker password, so the logs redact it."""
        try:
            password = self.password()
        except (OSError, UnicodeDecodeError, ValueError):
            return []  # unreadable now: the uplink says so when it connects
        return [password] if password else []

    def secret_files(self, prefix: str) -> list[tuple[str, Path]]:
        """The password file and the TLS client key."""
        files = [(f"{prefix}.password_file", self.password_file), (f"{prefix}.tls.key_file", self.tls.key_file)]
        return [(name, path) for name, path in files if path is not None]


class MqttConfig(BrokerLogin, UplinkSettings):
    """The MQTT uplink to the operations centre's broker."""

    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(
        default=PLAIN_PORT, ge=1, le=65535, description="Broker port; default 8883 when TLS is on, else 1883."
    )
    topic_prefix: str = Field(
        default="ioc/v1",
        pattern=TOPIC_ROOT_PATTERN,
        description="Topic root; events go to {prefix}/{gateway}/{device}/{kind}.",
    )
    qos: Literal[0, 1, 2] = Field(
        default=1, description="1: at-least-once (events leave the buffer only after PUBACK)."
    )
    client_id: str | None = Field(default=None, description="MQTT client id; default edge-agent-{gateway id}.")
    username: str | None = Field(default=None, description="Broker user name.")
    password_file: Path | None = Field(
        default=None,
        description=f"File holding the broker password (or set ${PASSWORD_ENV}). Never inline.",
    )
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT protocol version.")
    keepalive: Duration = Field(default=30.0, ge=5, le=3600, description="MQTT keepalive.")
    max_inflight: int = Field(
        default=100, ge=1, le=65535, description="QoS 1 messages in flight before waiting for PUBACKs."
    )
    reconnect_min: Duration = Field(default=1.0, gt=0, description="Least time between two connection attempts.")
    reconnect_max: Duration = Field(
        default=10.0,
        gt=0,
        description="Retry period while the broker is away; the first wait after a held connection drops is "
        "random within it, so a fleet comes back spread over it (docs/delivery.md).",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings.")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batching (off by default).")
    compact: CompactConfig = Field(
        default_factory=CompactConfig, description="Compressed payloads for metered links (off by default)."
    )

    _paths = field_validator("password_file", mode="before")(resolve_path)

    _password = field_validator("password_file")(check_password_file)

    @model_validator(mode="after")
    def _secure(self) -> MqttConfig:
        # Frozen models: the defaults that follow from other keys are set once, here.
        tls = self.tls.model_copy()
        tls._remote_broker = not is_loopback(self.host)
        object.__setattr__(self, "tls", tls)
        if "port" not in self.model_fields_set:
            object.__setattr__(self, "port", TLS_PORT if tls.active else PLAIN_PORT)
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        self.check_login(None if is_loopback(self.host) else self.host)
        return self

    def warnings(self, prefix: str) -> list[str]:
        """Plain MQTT to another host."""
        if self.tls.enabled is False and not is_loopback(self.host):
            return [
                f"{prefix}.tls.enabled: plain MQTT to {clip_text(self.host, ECHO_CHARS)}: events travel unencrypted "
                f"and unauthenticated; remove 'enabled: false' (TLS is the default) and use the broker's TLS port "
                f"({TLS_PORT})"
            ]
        return []


def mqtt_settings(config: Any) -> MqttConfig:
    """``uplink.mqtt`` of a loaded site config, typed (the site model is built from the plugins)."""
    settings = config.uplink.mqtt
    if not isinstance(settings, MqttConfig):
        raise TypeError("the site config has no uplink.mqtt")
    return settings


MAX_SECRET_BYTES = 4096


def _read_secret(path: Path) -> str:
    """A password file's text, stripped; a ValueError if it is larger than a password can be."""
    with path.open("rb") as file:
        data = file.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"not a password file (larger than {MAX_SECRET_BYTES} bytes): {path}")
    return data.decode("utf-8").strip()
