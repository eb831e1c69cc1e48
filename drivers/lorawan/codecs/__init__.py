"""Payload codecs for LoRaWAN devices, by name: ``get_codec("nwave-nps405")``.

The types are in :mod:`drivers.lorawan.codecs.api`; the registry is here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType

from drivers.lorawan.codecs.api import Codec, CodecError, Decoded, Reading

__all__ = ["CODECS", "Codec", "CodecError", "Decoded", "Reading", "UnknownCodec", "get_codec", "guess_codec"]

CODECS: Mapping[str, Codec] = MappingProxyType({})  # filled as the codec modules land


class UnknownCodec(LookupError):
    """No codec of that name; the message lists the close names ("did you mean") or all of them."""

    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name.lower(), list(CODECS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(CODECS))}"
        super().__init__(f"unknown codec {name!r}; {hint}")
        self.name = name
        self.suggestions = close


def get_codec(name: str) -> Codec:
    """The codec called ``name``; :class:`UnknownCodec` (with suggestions) when there is none."""
    try:
        return CODECS[name]
    except KeyError:
        raise UnknownCodec(name) from None


def guess_codec(profile: str) -> str | None:
    """A codec name guessed from a network server's device-profile or model name (for ``scan``), or None."""
    return None
