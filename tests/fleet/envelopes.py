"""Keys, times and envelope builders the fleet tests share: one operator key set, one gateway."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.envelope import COMMAND_TYPE, TrustedKey, make_body, pae, sign
from agent.fleet.keys import public_text

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
GATEWAY = "gw-1"
GROUPS = frozenset({"north", "meters"})

OPERATOR = Ed25519PrivateKey.generate()  # may configure and write
READER = Ed25519PrivateKey.generate()  # may only read
STRANGER = Ed25519PrivateKey.generate()  # trusted by nobody
KEYS = {
    "op": TrustedKey.from_text("op", public_text(OPERATOR.public_key()), ["config", "write"]),
    "reader": TrustedKey.from_text("reader", public_text(READER.public_key()), ["read"]),
}
DROP = object()  # a body field to remove


def body(*, now: datetime = NOW, ttl: float = 3600, **changes: Any) -> dict[str, Any]:
    """A command body for our gateway, issued at ``now``; ``changes`` override fields (``DROP`` removes one)."""
    doc = make_body(target=GATEWAY, ttl=ttl, fields={"command": "ping"}, now=now)
    for name, value in changes.items():
        if value is DROP:
            del doc[name]
        else:
            doc[name] = value
    return doc


def signed(
    doc: dict[str, Any] | None = None,
    *,
    kind: str = COMMAND_TYPE,
    key: Ed25519PrivateKey = OPERATOR,
    key_id: str = "op",
) -> bytes:
    return sign(kind, body() if doc is None else doc, key, key_id)


def signed_raw(raw: bytes, *, kind: str = COMMAND_TYPE, key: Ed25519PrivateKey = OPERATOR, key_id: str = "op") -> bytes:
    """An envelope of arbitrary body bytes, properly signed: reaches the checks after the signature."""
    sig = key.sign(pae(kind, raw))
    return envelope(kind, raw, [(key_id, sig)])


def envelope(kind: str, raw: bytes, signatures: list[tuple[str, bytes]]) -> bytes:
    return json.dumps(
        {
            "payloadType": kind,
            "payload": base64.b64encode(raw).decode(),
            "signatures": [{"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in signatures],
        }
    ).encode()


def edited(data: bytes, change: Callable[[dict[str, Any]], object]) -> bytes:
    """``data`` with its envelope JSON changed in place by ``change``."""
    doc = json.loads(data)
    change(doc)
    return json.dumps(doc).encode()


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)
