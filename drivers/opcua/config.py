"""Config keys of the ``opcua`` driver: endpoint, security, login, and the points to read.

Pure validation: no asyncua import here (the plugin loads this module whenever the agent
reads a config, and asyncua takes about a second to import).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.contract.vocabulary import QUANTITY_UNITS
from agent.devices.api import DeviceConfig, Duration, StrictModel, readable_file, resolve_path

SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]

# ``ns=2;s=Pump1.Flow``, ``i=2258``, ``nsu=urn:plc;s=Tag``, ``ns=3;g=<guid>``, ``ns=1;b=<base64>``
NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?[isgb]=.+$", re.DOTALL)
# ``0:Objects/2:Pump1/2:Flow``: namespace index and browse name per step, from the Root folder
BROWSE_STEP = re.compile(r"^\d+:[^/]+$")


def node_kind(text: str) -> Literal["node_id", "browse_path"]:
    """Whether ``text`` is a NodeId string or a browse path; ValueError if it is neither."""
    if NODE_ID.match(text):
        return "node_id"
    steps = text.strip("/").split("/")
    if text.strip("/") and all(BROWSE_STEP.match(s) for s in steps):
        return "browse_path"
    raise ValueError(
        f"{text!r} is neither a NodeId (ns=2;s=Pump1.Flow, i=2258) nor a browse path "
        "(0:Objects/2:Pump1/2:Flow: namespace index and browse name per step, from the Root folder)"
    )


class Deadband(StrictModel):
    """Report a change only when it exceeds this: the server is asked to filter; a percent deadband
    (and one the server refuses) the gateway applies itself too, so it holds whatever the server does."""

    type: Literal["absolute", "percent"] = Field(
        default="absolute",
        description="absolute (engineering units) or percent (of the node's EURange property, read on subscribe).",
    )
    value: float = Field(ge=0, description="The deadband; percent is 0..100.")

    @model_validator(mode="after")
    def _range(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise ValueError("a percent deadband is 0..100")
        return self


class PointConfig(StrictModel):
    """One variable on the server and what it means in an event."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Point name, unique on the device.")
    node: str = Field(
        description="NodeId (ns=2;s=Pump1.Flow) or browse path from Root (0:Objects/2:Pump1/2:Flow); "
        "`edge-agent browse opcua` prints both."
    )
    quantity: str | None = Field(default=None, description="Meter quantity from the vocabulary (docs/events.md).")
    phase: Literal["L1", "L2", "L3", "N"] | None = Field(default=None, description="Phase, when per phase.")
    bay: str | None = Field(default=None, description="This point is a parking bay's occupied flag.")
    area: str | None = Field(default=None, description="This point is a crosswalk area's person count.")
    unit: str | None = Field(default=None, description="Unit; defaults to the quantity's unit.")
    scale: float = Field(default=1.0, description="value = raw * scale + offset.")
    offset: float = Field(default=0.0, description="value = raw * scale + offset.")
    sampling_interval: Duration | None = Field(
        default=None, ge=0, description="How often the server samples the variable (default: device's)."
    )
    queue_size: int | None = Field(default=None, ge=1, le=10000, description="Changes queued per publish.")
    deadband: Deadband | None = Field(default=None, description="Report only larger changes (default: device's).")

    @model_validator(mode="after")
    def _consistent(self) -> PointConfig:
        roles = [k for k in ("quantity", "bay", "area") if getattr(self, k) is not None]
        if len(roles) != 1:
            raise ValueError(f"point {self.name!r}: give exactly one of quantity, bay, area (got {roles or 'none'})")
        if self.quantity is not None and self.quantity not in QUANTITY_UNITS:
            raise ValueError(
                f"point {self.name!r}: unknown quantity {self.quantity!r} (one of: {', '.join(sorted(QUANTITY_UNITS))})"
            )
        try:
            node_kind(self.node)
        except ValueError as exc:
            raise ValueError(f"point {self.name!r}: {exc}") from None
        return self

    @property
    def event_unit(self) -> str:
        """The unit events carry: the configured one, else the vocabulary's."""
        if self.unit is not None:
            return self.unit
        return QUANTITY_UNITS.get(self.quantity or "", "")


