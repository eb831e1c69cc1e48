"""Which gateways a fleet command is for: ``gw-001..gw-100,gw-200`` as a list of ids."""

from __future__ import annotations

import re

MAX_TARGETS = 10_000  # a typo such as gw-1..gw-9999999 is refused, not expanded
_RANGE = re.compile(r"^(?P<stem>.*?)(?P<first>\d+)\.\.(?P=stem)(?P<last>\d+)$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def expand(text: str) -> list[str]:
    """``gw-001..gw-003,gw-9`` -> ``[gw-001, gw-002, gw-003, gw-9]`` (the numbers keep their padding).

    Raises:
        ValueError: naming the part that is not an id or a range of ids.
    """
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        match = _RANGE.match(part)
        if match is None:
            if not _ID.match(part) or ".." in part:
                raise ValueError(f"{part!r} is not a gateway id (letters, digits, . _ -) nor a range a1..a9")
            out.append(part)
            continue
        stem, first, last = match["stem"], match["first"], match["last"]
        low, high = int(first), int(last)
        if high < low:
            raise ValueError(f"{part!r}: the range runs backwards")
        if len(out) + high - low + 1 > MAX_TARGETS:
            raise ValueError(f"{part!r}: more than {MAX_TARGETS} gateways")
        width = len(first) if first.startswith("0") else 0
        out += [f"{stem}{n:0{width}d}" for n in range(low, high + 1)]
        if not _ID.match(out[-1]):
            raise ValueError(f"{part!r} is not a range of gateway ids")
    return list(dict.fromkeys(out))  # each gateway once, in the order given
