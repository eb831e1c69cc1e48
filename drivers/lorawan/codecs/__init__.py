"""Payload codecs for LoRaWAN devices, by name: ``get_codec("nwave-nps405")``.

The types are in :mod:`drivers.lorawan.codecs.api`; the registry is here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from types import MappingProxyType

from drivers.lorawan.codecs.api import Codec, CodecError, Decoded, Reading
from drivers.lorawan.codecs.bosch import Tps110
from drivers.lorawan.codecs.milesight import EM300_TH, EM400_MUD, Milesight
from drivers.lorawan.codecs.nwave import Nps310, Nps405

__all__ = ["CODECS", "Codec", "CodecError", "Decoded", "Reading", "UnknownCodec", "get_codec", "guess_codec"]

_ALL: tuple[Codec, ...] = (
    Nps405(),
    Nps310(),
    Tps110(),
    Milesight("milesight-em300-th", EM300_TH),
    Milesight("milesight-em400-mud", EM400_MUD),
)
CODECS: Mapping[str, Codec] = MappingProxyType({codec.name: codec for codec in _ALL})
# Model numbers as device profiles and repository names spell them (letters and digits only) -> codec.
# Bosch names the TPS110's codec file "tpl110".
_MODELS = {
    "nps405": "nwave-nps405",
    "nps310": "nwave-nps310",
    "tps110": "bosch-tps110",
    "tpl110": "bosch-tps110",
    "em300th": "milesight-em300-th",
    "em400mud": "milesight-em400-mud",
}


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
    """A codec name guessed from a network server's device-profile or model name (for ``scan``), or None.

    ``"Nwave NPS405 SM"``, ``"EM300-TH (EU868)"`` -> their codecs; a name naming no known model -> None.
    """
    plain = re.sub(r"[^a-z0-9]", "", profile.lower())
    return next((codec for model, codec in _MODELS.items() if model in plain), None)
