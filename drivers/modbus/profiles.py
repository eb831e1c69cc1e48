"""Device profiles: register maps as data (config/profiles/*.yaml), merged into a device's keys.

A site config says ``profile: eastron-sdm630``. The profile's ``defaults`` fill device keys the
site did not set; its ``points`` come first, a site point with the same ``name`` overrides keys
of that point, a new name adds one, and ``exclude`` removes profile points.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

from agent.config.suggest import did_you_mean
from agent.config.yaml_load import YamlLoadError, clip, load_yaml, read_text

# Searched in order: $EDGE_AGENT_PROFILES, next to the site file, the system's, then the ones
# shipped with the agent.
SYSTEM_DIR = Path("/etc/edge-agent/profiles")
BUILTIN_DIR = Path(__file__).resolve().parents[2] / "config" / "profiles"  # a checkout
INSTALLED_DIR = Path(sys.prefix) / "share" / "edge-agent" / "profiles"  # pip install (data-files)
ENV_DIR = "EDGE_AGENT_PROFILES"
_DEVICE_KEYS = {"byte_order", "word_order", "max_registers", "max_bits", "max_gap", "serial", "unit", "kind",
                "timeout", "write_functions"}  # fmt: skip


class ProfileError(ValueError):
    """A profile is missing or malformed; the message names it and its file."""


def search_dirs(base_dir: str | Path | None = None) -> list[Path]:
    """Where profiles are looked up, first match wins."""
    dirs = [Path(p) for p in os.environ.get(ENV_DIR, "").split(os.pathsep) if p]
    if base_dir is not None:
        dirs.append(Path(base_dir) / "profiles")
    dirs += [SYSTEM_DIR, BUILTIN_DIR, INSTALLED_DIR]
    return dirs


def available(base_dir: str | Path | None = None) -> dict[str, Path]:
    """Every profile id found, with the file that wins for it."""
    found: dict[str, Path] = {}
    for folder in search_dirs(base_dir):
        if folder.is_dir():
            for file in sorted(folder.glob("*.yaml")):
                found.setdefault(file.stem, file)
    return found


@cache
def _read(path: Path, mtime_ns: int) -> dict[str, Any]:
    del mtime_ns  # part of the cache key: an edited profile is read again on reload
    try:
        data, _ = load_yaml(read_text(path))  # bounded like the site file: it may sit next to it
    except OSError as exc:
        raise ProfileError(f"profile file {path}: cannot read: {exc.strerror or exc}") from exc
    except YamlLoadError as exc:
        raise ProfileError(f"profile file {path}:{exc.line or ''}: {exc.message}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ProfileError(f"profile file {path}: expected a mapping with a points list")
    if not all(isinstance(p, dict) for p in data["points"]):
        raise ProfileError(f"profile file {path}: each point is a mapping (name, table, address, ...)")
    if data.get("profile") != path.stem:
        raise ProfileError(f"profile file {path}: 'profile: {clip(data.get('profile'))}' must equal the file name")
    if not isinstance(data.get("defaults") or {}, dict):
        raise ProfileError(f"profile file {path}: defaults is a mapping of device keys")
    unknown = set(data.get("defaults") or {}) - _DEVICE_KEYS
    if unknown:
        raise ProfileError(f"profile file {path}: unknown defaults {sorted(unknown)}")
    return data


def load(name: str, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The profile's parsed file (``profile``, ``vendor``, ``model``, ``manual``, ``defaults``, ``points``)."""
    files = available(base_dir)
    if name not in files:
        raise ProfileError(f"unknown profile {clip(name)} (available: {', '.join(sorted(files)) or 'none'})"
                           + did_you_mean(name, files))  # fmt: skip
    path = files[name]
    return _read(path, path.stat().st_mtime_ns)


def apply_profile(device: dict[str, Any], base_dir: str | Path | None = None) -> dict[str, Any]:
    """The device's raw keys with its profile merged in (see the module docstring)."""
    profile = load(str(device["profile"]), base_dir)
    merged = dict(device)
    for key, value in (profile.get("defaults") or {}).items():
        if key == "serial":
            # The site names the port; the profile gives the line settings. A TCP device has none.
            if isinstance(merged.get("serial"), dict) and isinstance(value, dict):
                merged["serial"] = {**value, **merged["serial"]}
        else:
            merged.setdefault(key, value)
    if "kind" in profile:
        merged.setdefault("kind", profile["kind"])
    excluded = set(device.get("exclude") or [])
    known = {p["name"] for p in profile["points"] if isinstance(p, dict) and _named(p)}
    missing = excluded - known
    if missing:
        raise ProfileError(f"exclude names points the profile {device['profile']!r} lacks: {sorted(missing)}")
    # A site point overrides the profile's of the same name; a name that is not a string is its
    # own (invalid) point, for the point's checks to report.
    overrides = {p["name"]: p for p in device.get("points") or [] if isinstance(p, dict) and _named(p)}
    points = []
    for point in profile["points"]:
        if point.get("name") in excluded:
            continue
        points.append({**point, **overrides.pop(point.get("name"), {})})
    points += [p for p in device.get("points") or [] if not (isinstance(p, dict) and _named(p) and p["name"] in known)]
    merged["points"] = points
    return merged


def _named(point: dict[str, Any]) -> bool:
    return isinstance(point.get("name"), str)
