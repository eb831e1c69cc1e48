"""Desired config documents as the operator makes them: sections of a site file, signed (docs/fleet.md).

``sign`` writes one to a file; ``push-config`` signs one per gateway or reads a signed file. Both
take whole top-level sections of a site file that validated in full, as they are written (relative
paths stay relative: the gateway resolves them against its own site file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.envelope import CONFIG_TYPE, GROUP_PREFIX, MAX_ENVELOPE_BYTES, MAX_TTL, make_body, sign
from agent.tools.fleet.targets import expand

ALLOWED_SECTIONS = ("devices", "priorities", "observability", "uplink", "fleet")
BOOTSTRAP_SECTIONS = ("gateway", "buffer")  # the local file's own: what the gateway needs to reach anyone
NOT_BY_DEFAULT = ("uplink", "fleet")  # the channel the document travels on: only when named
DEFAULT_TTL = "7d"
HEALTH_WINDOW = (10, 3600)
DEFAULT_HEALTH_WINDOW = 120
_TTL = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_GROUP = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # agent/fleet/config.py GROUP_PATTERN
_SIG_CHARS = 88  # base64 of a 64-byte Ed25519 signature


def parse_ttl(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or ``3600`` (seconds) -> seconds, 1 s to 30 days.

    Raises:
        ValueError: naming --ttl and what it accepts.
    """
    match = _TTL.match(text.strip())
    if match is None:
        raise ValueError(f"--ttl {text!r}: a number of seconds or a duration such as 3600, 90s, 30m, 12h, 7d")
    seconds = float(match[1]) * _UNIT[match[2] or "s"]
    if not 1 <= seconds <= MAX_TTL.total_seconds():
        raise ValueError(f"--ttl {text!r}: from 1 s to {MAX_TTL.days}d (a gateway refuses a longer life)")
    return seconds


def parse_sections(text: str | None) -> list[str] | None:
    """``devices,priorities`` -> the names, each allowed; None when not given.

    Raises:
        ValueError: a bootstrap section, an unknown one, or an empty list.
    """
    if text is None:
        return None
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError("--sections: name at least one of " + ", ".join(ALLOWED_SECTIONS))
    for name in names:
        if name in BOOTSTRAP_SECTIONS:
            raise ValueError(
                f"--sections: {name!r} is the local site file's own (bootstrap) and is never pushed;"
                f" pushable: {', '.join(ALLOWED_SECTIONS)}"
            )
        if name not in ALLOWED_SECTIONS:
            raise ValueError(f"--sections: unknown section {name!r} (pushable: {', '.join(ALLOWED_SECTIONS)})")
    return names


def check_target(text: str) -> str:
    """A gateway id or ``group:<name>``.

    Raises:
        ValueError: naming --target.
    """
    if text.startswith(GROUP_PREFIX):
        if not _GROUP.match(text[len(GROUP_PREFIX) :]):
            raise ValueError(f"--target {text!r}: a group name is lowercase letters, digits, - and _")
        return text
    try:
        ids = expand(text)
    except ValueError as exc:
        raise ValueError(f"--target: {exc}") from exc
    if ids != [text]:
        raise ValueError(f"--target {text!r}: one gateway id or group:<name> (push-config --to takes lists)")
    return text


def site_sections(path: Path, names: list[str] | None) -> dict[str, Any]:
    """The named top-level sections of the site file ``path``, as written, once the whole file validated.

    ``names`` None: every pushable section present except uplink and fleet.

    Raises:
        ConfigError: the file does not validate (each problem as ``file:line: field: message``).
        ValueError: a named section is not in the file, none is left, or a value has no JSON form.
    """
    from agent.config.model import load_config
    from agent.config.yaml_load import load_yaml, read_text

    load_config(path)  # the agent's own verdict first: a gateway would refuse what fails it
    data, _ = load_yaml(read_text(path))
    present = [name for name in ALLOWED_SECTIONS if name in data]
    if names is None:
        names = [name for name in present if name not in NOT_BY_DEFAULT]
        if not names:
            raise ValueError(f"{path} has none of {', '.join(n for n in ALLOWED_SECTIONS if n not in NOT_BY_DEFAULT)}")
    missing = [name for name in names if name not in data]
    if missing:
        raise ValueError(
            f"{path} has no top-level {', '.join(missing)} section (it has {', '.join(present) or 'none'})"
        )
    sections = {name: data[name] for name in names}
    _json_only(sections, "sections")
    return sections


