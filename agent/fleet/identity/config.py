"""``fleet.identity`` in the site file: where the gateway's certificate comes from (docs/fleet.md, "Provisioning")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.contract.events import TOPIC_ROOT_PATTERN
from agent.devices.api import Duration, StrictModel, readable_file, resolve_path
from agent.fleet.identity.pkcs11_config import Pkcs11Config, check_key_store
from agent.fleet.identity.renew_config import RenewConfig

SERIAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"  # one topic level: no / + # or spaces
MODEL_FILES = (Path("/sys/firmware/devicetree/base/model"), Path("/sys/class/dmi/id/product_name"))


class ClaimConfig(StrictModel):
    """The claim credential the gateway shipped with, and what it says about itself."""

    cert_file: Path = Field(description="Claim certificate (its CN is the claim identity the broker confines).")
    key_file: Path = Field(description="Its private key (mode 0600, or the agent refuses to start).")
    serial: str | None = Field(default=None, pattern=SERIAL_PATTERN, description="This gateway's serial number.")
    serial_file: Path | None = Field(
        default=None, description="Or a file holding it, e.g. /sys/firmware/devicetree/base/serial-number."
    )
    hardware_model: str | None = Field(
        default=None, max_length=128, description="Default: the device tree's or DMI's model, else unknown."
    )
    root: str = Field(default="prov", pattern=TOPIC_ROOT_PATTERN, description="Topic root of claims.")
    answer_timeout: Duration = Field(default=30.0, ge=1, le=600, description="How long to wait for an answer.")
    retry_interval: Duration = Field(
        default=30.0, ge=1, le=3600, description="Wait (+-20%) after no answer or an answer the gateway refused."
    )

    _paths = field_validator("cert_file", "key_file", "serial_file", mode="before")(resolve_path)

    @field_validator("cert_file", "key_file", "serial_file")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _one_serial(self) -> ClaimConfig:
        if (self.serial is None) == (self.serial_file is None):
            raise ValueError("set exactly one of serial and serial_file")
        return self

    def read_serial(self) -> str:
        """The serial, from the file if it comes from one.

        Raises:
            ValueError: naming the file when what it holds cannot be a serial.
        """
        if self.serial is not None:
            return self.serial
        assert self.serial_file is not None
        text = self.serial_file.read_bytes()[:256].decode("ascii", "replace").strip("\x00 \n\t")
        if not re.match(SERIAL_PATTERN, text):
            raise ValueError(f"fleet.identity.claim.serial_file {self.serial_file}: does not hold a serial")
        return text

    def read_model(self) -> str:
        """The hardware model: configured, else the device tree's or DMI's, else unknown."""
        if self.hardware_model:
            return self.hardware_model
        for path in MODEL_FILES:
            try:
                text = path.read_bytes()[:128].decode("ascii", "replace").strip("\x00 \n\t")
            except OSError:
                continue
            if text:
                return text
        return "unknown"


class IdentityConfig(StrictModel):
    """The gateway's MQTT client certificate: issued by the provisioning responder, kept in the state folder."""

    ca_file: Path = Field(description="The root CA the issued certificate chain must end at.")
    key_store: Literal["file", "pkcs11"] = Field(
        default="file", description="Where the private key lives: file (0600 PEM in the state folder) or pkcs11."
    )
    claim: ClaimConfig | None = Field(
        default=None, description="First boot, and re-provisioning after an expired certificate."
    )
    renew: RenewConfig = Field(default_factory=RenewConfig, description="When to renew the certificate.")
    pkcs11: Pkcs11Config | None = Field(default=None, description="The token of key_store: pkcs11 (docs/fleet.md).")

    _paths = field_validator("ca_file", mode="before")(resolve_path)
    _key_store = model_validator(mode="after")(check_key_store)

    @field_validator("ca_file")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        found = readable_file(value)
        assert found is not None
        return found
