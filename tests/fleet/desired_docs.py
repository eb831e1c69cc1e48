"""Operator keys, site files and signed desired documents shared by the remote configuration tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.envelope import CONFIG_TYPE, make_body, sign
from agent.fleet.keys import public_text
from tests.conftest import write_config

METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"


@dataclass
class Keys:
    """``op`` signs config, ``keeper`` config and keys, ``reader`` only reads, ``stranger`` is trusted by nobody."""

    op: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    keeper: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    reader: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    stranger: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def entries(self) -> list[dict[str, Any]]:
        """The site file's ``fleet.keys``."""
        return [
            {"id": "op", "public_key": public_text(self.op.public_key()), "scopes": ["config", "read"]},
            {"id": "keeper", "public_key": public_text(self.keeper.public_key()), "scopes": ["config", "keys"]},
            {"id": "reader", "public_key": public_text(self.reader.public_key()), "scopes": ["read"]},
        ]

    def fleet(self, **changes: Any) -> dict[str, Any]:
        """A whole ``fleet`` section as a remote document would carry it."""
        return {"enabled": True, "clock": "trusted", "groups": ["north"], "keys": self.entries(), **changes}


def site(tmp_path: Path, port: int, keys: Keys, *, devices: str = METER, clock: str = "trusted") -> Path:
    """A site file with the fleet channel on (the test container's clock is right but not NTP-disciplined)."""
    fleet = keys.fleet(clock=clock)
    extra = "fleet: " + json.dumps(fleet) + "\n"
    return write_config(tmp_path / "site.yaml", port=port, devices=devices, extra=extra)


def desired(
    keys: Keys,
    version: Any,
    sections: Any,
    *,
    by: str = "op",
    key_id: str | None = None,
    target: str = "gw-test",
    ttl: float = 3600,
    now: datetime | None = None,
    kind: str = CONFIG_TYPE,
    **fields: Any,
) -> bytes:
    """A signed desired document (``fields`` add or override body fields)."""
    body = make_body(target=target, ttl=ttl, fields={"version": version, "sections": sections, **fields}, now=now)
    return sign(kind, body, getattr(keys, by), key_id or by)


def devices(*rows: dict[str, Any]) -> list[dict[str, Any]]:
    """A devices section of virtual meters."""
    return [{"driver": "virtual", "kind": "meter", **row} for row in rows]
