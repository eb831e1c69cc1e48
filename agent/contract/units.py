"""Human units in config files: durations (``500ms``, ``1s``, ``5m``) and sizes (``256MiB``)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

MAX_DURATION = 10 * 365 * 86400.0  # ten years: longer is a typo, and past float range an error
MAX_SIZE = 1 << 50  # 1 PiB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Return seconds for ``500ms``, ``1s``, ``5m``, ``2h``, ``1d`` or a bare number of seconds.

    Raises:
        ValueError: with a message a technician can act on.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {_clip(value)} (use e.g. 500ms, 1s, 5m)")
    if isinstance(value, int | float):
        seconds = float(value) if not isinstance(value, int) or abs(value) <= MAX_DURATION else math.inf
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_FACTORS[m.group(2) or "s"]
    else:
        raise ValueError(f"invalid duration {_clip(value)} (use e.g. 500ms, 1s, 5m)")
    if seconds < 0:
        raise ValueError(f"duration {_clip(value)} must not be negative")
    if math.isnan(seconds):
        raise ValueError(f"duration {_clip(value)} is not a number")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {_clip(value)} is too long (at most {MAX_DURATION // 86400:.0f}d)")
    return seconds


def parse_size(value: object) -> int:
    """Return bytes for ``256MiB``, ``1GB``, ``512KiB`` or a bare number of bytes.

    Raises:
        ValueError: with a message a technician can act on.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {_clip(value)} (use e.g. 64MiB, 1GiB)")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        amount = float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "B").lower()]
        if not amount <= MAX_SIZE:  # also NaN and infinity: digits past float's range
            raise ValueError(f"size {_clip(value)} is too large (at most 1PiB)")
        size = int(amount)
    else:
        raise ValueError(f"invalid size {_clip(value)} (use e.g. 64MiB, 1GiB)")
    if size < 0:
        raise ValueError(f"size {_clip(value)} must not be negative")
    if size > MAX_SIZE:
        raise ValueError(f"size {_clip(value)} is too large (at most 1PiB)")
    return size


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
