"""Compact payloads: a message's JSON, deflated with a preset dictionary, and the decoder for consumers.

For metered links (``uplink.mqtt.compact``, off by default; docs/events.md, "Compact payloads").
The compact payload is a zlib stream (RFC 1950, the HTTP ``deflate`` content coding) of exactly
the bytes the uplink would otherwise send: one CloudEvent (a JSON object) or a batch (a JSON
array). Nothing in the events changes, so decoding gives back the same JSON, byte for byte.

The topic declares the encoding (``{prefix}/{gateway}/deflate``): MQTT 3.1.1 has no content type,
and MQTT 5's properties would cost more bytes per message than a small compressed event saves.
The stream's own header names the preset dictionary (its Adler-32, the DICTID of RFC 1950), so a
payload says which dictionary decodes it: see compact_dictionary.py.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from agent.contract.compact_dictionary import DICTIONARIES, DICTIONARY_V1

ENCODING = "deflate"  # the last topic level of compact messages: the content coding's name
DEFAULT_LEVEL = 6  # zlib's default; bench/payload.py: 9: up to 3.5x the CPU, 4-8% fewer bytes; 1: over 240 B
# A decoder refuses more than this after inflating: a batch is at most a few MiB (batch.max_bytes),
# and a hostile payload must not make a consumer allocate gigabytes.
MAX_DECODED_BYTES = 64 * 1024 * 1024


class CompactError(ValueError):
    """A payload that is not a compact payload this decoder can read; the message says why."""


def compact_topic(prefix: str, gateway: str) -> str:
    """Where a gateway's compact messages go: ``{prefix}/{gateway}/deflate``.

    One level fewer than the per-device topics, so a consumer subscribed to ``{prefix}/+/+/+``
    (or ``{prefix}/+/batch``) that cannot decode them never receives them.
    """
    return f"{prefix}/{gateway}/{ENCODING}"


def is_compact_topic(topic: str) -> bool:
    """Whether ``topic`` carries compact payloads (``{prefix}/{gateway}/deflate``; the prefix may have levels)."""
    return topic.endswith(f"/{ENCODING}") and topic.count("/") >= 2


def compress(payload: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """``payload`` (a message's JSON) as a zlib stream with the v1 preset dictionary named in its header."""
    deflater = zlib.compressobj(
        level, zlib.DEFLATED, zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, DICTIONARY_V1
    )
    return deflater.compress(payload) + deflater.flush()


def decompress(payload: bytes, max_bytes: int = MAX_DECODED_BYTES) -> bytes:
    """The JSON a compact payload carries, exactly as the gateway built it.

    Raises:
        CompactError: not a zlib stream, a dictionary this decoder does not know, damaged or
            truncated data, bytes after the stream's end, or more than ``max_bytes`` inflated.
    """
    dictionary = _dictionary(payload)
    inflater = zlib.decompressobj(zlib.MAX_WBITS, dictionary) if dictionary else zlib.decompressobj(zlib.MAX_WBITS)
    try:
        out = inflater.decompress(payload, max_bytes)
    except zlib.error as exc:
        raise CompactError(f"damaged compact payload: {exc}") from None
    if inflater.unconsumed_tail:
        raise CompactError(f"compact payload inflates to more than {max_bytes} bytes")
    if not inflater.eof:
        raise CompactError("truncated compact payload: the zlib stream does not end")
    if inflater.unused_data:
        raise CompactError(f"{len(inflater.unused_data)} byte(s) after the end of the compact payload")
    return out


def _dictionary(payload: bytes) -> bytes:
    """The preset dictionary the stream's header names (b"" for none), from RFC 1950's CMF, FLG and DICTID."""
    if len(payload) < 2:
        raise CompactError(f"not a compact payload: {len(payload)} byte(s)")
    cmf, flg = payload[0], payload[1]
    if cmf & 0x0F != zlib.DEFLATED or cmf >> 4 > 7 or (cmf << 8 | flg) % 31:
        raise CompactError(f"not a compact payload: no zlib header (starts with {payload[:2].hex()})")
    if not flg & 0x20:
        return b""
    if len(payload) < 6:
        raise CompactError("truncated compact payload: the dictionary id is cut off")
    dictid = int.from_bytes(payload[2:6], "big")
    dictionary = DICTIONARIES.get(dictid)
    if dictionary is None:
        raise CompactError(
            f"compact payload names dictionary {dictid:08x}, which this decoder does not know (it knows "
            f"{', '.join(f'{d:08x}' for d in DICTIONARIES)}): update the consumer's edge-agent package"
        )
    return dictionary


def decode_events(payload: bytes, max_bytes: int = MAX_DECODED_BYTES) -> list[dict[str, Any]]:
    """The CloudEvents of a compact payload: one, or a batch's in their order.

    Raises:
        CompactError: see :func:`decompress`; also JSON that is neither an event nor an array of events.
    """
    return _events(decompress(payload, max_bytes))


def decode_message(topic: str, payload: bytes, max_bytes: int = MAX_DECODED_BYTES) -> list[dict[str, Any]]:
    """The CloudEvents of any event message of the contract: per device, batch or compact (by its topic).

    Raises:
        CompactError: a payload that does not decode (see :func:`decode_events`), with the reason.
    """
    return _events(decompress(payload, max_bytes) if is_compact_topic(topic) else payload)


def _events(text: bytes) -> list[dict[str, Any]]:
    try:
        decoded = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompactError(f"not JSON: {exc}") from None
    events = decoded if isinstance(decoded, list) else [decoded]
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise CompactError(f"item {i} is a JSON {type(event).__name__}, not a CloudEvent object")
    return events