def _json_only(value: Any, where: str) -> None:
    """Refuse what YAML can say and JSON cannot (a date, binary, a set, a number key, NaN), naming the field."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"{at}: key {key!r} is not text (quote it in the site file)")
                stack.append((child, f"{at}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{at}: {item} has no JSON form")
        elif item is not None and not isinstance(item, str | int | float | bool):
            raise ValueError(f"{at}: a {type(item).__name__} has no JSON form (quote it in the site file)")


def config_hash(sections: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``sections``: how reports name what runs."""
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"))  # as the spec says: ASCII, escaped
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def check_version(version: int) -> int:
    """Raises ValueError unless ``version`` >= 1."""
    if version < 1:
        raise ValueError(f"--version {version}: an integer >= 1 (a higher version wins)")
    return version


def check_health_window(seconds: int) -> int:
    """Raises ValueError outside 10..3600 s."""
    low, high = HEALTH_WINDOW
    if not low <= seconds <= high:
        raise ValueError(f"--health-window {seconds}: {low} to {high} seconds")
    return seconds


def build(
    sections: dict[str, Any],
    *,
    key: Ed25519PrivateKey,
    key_id: str,
    version: int,
    target: str,
    ttl: float,
    health_window: int,
    require_new_devices: bool,
) -> bytes:
    """The signed envelope of a config document.

    Raises:
        ValueError: it would be over the 256 KiB a gateway accepts (by how much), or a bad field.
    """
    fields = {
        "version": check_version(version),
        "sections": sections,
        "health_window": check_health_window(health_window),
        "require_new_devices": require_new_devices,
    }
    body = make_body(target=target, ttl=ttl, fields=fields)
    size = _signed_size(body, key_id)
    if size > MAX_ENVELOPE_BYTES:
        raise ValueError(
            f"the signed document would be {size} bytes, {size - MAX_ENVELOPE_BYTES} over the"
            f" {MAX_ENVELOPE_BYTES} a gateway accepts: push fewer sections at a time ({', '.join(sections)})"
        )
    return sign(CONFIG_TYPE, body, key, key_id)


def _signed_size(body: dict[str, Any], key_id: str) -> int:
    """The length ``envelope.sign`` will produce (it only says "too large", not by how much)."""
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    envelope = {
        "payloadType": CONFIG_TYPE,
        "payload": base64.b64encode(raw).decode("ascii"),
        "signatures": [{"keyid": key_id, "sig": "A" * _SIG_CHARS}],
    }
    return len(json.dumps(envelope, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Signed:
    """A signed config envelope read back from a file: its bytes and what its body says."""

    data: bytes
    version: int
    target: str
    sections: dict[str, Any]
    expires_at: str
    health_window: int | None

    @property
    def hash(self) -> str:
        """The hash of its sections, as the gateway will report it."""
        return config_hash(self.sections)


def read_signed(path: Path, now: datetime | None = None) -> Signed:
    """The config envelope in ``path`` (as ``sign`` wrote it); its signature is the gateway's to check.

    Raises:
        ValueError: unreadable, over 256 KiB, not a config envelope, a body field missing, or expired.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_ENVELOPE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"{path} is over the {MAX_ENVELOPE_BYTES} bytes a gateway accepts")
    try:
        envelope = json.loads(data)
        kind = envelope["payloadType"] if isinstance(envelope, dict) else None
        body = json.loads(base64.b64decode(envelope["payload"], validate=True)) if kind == CONFIG_TYPE else None
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"{path} is not a signed envelope as `edge-agent fleet sign` writes ({exc})") from exc
    if kind != CONFIG_TYPE:
        raise ValueError(f"{path} is not a config envelope (payloadType {kind!r}, expected {CONFIG_TYPE!r})")
    if not isinstance(body, dict):
        raise ValueError(f"{path}: payload is not a JSON object")
    version, target, sections, expires = (body.get(k) for k in ("version", "target", "sections", "expires_at"))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: payload.version is missing or not an integer >= 1")
    if not isinstance(target, str) or not isinstance(sections, dict) or not isinstance(expires, str):
        raise ValueError(f"{path}: payload.target, payload.sections or payload.expires_at is missing")
    try:
        expired = datetime.fromisoformat(expires) <= (now or datetime.now(UTC))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: payload.expires_at {expires!r} is not a time") from exc
    if expired:
        raise ValueError(f"{path} expired at {expires}: every gateway would refuse it; sign it again")
    window = body.get("health_window")
    return Signed(data, version, target, sections, expires, window if isinstance(window, int) else None)
