"""The desired document: its body once the envelope verified, and the checks on what it may change.

Body (docs/fleet.md): the envelope's own fields, then ``version`` (integer >= 1), ``sections``
(whole top-level sections of a site file), ``health_window`` (seconds, 10..3600, default 120)
and ``require_new_devices`` (default false). Every refusal names the offending field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config.remote import REMOTE_SECTIONS
from agent.fleet.config import FleetConfig
from agent.fleet.envelope import RESERVED, TrustedKey, pae

HEALTH_WINDOW_DEFAULT = 120.0
HEALTH_WINDOW_MIN = 10.0
HEALTH_WINDOW_MAX = 3600.0
BOOTSTRAP_SECTIONS = ("gateway", "buffer")  # the local file's alone: who we are, where the buffer is
_FIELDS = (*RESERVED, "version", "sections", "health_window", "require_new_devices")


@dataclass(frozen=True)
class Problem:
    """One error of a report: the field's path, a code and a message."""

    field: str | None
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """As the reported document lists it."""
        return {"field": self.field, "code": self.code, "message": self.message}


class Rejected(Exception):
    """A document refused: ``code`` (an envelope code, stale, invalid, keys_lockout...), its errors."""

    def __init__(self, code: str, reason: str, errors: list[Problem] | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.errors = errors if errors is not None else []


@dataclass(frozen=True)
class Desired:
    """A verified desired document."""

    version: int
    sections: dict[str, Any]
    hash: str
    health_window: float = HEALTH_WINDOW_DEFAULT
    require_new_devices: bool = False
    key_id: str = ""
    digest: str = ""  # sha256 of the envelope's bytes: the same retained message arrives on each reconnect
    envelope: bytes = field(default=b"", repr=False)
    downgrade: bool = False  # a bundle's older version, allowed by a signed directive (bundles/downgrade.py)


def sections_hash(sections: Mapping[str, Any]) -> str:
    """``sha256:`` + hex of the canonical JSON of ``sections`` (sorted keys, no spaces)."""
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def digest_of(data: bytes) -> str:
    """The sha256 of an envelope's exact bytes."""
    return hashlib.sha256(data).hexdigest()


def _malformed(name: str, message: str) -> Rejected:
    return Rejected("malformed", message, [Problem(name, "malformed", message)])


def parse(body: Mapping[str, Any], *, key_id: str, data: bytes) -> Desired:
    """The document in a verified body; Rejected(malformed) naming the first wrong field."""
    for name in body:
        if name not in _FIELDS:
            raise _malformed(f"payload.{name}", f"payload.{name}: unknown field (allowed: {', '.join(_FIELDS)})")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _malformed("payload.version", f"payload.version must be an integer >= 1, not {_shown(version)}")
    sections = body.get("sections")
    if not isinstance(sections, dict) or not sections:
        raise _malformed("payload.sections", "payload.sections must be an object holding at least one section")
    for name in sections:
        if name in BOOTSTRAP_SECTIONS:
            raise _malformed(
                f"payload.sections.{name}", f"payload.sections.{name}: the local site file alone sets {name}"
            )
        if name not in REMOTE_SECTIONS:
            raise _malformed(
                f"payload.sections.{name}",
                f"payload.sections.{_shown(name)}: not a section (allowed: {', '.join(REMOTE_SECTIONS)})",
            )
    window = body.get("health_window", HEALTH_WINDOW_DEFAULT)
    if (
        not isinstance(window, (int, float))
        or isinstance(window, bool)
        or not HEALTH_WINDOW_MIN <= window <= HEALTH_WINDOW_MAX
    ):
        raise _malformed(
            "payload.health_window",
            f"payload.health_window must be {HEALTH_WINDOW_MIN:g} to {HEALTH_WINDOW_MAX:g} seconds,"
            f" not {_shown(window)}",
        )
    require = body.get("require_new_devices", False)
    if not isinstance(require, bool):
        raise _malformed("payload.require_new_devices", "payload.require_new_devices must be true or false")
    return Desired(version, sections, sections_hash(sections), float(window), require, key_id, digest_of(data), data)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def peek(data: bytes) -> tuple[int, str | None]:
    """The version and hash an unverified envelope claims, for the report of its refusal (0, None if none)."""
    try:
        body = json.loads(base64.b64decode(json.loads(data)["payload"], validate=True))
        version, sections = body.get("version"), body.get("sections")
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, RecursionError):
        return 0, None
    number = version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else 0
    try:
        return number, sections_hash(sections) if isinstance(sections, dict) else None
    except (ValueError, TypeError):
        return number, None


def signed_with_scope(data: bytes, scope: str, keys: Mapping[str, TrustedKey]) -> bool:
    """Does a signature of this (already verified) envelope come from a trusted key holding ``scope``?"""
    try:
        doc = json.loads(data)
        kind, body = doc["payloadType"], base64.b64decode(doc["payload"], validate=True)
        signatures = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in doc["signatures"]]
    except (ValueError, TypeError, KeyError, binascii.Error):
        return False
    message = pae(kind, body)
    for keyid, sig in signatures:
        key = keys.get(keyid)
        if key is None or scope not in key.scopes:
            continue
        try:
            key.public_key.verify(sig, message)
        except Exception:  # noqa: S112 - InvalidSignature: try the next one
            continue
        return True
    return False


def check_fleet_section(new: FleetConfig, old: FleetConfig) -> None:
    """A remote ``fleet`` section may not turn the channel off or move it, nor lock the operator out."""
    for name in ("enabled", "root"):
        if getattr(new, name) != getattr(old, name):
            message = f"fleet.{name} cannot be changed remotely (it needs a restart with a new local file)"
            raise Rejected("invalid", message, [Problem(f"sections.fleet.{name}", "invalid", message)])
    if not any("config" in key.scopes for key in new.keys):
        message = "no key with scope config would remain: nobody could sign the next config"
        raise Rejected("keys_lockout", message, [Problem("sections.fleet.keys", "keys_lockout", message)])
