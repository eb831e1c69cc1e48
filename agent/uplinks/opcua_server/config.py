"""``uplink.opcua`` in the site file: the gateway's OPC UA server, validated with the rest of the file.

No asyncua import here: the site file loads (and ``edge-agent validate`` runs) without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.devices.api import DevicePoint, Duration, resolve_path
from agent.uplinks.api import UplinkSettings

PolicyName = Literal[
    "None",
    "Basic256Sha256_Sign",
    "Basic256Sha256_SignAndEncrypt",
    "Aes128Sha256RsaOaep_Sign",
    "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Aes256Sha256RsaPss_Sign",
    "Aes256Sha256RsaPss_SignAndEncrypt",
]


# One variable OPC UA clients may write: it goes back to the device through ``on_write``.
WritablePoint = DevicePoint


class OpcUaServerConfig(UplinkSettings):
    """The gateway's own OPC UA server (``uplink.opcua`` in the site file)."""

    enabled: bool = Field(default=False, description="Serve the devices' values over OPC UA.")
    listen: str = Field(
        default="opc.tcp://127.0.0.1:4840",
        pattern=r"^opc\.tcp://[^/\s:]+:\d+(/\S*)?$",
        description="Endpoint URL to listen on (opc.tcp://address:port[/path]). The default serves this host only "
        "(loopback); give the address of the interface SCADA reaches, or 0.0.0.0 for every interface.",
    )
    security_policies: list[PolicyName] = Field(
        default_factory=lambda: list[PolicyName](["Basic256Sha256_SignAndEncrypt"]),
        min_length=1,
        description="Endpoints offered: None, Basic256Sha256_Sign(AndEncrypt), Aes128Sha256RsaOaep_..., "
        "Aes256Sha256RsaPss_...",
    )
    allow_anonymous: bool = Field(default=False, description="Let sessions without a login read (never write).")
    users_file: Path | None = Field(default=None, description="Users, one `name:password` per line (# comments).")
    user: str | None = Field(default=None, description="A single user (with password_file).")
    password_file: Path | None = Field(default=None, description="The single user's password. Never inline.")
    cert_dir: Path | None = Field(
        default=None, description="Folder of the server certificate (created on first run); needed for security."
    )
    trusted_clients_dir: Path | None = Field(
        default=None,
        description="With security: the only client application certificates accepted (DER or PEM files, or the "
        "CA certificates that issued them). Default: `<cert_dir>/trusted-clients`, created empty, so no client "
        "connects until trusted; a refused certificate is saved in `<cert_dir>/rejected-clients` to move there.",
    )
    writable: list[WritablePoint] = Field(default_factory=list, description="Variables clients may write.")
    write_timeout: Duration = Field(
        default=3.0, gt=0, le=60,
        description="How long a client's write waits for the device; then it is answered BadTimeout.",
    )  # fmt: skip
    publish_interval: Duration = Field(
        default=0.2, gt=0, le=10, description="Values reach the address space at most this often (coalesced)."
    )

    _paths = field_validator("users_file", "password_file", "cert_dir", "trusted_clients_dir", mode="before")(
        resolve_path
    )

    @field_validator("trusted_clients_dir")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"folder not found: {value}")
        return value

    @field_validator("users_file", "password_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not (value.is_file() and os.access(value, os.R_OK)):
            raise ValueError(f"file not found or not readable: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaServerConfig:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file go together (the password is never written inline)")
        if self.enabled and any(p != "None" for p in self.security_policies) and self.cert_dir is None:
            raise ValueError("cert_dir is required with a security policy other than None (the server certificate "
                             "is created there)")  # fmt: skip
        if self.enabled and not (self.allow_anonymous or self.users_file or self.user):
            raise ValueError("nobody could log in: give users_file, user/password_file, or allow_anonymous: true")
        if self.writable and not (self.users_file or self.user):
            raise ValueError("writable points need users (anonymous sessions never write)")
        if self.trusted_clients_dir is not None and all(p == "None" for p in self.security_policies):
            raise ValueError("trusted_clients_dir needs a security policy other than None (without one, clients "
                             "present no certificate)")  # fmt: skip
        return self

    def active(self) -> bool:
        """Off unless ``enabled``."""
        return self.enabled

    def secret_files(self, prefix: str) -> list[tuple[str, Path]]:
        """The users file and the single user's password file."""
        files = [(f"{prefix}.users_file", self.users_file), (f"{prefix}.password_file", self.password_file)]
        return [(name, path) for name, path in files if path is not None]

    @property
    def secure(self) -> bool:
        """Whether an endpoint with a security policy (and so client certificates) is offered."""
        return any(p != "None" for p in self.security_policies)

    def load_users(self) -> dict[str, str]:
        """User name -> password from ``users_file`` and ``user``/``password_file``."""
        users: dict[str, str] = {}
        if self.users_file is not None:
            for n, line in enumerate(self.users_file.read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, password = line.partition(":")
                if not sep or not name:
                    raise ValueError(f"{self.users_file}:{n}: expected name:password")
                users[name] = password
        if self.user is not None and self.password_file is not None:
            text = self.password_file.read_text()
            users[self.user] = text.splitlines()[0] if text else ""
        return users
