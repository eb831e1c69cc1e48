"""Which network interface carries the default route, and the addresses of an interface (Linux /proc).

The page must never listen on the public uplink: ``validate`` refuses the interface that
carries the default route and every address on it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

ROUTE_V4 = Path("/proc/net/route")
ROUTE_V6 = Path("/proc/net/ipv6_route")
ADDRESSES_V6 = Path("/proc/net/if_inet6")
_SIOCGIFADDR = 0x8915


def default_route_interfaces() -> set[str]:
    """Interfaces with a default route (IPv4 or IPv6); empty where /proc says nothing."""
    found: set[str] = set()
    try:
        for line in ROUTE_V4.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
                found.add(cols[0])
    except OSError:
        pass
    try:
        for line in ROUTE_V6.read_text().splitlines():
            cols = line.split()
            if len(cols) >= 10 and set(cols[0]) == {"0"} and cols[1] == "00" and cols[9] != "lo":
                found.add(cols[9])
    except OSError:
        pass
    return found


def interface_addresses(name: str) -> list[str]:
    """The IPv4 address (the primary one) and IPv6 addresses of interface ``name``; empty if it has none."""
    addresses: list[str] = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            addresses.append(socket.inet_ntoa(packed[20:24]))
    except OSError:
        pass  # no such interface, or no IPv4 address on it
    try:
        for line in ADDRESSES_V6.read_text().splitlines():
            cols = line.split()
            if len(cols) >= 6 and cols[5] == name:
                addresses.append(str(ipaddress.IPv6Address(bytes.fromhex(cols[0]))))
    except (OSError, ValueError):
        pass
    return addresses


def uplink_problem(host: str | None, interface: str | None) -> str | None:
    """Why binding ``host`` or ``interface`` would expose the page on the public uplink (None: it would not)."""
    uplinks = default_route_interfaces()
    if interface is not None and interface in uplinks:
        return f"interface {interface} carries the default route (the public uplink)"
    if host is not None:
        for name in sorted(uplinks):
            if host in interface_addresses(name):
                return f"{host} is an address of {name}, which carries the default route (the public uplink)"
    return None