class OpcUaConfig(DeviceConfig):
    """An OPC UA server: a PLC, a SCADA, another gateway. ``interval`` is the publishing interval
    (subscriptions) or the poll interval (``mode: poll``)."""

    driver: Literal["opcua"] = Field(description="OPC UA server.")
    endpoint: str = Field(
        pattern=r"^opc\.tcp://[^/\s:]+(:\d+)?(/\S*)?$", description="opc.tcp://host:4840[/path] of the server."
    )
    security_policy: SecurityPolicy = Field(
        default="None", description="None, Basic256Sha256, Aes128Sha256RsaOaep or Aes256Sha256RsaPss."
    )
    security_mode: SecurityMode = Field(default="None", description="None (with policy None), Sign or SignAndEncrypt.")
    cert_dir: Path | None = Field(
        default=None,
        description="Folder of the gateway's application certificate (cert.der, key.pem), created on first "
        "run; required with security or certificate login. Relative to the config file.",
    )
    application_uri: str | None = Field(
        default=None,
        description="ApplicationUri of a newly created certificate (default urn:<hostname>:edge-agent); "
        "an existing certificate keeps its own.",
    )
    server_certificate: Path | None = Field(
        default=None,
        description="The server's certificate (DER or PEM) to pin; default: the one the endpoint presents.",
    )
    username: str | None = Field(default=None, description="User name login (with password_file).")
    password_file: Path | None = Field(default=None, description="File holding the password. Never inline.")
    user_certificate: Path | None = Field(default=None, description="Certificate login: the user's certificate.")
    user_private_key: Path | None = Field(default=None, description="Certificate login: the user's private key.")
    mode: Literal["subscribe", "poll"] = Field(
        default="subscribe", description="subscribe (monitored items, default) or poll (Read every interval)."
    )
    sampling_interval: Duration | None = Field(
        default=None, ge=0, description="Server sampling per item (default: the publishing interval)."
    )
    queue_size: int = Field(
        default=1, ge=1, le=10000, description="Changes the server queues per item between publishes."
    )
    deadband: Deadband | None = Field(default=None, description="Default deadband of every point.")
    timeout: Duration = Field(default=5.0, gt=0, le=120, description="Per request.")
    watchdog: Duration = Field(
        default=2.0, gt=0, le=60, description="How often the connection is probed (a silent network cut is seen then)."
    )
    reconnect_min: Duration = Field(default=0.5, gt=0, description="First reconnect delay.")
    reconnect_max: Duration = Field(default=30.0, gt=0, description="Reconnect delay cap (jittered).")
    max_measurements: int = Field(
        default=100, ge=1, le=10000, description="Measurements per city.meter.reading at most (larger scans split)."
    )
    points: list[PointConfig] = Field(min_length=1, description="The variables to read.")

    _paths = field_validator(
        "cert_dir", "server_certificate", "password_file", "user_certificate", "user_private_key", mode="before"
    )(resolve_path)

    @field_validator("server_certificate", "password_file", "user_certificate", "user_private_key")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConfig:
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError(
                f"security_policy {self.security_policy} with security_mode {self.security_mode}: policy None goes "
                "with mode None, any other policy with Sign or SignAndEncrypt"
            )
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together (the password is never written inline)")
        if (self.user_certificate is None) != (self.user_private_key is None):
            raise ValueError("user_certificate and user_private_key go together")
        if self.username is not None and self.user_certificate is not None:
            raise ValueError("log in with username/password_file or with user_certificate, not both")
        if self.cert_dir is None and (self.security_policy != "None" or self.user_certificate is not None):
            raise ValueError(
                "cert_dir is required with security or certificate login: a folder the agent can write, where "
                "the gateway's certificate is created on first run (e.g. /var/lib/edge-agent/opcua)"
            )
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        if self.mode == "poll":
            percent = [p.name for p in self.points if (p.deadband or self.deadband or _NO_DB).type == "percent"]
            if percent:
                raise ValueError(
                    f"percent deadband needs mode: subscribe (the EURange is read then); points: {', '.join(percent)}"
                )
        dupes = sorted(n for n, count in Counter(p.name for p in self.points).items() if count > 1)
        if dupes:
            raise ValueError(f"duplicate point names: {', '.join(dupes)}")
        return self

    def deadband_of(self, point: PointConfig) -> Deadband | None:
        """The point's deadband, else the device's."""
        return point.deadband if point.deadband is not None else self.deadband

    def read_password(self) -> str | None:
        """The password from ``password_file`` (first line, without the newline), or None."""
        if self.password_file is None:
            return None
        text = self.password_file.read_text()
        return text.splitlines()[0] if text else ""


_NO_DB = Deadband(type="absolute", value=0)
