"""Add a device found by a scan to a site file: validated first, the old file kept, its comments untouched.

The new device is inserted as text at the end of the ``devices:`` list, so every other byte of
the file (comments, ordering, quoting) stays as the technician wrote it; the result must pass
the same validator as ``edge-agent validate`` before it replaces the file, and the old file is
kept next to it as ``<file>.bak``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

_TOP_KEY = re.compile(r"^[A-Za-z_][\w-]*\s*:")
_DEVICES = re.compile(r"^devices\s*:\s*(\[\s*\])?\s*(#.*)?$")


class AddRefused(Exception):
    """The file would not validate with the device added (it is left as it was); the message lists why."""


def device_keys(
    profile: str,
    unit: int,
    *,
    port: str | None = None,
    baud: int | None = None,
    parity: str | None = None,
    stopbits: int = 1,
    host: str | None = None,
    rtu_over_tcp: bool = False,
) -> dict[str, Any]:
    """A found unit's site file keys: on the serial ``port`` (RTU) or at ``host[:port]`` (TCP).

    ``scan modbus --add-to`` and the page's "add from a scan hit" build the same device.
    """
    keys: dict[str, Any] = {"id": f"{profile.split('-', 1)[-1]}-{unit}", "driver": "modbus",
                            "profile": profile, "unit": unit}  # fmt: skip
    if port:
        keys["transport"] = "rtu"
        keys["serial"] = {"port": port, "baudrate": baud, "parity": parity, "stopbits": stopbits}
    else:
        name, _, tcp_port = (host or "").partition(":")
        keys |= {"host": name, "port": int(tcp_port or 502)}
        if rtu_over_tcp:
            keys["transport"] = "rtu_over_tcp"
    return keys


def device_text(keys: dict[str, Any], indent: str) -> str:
    """The device as a block list item: one key a line, ``serial`` as a flow mapping."""
    lines: list[str] = []
    for key, value in keys.items():
        shown = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}" if isinstance(value, dict) else value
        lines.append(f"{indent}{'- ' if not lines else '  '}{key}: {shown}")
    return "\n".join(lines) + "\n"


def insert_device(text: str, keys: dict[str, Any]) -> str:
    """``text`` with the device appended to its top-level ``devices:`` list (created if absent)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    at = next((i for i, line in enumerate(lines) if _DEVICES.match(line.rstrip("\n"))), None)
    if at is None:
        return "".join(lines) + "devices:\n" + device_text(keys, "  ")
    if "[" in lines[at]:  # devices: []  -> a block list, its comment kept
        comment = lines[at].split("#", 1)[1].rstrip("\n") if "#" in lines[at] else None
        lines[at] = "devices:" + (f"  #{comment}" if comment is not None else "") + "\n"
    end, indent = at + 1, "  "
    for i in range(at + 1, len(lines)):
        line = lines[i]
        if _TOP_KEY.match(line):
            break
        if line.strip() and not line.lstrip().startswith("#"):
            end = i + 1
            if line.lstrip().startswith("- ") and indent == "  " and i == _first_item(lines, at):
                indent = line[: len(line) - len(line.lstrip())]
    return "".join(lines[:end]) + device_text(keys, indent) + "".join(lines[end:])


def _first_item(lines: list[str], at: int) -> int:
    return next((i for i in range(at + 1, len(lines)) if lines[i].lstrip().startswith("- ")), -1)


def unique_id(text: str, wanted: str) -> str:
    """``wanted``, or ``wanted-2``, ``-3``... if the file already has a device of that id."""
    taken = set(re.findall(r"\bid:\s*([a-z0-9][a-z0-9-]*)", text))
    candidate, n = wanted, 2
    while candidate in taken:
        candidate, n = f"{wanted}-{n}", n + 1
    return candidate


def add_device(path: Path, keys: dict[str, Any]) -> Path:
    """Append the device to the site file at ``path`` (created if missing); returns the backup's path.

    Raises:
        AddRefused: the result does not validate; ``path`` is unchanged.
        OSError: the file cannot be read or written.
    """
    from agent.config.model import load_config

    old = path.read_text(encoding="utf-8") if path.exists() else ""
    keys = {**keys, "id": unique_id(old, str(keys["id"]))}
    keys = {"id": keys.pop("id"), **keys}
    new = insert_device(old, keys)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(new)
        try:
            load_config(Path(temp))
        except ConfigError as exc:
            problems = "\n  ".join(p.replace(temp, str(path)) for p in exc.problems)
            raise AddRefused(f"{path} would not validate with {keys['id']} added:\n  {problems}") from None
        backup = path.with_name(path.name + ".bak")
        if path.exists():
            mode = path.stat().st_mode & 0o777  # a site file may name secrets: the backup keeps its mode
            with os.fdopen(os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as file:
                file.write(old)
            os.chmod(backup, mode)
            os.chmod(temp, mode)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return backup
