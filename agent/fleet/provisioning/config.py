"""``responder.yaml``: the provisioning responder's allow-list, CA and limits (docs/fleet.md, "Provisioning")."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from agent.config.model import GATEWAY_ID_PATTERN
from agent.contract.events import TOPIC_ROOT_PATTERN
from agent.devices.api import StrictModel, readable_file, resolve_path
from agent.errors import ConfigError
from agent.fleet.config import GROUP_PATTERN

SERIAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"  # a topic level: no / + # or spaces
RESERVED_IDS = ("operator", "ioc", "provisioner")  # the ACL's other users


class Allowed(StrictModel):
    """One gateway the responder may issue a certificate to."""

    serial: str = Field(pattern=SERIAL_PATTERN, description="The serial the gateway claims with.")
    gateway_id: str = Field(pattern=GATEWAY_ID_PATTERN, description="Its gateway id: the certificate's CN.")
    groups: list[str] = Field(default_factory=list, description="Groups told to the gateway in the answer.")
    reprovision: bool = Field(
        default=False, description="Issue again by claim although a certificate was issued (an expired gateway)."
    )
    revoked: bool = Field(default=False, description="Refuse it, and list every certificate it got in the CRL.")

    @field_validator("gateway_id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_IDS:
            raise ValueError(f"{value!r} is a broker user of its own (operator, ioc, provisioner)")
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(GROUP_PATTERN, name):
                raise ValueError(f"group {name!r}: lowercase letters, digits, - and _ only")
        return value


class IssuingCa(StrictModel):
    """The issuing CA the responder signs with (an intermediate; the root stays offline)."""

    cert_file: Path = Field(description="Its certificate, then any intermediates above it (PEM).")
    key_file: Path = Field(description="Its private key (PEM, unencrypted, mode 0600).")

    _paths = field_validator("cert_file", "key_file", mode="before")(resolve_path)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        found = readable_file(value)
        assert found is not None
        return found


class Broker(StrictModel):
    """An endpoint a newly provisioned gateway is told about."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)


class ResponderConfig(StrictModel):
    """The whole file."""

    ca: IssuingCa
    state_file: Path = Field(description="Issued certificates, per serial (0600 JSON, written atomically).")
    crl_file: Path | None = Field(default=None, description="CRL (PEM) to write for Mosquitto's crlfile.")
    crl_days: int = Field(default=7, ge=1, le=365, description="nextUpdate of the CRL; rewritten at half of it.")
    validity_days: int = Field(default=90, ge=1, le=825, description="Lifetime of an issued certificate.")
    rate_limit: float = Field(default=10.0, gt=0, le=1000, description="Requests handled per second (token bucket).")
    unknown_retry_after: float = Field(
        default=60.0, ge=1, description="retry_after told to a serial not on the allow-list (gateways wait >= 60 s)."
    )
    claim_root: str = Field(default="prov", pattern=TOPIC_ROOT_PATTERN, description="Topic root of claims.")
    fleet_root: str = Field(default="fleet/v1", pattern=TOPIC_ROOT_PATTERN, description="The sites' fleet.root.")
    claim_names: list[str] = Field(
        default_factory=list, description="Claim certificate CNs accepted (empty: any the broker let in)."
    )
    brokers: list[Broker] = Field(default_factory=list, description="Broker endpoints told to gateways.")
    config_version: int | None = Field(default=None, description="Initial config version told to gateways.")
    allow: list[Allowed] = Field(default_factory=list, description="The allow-list.")

    _paths = field_validator("state_file", "crl_file", mode="before")(resolve_path)

    @model_validator(mode="after")
    def _unique(self) -> ResponderConfig:
        for key in ("serial", "gateway_id"):
            seen: set[str] = set()
            for index, entry in enumerate(self.allow):
                value = getattr(entry, key)
                if value in seen:
                    raise ValueError(f"allow[{index}].{key}: {value!r} appears twice in the allow-list")
                seen.add(value)
        return self

    def by_serial(self, serial: str) -> Allowed | None:
        """The allow-list entry of a serial."""
        return next((a for a in self.allow if a.serial == serial), None)

    def by_gateway(self, gateway_id: str) -> Allowed | None:
        """The allow-list entry of a gateway id."""
        return next((a for a in self.allow if a.gateway_id == gateway_id), None)


def load_responder_config(path: Path) -> ResponderConfig:
    """Read and validate ``responder.yaml``.

    Raises:
        ConfigError: each problem as ``file: field.path: message``.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    try:
        return ResponderConfig.model_validate(data, context={"base_dir": path.parent.absolute()})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "(top level)"
            problems.append(f"{path}: {where}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError(problems) from None
