"""A scan hit sent by the page, checked field by field, becomes a proposed site text with the device added.

The page's scan posts what it found ({port, unit, baud, parity, stopbits, profile}); anything
else a browser could send is refused with the field it is wrong in, before the text is touched.
The page reaches this through the plugin's ``add_hit`` (the core imports no driver).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from agent.config.suggest import did_you_mean
from agent.devices.ports import is_pty
from drivers.modbus.profiles import available
from drivers.modbus.site_add import device_keys, insert_device, unique_id

BAUDS = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200)  # what the Modbus config accepts
PARITIES = ("N", "E", "O")
_PATH = re.compile(r"[A-Za-z0-9/._:+@-]+")
_PROFILE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class HitRefused(ValueError):
    """The hit has a field the page cannot add; the message names it."""


def _int(hit: dict[str, Any], name: str, allowed: range | tuple[int, ...]) -> int:
    value = hit.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HitRefused(f"hit.{name}: a whole number is needed, not {type(value).__name__}")
    if value not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else ", ".join(map(str, allowed))
        raise HitRefused(f"hit.{name}: {value} is not one of {shown}")
    return value


def _port(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise HitRefused("hit.port: the serial port's path is needed, e.g. /dev/serial/by-id/usb-...")
    if len(value) > 512 or not value.startswith("/"):
        raise HitRefused("hit.port: an absolute path under /dev is needed")
    if not _PATH.fullmatch(value):  # written unquoted into the file's flow mapping: nothing YAML would read
        raise HitRefused("hit.port: only letters, digits and / . _ : + @ - are allowed in the path")
    # by-id names are symlinks into /dev; a pseudo-terminal (the simulator) counts wherever it is named
    real = os.path.realpath(value)
    if not is_pty(value) and not (real.startswith("/dev/") and os.path.exists(real)):
        raise HitRefused(f"hit.port: {value} is not a serial port on this gateway (no such device under /dev)")
    return value


def _profile(value: object, known: set[str]) -> str:
    if not isinstance(value, str) or not _PROFILE.fullmatch(value):
        raise HitRefused("hit.profile: a profile name is needed, e.g. eastron-sdm630 (a scan hit without one "
                         "cannot be added: write the device's registers in the file instead)")  # fmt: skip
    if value not in known:
        raise HitRefused(f"hit.profile: no profile {value!r} on this gateway" + did_you_mean(value, known))
    return value


def hit_keys(hit: object, site: Path) -> dict[str, Any]:
    """The device keys for a serial scan hit (the same as ``scan modbus --add-to`` writes)."""
    if not isinstance(hit, dict):
        raise HitRefused("hit: an object {port, unit, baud, parity, stopbits, profile} is needed")
    port = _port(hit.get("port"))
    unit = _int(hit, "unit", range(1, 248))
    baud = _int(hit, "baud", BAUDS)
    parity = hit.get("parity")
    if parity not in PARITIES:
        raise HitRefused("hit.parity: N, E or O")
    stopbits = _int(hit, "stopbits", (1, 2))
    profile = _profile(hit.get("profile"), set(available(site.parent)))
    return device_keys(profile, unit, port=port, baud=baud, parity=str(parity), stopbits=stopbits)


def propose(text: str, hit: object, site: Path) -> tuple[str, str]:
    """``text`` (the site file at ``site``) with the hit's device appended, and the device's id.

    The id is made unique in the file (``sdm630-5``, then ``sdm630-5-2``...); nothing is written.
    """
    keys = hit_keys(hit, site)
    device = unique_id(text, str(keys["id"]))
    return insert_device(text, {**keys, "id": device}), device
