"""The bus routes' request fields, checked one by one: a bad one is a message naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BAUDS = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200)  # as serial.baudrate accepts them
PARITIES = ("N", "E", "O")
TABLES = ("holding", "input", "coil", "discrete")


class FieldError(ValueError):
    """A request field is missing or wrong; the message starts with the field's name."""


def integer(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    """``body[name]`` as an int in ``low..high`` (``default`` when absent, if there is one)."""
    value = body.get(name)
    if value is None:
        if default is None:
            raise FieldError(f"{name}: required, a whole number {low}..{high}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(f"{name}: expected a whole number {low}..{high}, got {_shown(value)}")
    return value


def optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    """``body[name]`` as an int in ``low..high``, or None when absent."""
    return None if body.get(name) is None else integer(body, name, low, high)


def seconds(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    """``body[name]`` in seconds, ``low..high``, or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise FieldError(f"{name}: expected seconds {low}..{high}, got {_shown(value)}")
    return float(value)


def flag(body: dict[str, Any], name: str) -> bool:
    """``body[name]`` as true or false (false when absent)."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise FieldError(f"{name}: expected true or false, got {_shown(value)}")
    return value


def port(body: dict[str, Any]) -> str:
    """A serial device path."""
    value = body.get("port")
    if not isinstance(value, str) or not value.startswith("/dev/") or len(value) > 200 or "\0" in value:
        raise FieldError(f"port: expected a serial device such as /dev/serial/by-id/... or /dev/ttyUSB0, "
                         f"got {_shown(value)}")  # fmt: skip
    return value


def baud(body: dict[str, Any], default: int | None) -> int | None:
    """A baud rate the serial settings accept (None: try the likely ones)."""
    value = body.get("baud")
    if value is None:
        return default
    if isinstance(value, bool) or value not in BAUDS:
        raise FieldError(f"baud: expected one of {', '.join(map(str, BAUDS))}, got {_shown(value)}")
    return int(value)


def parity(body: dict[str, Any], default: str | None) -> str | None:
    """N, E or O (None: try them in the usual order)."""
    value = body.get("parity")
    if value is None:
        return default
    if value not in PARITIES:
        raise FieldError(f"parity: expected N, E or O, got {_shown(value)}")
    return str(value)


def stopbits(body: dict[str, Any]) -> int:
    """1 or 2."""
    value = body.get("stopbits", 1)
    if value not in (1, 2) or isinstance(value, bool):
        raise FieldError(f"stopbits: expected 1 or 2, got {_shown(value)}")
    return int(value)


def units(body: dict[str, Any], parse_units: Callable[[str], list[int]]) -> list[int]:
    """Unit ids: ``"1-10,15"`` as the CLI's ``--units`` takes them (``parse_units``), or a list of numbers;
    default 1-247."""
    value = body.get("units", "1-247")
    problem = f'units: expected ids 1..247 like "1-10" or "1,2,5", got {_shown(value)}'
    if isinstance(value, list):
        if not value or not all(isinstance(u, int) and not isinstance(u, bool) and 1 <= u <= 247 for u in value):
            raise FieldError(problem)
        return sorted(set(value))
    if not isinstance(value, str) or len(value) > 200:
        raise FieldError(problem)
    try:
        found = parse_units(value.replace(" ", ""))
    except ValueError:
        raise FieldError(problem) from None
    if 0 in found:
        raise FieldError(problem + " (0 is the broadcast address: nothing answers it)")
    return sorted(set(found))


def table(body: dict[str, Any]) -> str:
    """holding, input, coil or discrete (default holding)."""
    value = body.get("table", "holding")
    if value not in TABLES:
        raise FieldError(f"table: expected one of {', '.join(TABLES)}, got {_shown(value)}")
    return str(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
