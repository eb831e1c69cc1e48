"""``ui:`` in the site file: the technician page (docs/ui.md)."""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, ValidationInfo, field_validator

from agent.devices.api import StrictModel
from agent.ui.netif import uplink_problem

DEFAULT_LISTEN = "127.0.0.1:9180"
INTERFACE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); the host must be an IP address or localhost.

    Raises:
        ValueError: naming what is wrong and the form expected.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected address:port (e.g. {DEFAULT_LISTEN} or [::1]:9180), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return "127.0.0.1", int(port)
    if host in ("", "*"):
        raise ValueError(_WILDCARD.format(value=value))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address: name an address of this gateway, got {value!r}") from None
    if address.is_unspecified:
        raise ValueError(_WILDCARD.format(value=value))
    return str(address), int(port)


_WILDCARD = (
    "{value} listens on every interface, the public uplink's too: name one address "
    "(127.0.0.1, a site LAN or USB link address) or set ui.interface"
)


class UiConfig(StrictModel):
    """The technician page the agent serves on site (off by default; docs/ui.md)."""

    # Declared first: listen's and interface's checks read it.
    enabled: bool = Field(default=False, description="Serve the technician page (needs the ui extra).")
    interface: str | None = Field(
        default=None,
        description="Serve on this interface's address (a site LAN or USB link, e.g. usb0) with listen's port; "
        "never the interface carrying the default route. null: listen's address.",
    )
    listen: str = Field(
        default=DEFAULT_LISTEN,
        description="address:port of the page. Loopback serves HTTP; any other address HTTPS only, with this "
        "gateway's own certificate (`edge-agent ui info` prints its fingerprint). Never a wildcard.",
    )

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not INTERFACE_PATTERN.match(value):
            raise ValueError(f"not an interface name (e.g. eth1, usb0), got {value[:40]!r}")
        if info.data.get("enabled"):
            problem = uplink_problem(None, value)
            if problem is not None:
                raise ValueError(f"{problem}: name the site LAN or USB link interface instead")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str, info: ValidationInfo) -> str:
        host, _port = split_listen(value)
        if info.data.get("enabled") and info.data.get("interface") is None:
            problem = uplink_problem(host, None)
            if problem is not None:
                raise ValueError(f"{problem}: name a loopback, site LAN or USB link address instead")
        return value

    def address(self) -> tuple[str, int]:
        """The (host, port) listen names (the interface's address is resolved at start)."""
        return split_listen(self.listen)
