"""Where the page listens and how it is reached: the address, HTTP on loopback, HTTPS elsewhere."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.ui.config import UiConfig
from agent.ui.netif import interface_addresses


class BindError(Exception):
    """The configured interface has no address (yet)."""


@dataclass(frozen=True)
class Bind:
    """A resolved listening address."""

    host: str
    port: int

    @property
    def tls(self) -> bool:
        """Off loopback the page is HTTPS only."""
        return not ipaddress.ip_address(self.host).is_loopback

    @property
    def authority(self) -> str:
        """``host:port`` as a URL and the ``Host`` header write it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The page's address."""
        return f"{'https' if self.tls else 'http'}://{self.authority}/"


def resolve(config: UiConfig) -> Bind:
    """The address to listen on: ``interface``'s (IPv4 first) with listen's port, or listen's.

    Raises:
        BindError: the interface is missing or has no address.
    """
    host, port = config.address()
    if config.interface is not None:
        found = interface_addresses(config.interface)
        usable = [a for a in found if not ipaddress.ip_address(a).is_link_local] or found
        if not usable:
            raise BindError(f"ui.interface: {config.interface} is missing or has no address (ip addr show)")
        host = usable[0]
    return Bind(host, port)
