"""Signed fleet documents: a DSSE envelope (https://github.com/secure-systems-lab/dsse), Ed25519 keys.

On the wire, compact JSON::

    {"payloadType": "application/vnd.edge-agent.config+json",
     "payload": "<standard base64, padded, of the body's bytes>",
     "signatures": [{"keyid": "<id of a trusted key>", "sig": "<base64 of the 64-byte signature>"}]}

Each signature covers DSSE's pre-authentication encoding of the type and the body's exact bytes
(``pae``), so a config cannot pass as a command and nothing is re-serialised before checking.
The body is a JSON object naming its ``target`` (a gateway id, or ``group:<name>``), when it was
``issued_at`` and ``expires_at`` (RFC 3339), and a random ``nonce``; the rest is the document's.

``verify`` checks what arrives in a fixed order and raises ``Refused`` at the first failure, with a
reason code and the path of the offending field: everything before the signature check is bounded
by the size cap, and nothing is remembered unless every check passed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.fleet.keys import parse_public_text
from agent.fleet.nonces import NonceStore

COMMAND_TYPE = "application/vnd.edge-agent.command+json"
CONFIG_TYPE = "application/vnd.edge-agent.config+json"
MAX_ENVELOPE_BYTES = 256 * 1024
SCOPES = ("config", "read", "write", "restart", "diagnostics", "keys", "bundle")
CODES = (
    "too_large",
    "malformed",
    "unsigned",
    "unknown_key",
    "bad_signature",
    "wrong_type",
    "scope",
    "wrong_target",
    "expired",
    "not_yet_valid",
    "replayed",
    "clock_unsynced",
)

MAX_SKEW = timedelta(minutes=5)  # how far ahead of our clock a document may say it was issued
MAX_TTL = timedelta(days=30)  # a longer life would make the nonce list a long-term liability
MAX_DEPTH = 32  # of the body's JSON; a site config nests a handful of levels
MAX_SIGNATURES = 8
GROUP_PREFIX = "group:"
RESERVED = ("target", "issued_at", "expires_at", "nonce")

_ENVELOPE_KEYS = ("payloadType", "payload", "signatures")
_SIGNATURE_KEYS = ("keyid", "sig")
_NONCE = re.compile(r"[0-9A-Za-z_-]{16,128}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_SHORT = 200  # the longest type, key id or target echoed back


class Refused(Exception):
    """A document refused: ``code`` (one of ``CODES``), ``field`` (its JSON path, or None), ``message``."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message, field)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class TrustedKey:
    """A public key the site file trusts, and what it may sign (a subset of ``SCOPES``)."""

    id: str
    public_key: Ed25519PublicKey
    scopes: frozenset[str]

    @classmethod
    def from_text(cls, id: str, public_key: str, scopes: Iterable[str]) -> TrustedKey:
        """The key as a site file lists it: ``public_key`` is ``ed25519:<base64>`` as ``fleet keygen`` prints.

        Raises:
            ValueError: empty id, a key of another form, or a scope not in ``SCOPES``.
        """
        if not isinstance(id, str) or not id or len(id) > _SHORT or not id.isprintable():
            raise ValueError(f"a key id must be printable text of 1 to {_SHORT} characters, not {id!r}")
        if isinstance(scopes, str):
            raise ValueError(f"scopes must be a list of scopes, not the text {scopes!r}")
        given = frozenset(scopes)
        unknown = sorted(given - frozenset(SCOPES))
        if unknown:
            raise ValueError(
                f"key {id!r}: unknown scope(s) {', '.join(map(repr, unknown))} (known: {', '.join(SCOPES)})"
            )
        try:
            key = parse_public_text(public_key)
        except ValueError as exc:
            raise ValueError(f"key {id!r}: {exc}") from exc
        return cls(id, key, given)


@dataclass(frozen=True)
class Verified:
    """A document that passed every check; its nonce is now remembered."""

    payload_type: str
    body: dict[str, Any]
    key_id: str
    nonce: str
    issued_at: datetime
    expires_at: datetime


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so the type cannot be swapped."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC to the second: ``2025-01-31T12:00:00Z``."""
    return _aware(moment, "moment").astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_body(*, target: str, ttl: float, fields: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """A document's body: ``target``, ``issued_at`` (now), ``expires_at`` (``ttl`` s later), a nonce, then ``fields``.

    Raises:
        ValueError: an empty target, ``ttl`` outside 1 s .. 30 days, or ``fields`` naming a reserved key.
    """
    if not isinstance(target, str) or not target:
        raise ValueError("target must be a gateway id or group:<name>")
    if not 1 <= ttl <= MAX_TTL.total_seconds():
        raise ValueError(f"ttl must be 1 s to {MAX_TTL.days} days, not {ttl!r}")
    clash = sorted(set(RESERVED) & set(fields))
    if clash:
        raise ValueError(f"fields may not set {', '.join(clash)}: make_body sets them")
    issued = _now(now).replace(microsecond=0)
    expires = issued + timedelta(seconds=ttl)
    return {
        "target": target,
        "issued_at": format_time(issued),
        "expires_at": format_time(expires),
        "nonce": secrets.token_hex(16),
        **fields,
    }


def sign(payload_type: str, body: Mapping[str, Any], key: Ed25519PrivateKey, key_id: str) -> bytes:
    """The envelope (compact JSON bytes) of ``body`` signed by ``key`` under ``key_id``.

    Raises:
        ValueError: the body cannot be JSON, or the envelope would exceed ``MAX_ENVELOPE_BYTES``.
    """
    raw = json.dumps(dict(body), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    signature = key.sign(pae(payload_type, raw))
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(raw).decode("ascii"),
        "signatures": [{"keyid": key_id, "sig": base64.b64encode(signature).decode("ascii")}],
    }
    data = json.dumps(envelope, separators=(",", ":")).encode()
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"the signed document is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} a gateway accepts")
    return data


def verify(
    data: bytes,
    *,
    payload_type: str,
    scope: str,
    keys: Mapping[str, TrustedKey],
    gateway: str,
    groups: frozenset[str],
    nonces: NonceStore,
    now: datetime | None = None,
    clock_synced: bool | None = True,
) -> Verified:
    """The document in ``data`` if it may act on this gateway with ``scope``; else raise ``Refused``.

    ``keys``: the trusted keys by id. ``gateway``, ``groups``: who we are, for the target.
    ``clock_synced``: False refuses every document (``clock_unsynced``): with the clock wrong,
    expiry means nothing; None (unknown) judges by the clock as it is. ``now``: the current
    time (aware), for tests.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if len(data) > MAX_ENVELOPE_BYTES:
        _refuse("too_large", f"the envelope is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} accepted")
    kind, body, signatures = _envelope(data)
    signed_by = _signers(kind, body, signatures, keys)
    if kind != payload_type:
        _refuse("wrong_type", f"payloadType is {_short(kind)}, expected {payload_type!r}", "payloadType")
    key_id = _with_scope(signed_by, scope, keys)
    doc = _load_json(body, "payload")
    if not isinstance(doc, dict):
        _refuse("malformed", "the payload is not a JSON object", "payload")
    target, issued_at, expires_at, nonce = _body_fields(doc)
    if target != gateway and not (target.startswith(GROUP_PREFIX) and target[len(GROUP_PREFIX) :] in groups):
        _refuse(
            "wrong_target",
            f"payload.target {_short(target)} is neither this gateway nor one of its groups",
            "payload.target",
        )
    current = _now(now)
    _check_times(issued_at, expires_at, current, clock_synced)
    if nonces.below_floor(issued_at):
        _refuse(
            "replayed",
            f"payload.issued_at is before {nonces.floor}: this gateway may have accepted and forgotten it",
            "payload.issued_at",
        )
    if nonces.seen_or_remember(nonce, expires_at, current, issued_at=issued_at):
        _refuse("replayed", "payload.nonce was seen before: this document was already accepted", "payload.nonce")
    return Verified(kind, doc, key_id, nonce, issued_at, expires_at)


def _refuse(code: str, message: str, field: str | None = None) -> NoReturn:
    raise Refused(code, message, field)


def _short(text: str) -> str:
    """``text`` quoted for a message, cut to a readable length (it came from outside)."""
    return repr(text if len(text) <= _SHORT else text[:_SHORT] + "...")


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone (datetime.now(UTC))")
    return moment


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else _aware(now, "now").astimezone(UTC)


def _load_json(data: bytes, field: str | None) -> Any:
    """Strict JSON (UTF-8, no NaN, no repeated key), at most ``MAX_DEPTH`` deep; else Refused(malformed).

    The input is already capped at ``MAX_ENVELOPE_BYTES``, so parsing is linear in at most that;
    deeper nesting than the parser's recursion limit comes back as RecursionError, turned into a refusal.
    """
    where = field or "the envelope"
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError:
        _refuse("malformed", f"{where} is not UTF-8 text", field)
    except RecursionError:
        _refuse("malformed", f"{where} nests deeper than {MAX_DEPTH} levels", field)
    except ValueError as exc:
        _refuse("malformed", f"{where} is not JSON ({_first_line(exc)})", field)
    if _deeper_than(value, MAX_DEPTH):
        _refuse("malformed", f"{where} nests deeper than {MAX_DEPTH} levels", field)
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:_SHORT] if str(exc) else type(exc).__name__


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers may keep different copies of a repeated key: what was checked must be what is used.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {_short(key)} appears twice")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _deeper_than(value: Any, limit: int) -> bool:
    """Does ``value`` nest lists and objects more than ``limit`` levels? Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _envelope(data: bytes) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """The envelope's type, body bytes and (key id, signature) pairs, each checked for shape."""
    doc = _load_json(data, None)
    if not isinstance(doc, dict):
        _refuse("malformed", f"the envelope is a JSON {type(doc).__name__}, not an object")
    _only_keys(doc, _ENVELOPE_KEYS, "")
    kind = doc.get("payloadType")
    if not isinstance(kind, str) or not kind or not _utf8(kind):
        _refuse("malformed", "payloadType is missing or not text", "payloadType")
    payload = doc.get("payload")
    if not isinstance(payload, str):
        _refuse("malformed", "payload is missing or not text", "payload")
    body = _base64(payload, "payload")
    signatures = doc.get("signatures")
    if signatures is None or signatures == []:
        _refuse("unsigned", "signatures is missing or empty: the envelope is unsigned", "signatures")
    if not isinstance(signatures, list):
        _refuse("malformed", "signatures is not a list", "signatures")
    if len(signatures) > MAX_SIGNATURES:
        _refuse("malformed", f"signatures has {len(signatures)} entries, at most {MAX_SIGNATURES}", "signatures")
    return kind, body, [_signature(entry, f"signatures[{i}]") for i, entry in enumerate(signatures)]


def _utf8(text: str) -> bool:
    """Can ``text`` be signed as UTF-8? JSON's ``\\ud800`` escapes decode to lone surrogates, which cannot."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _only_keys(doc: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            _refuse("malformed", f"unknown field {_short(prefix + key)} (allowed: {', '.join(allowed)})", prefix + key)


def _signature(entry: Any, where: str) -> tuple[str, bytes]:
    if not isinstance(entry, dict):
        _refuse("malformed", f"{where} is not an object", where)
    _only_keys(entry, _SIGNATURE_KEYS, f"{where}.")
    keyid = entry.get("keyid")
    if not isinstance(keyid, str) or not keyid or len(keyid) > _SHORT:
        _refuse("malformed", f"{where}.keyid is missing or not text of 1 to {_SHORT} characters", f"{where}.keyid")
    sig = entry.get("sig")
    if not isinstance(sig, str):
        _refuse("malformed", f"{where}.sig is missing or not text", f"{where}.sig")
    raw = _base64(sig, f"{where}.sig")
    if len(raw) != 64:
        _refuse("malformed", f"{where}.sig is {len(raw)} bytes, an Ed25519 signature is 64", f"{where}.sig")
    return keyid, raw


def _base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _refuse("malformed", f"{field} is not standard base64", field)


def _signers(
    kind: str, body: bytes, signatures: list[tuple[str, bytes]], keys: Mapping[str, TrustedKey]
) -> list[tuple[int, str]]:
    """(index, key id) of each signature that verifies by a trusted key; Refused if none does."""
    message = pae(kind, body)
    good: list[tuple[int, str]] = []
    bad: list[int] = []
    for i, (keyid, sig) in enumerate(signatures):
        key = keys.get(keyid)
        if key is None:
            continue
        try:
            key.public_key.verify(sig, message)
        except InvalidSignature:
            bad.append(i)
        else:
            good.append((i, keyid))
    if good:
        return good
    if bad:
        i = bad[0]
        _refuse(
            "bad_signature",
            f"signatures[{i}].sig does not verify with key {_short(signatures[i][0])}",
            f"signatures[{i}].sig",
        )
    _refuse(
        "unknown_key",
        f"signatures[0].keyid {_short(signatures[0][0])} is not a trusted key"
        + (f" (nor are the other {len(signatures) - 1})" if len(signatures) > 1 else ""),
        "signatures[0].keyid",
    )


def _with_scope(signed_by: list[tuple[int, str]], scope: str, keys: Mapping[str, TrustedKey]) -> str:
    """The id of the first verified signer holding ``scope``; Refused(scope) naming the first signer if none does."""
    for _, keyid in signed_by:
        if scope in keys[keyid].scopes:
            return keyid
    i, keyid = signed_by[0]
    held = ", ".join(sorted(keys[keyid].scopes)) or "none"
    _refuse(
        "scope",
        f"signatures[{i}].keyid {_short(keyid)} may not sign for {scope!r} (its scopes: {held})",
        f"signatures[{i}].keyid",
    )


def _body_fields(doc: dict[str, Any]) -> tuple[str, datetime, datetime, str]:
    target = doc.get("target")
    if not isinstance(target, str) or not target:
        _refuse("malformed", "payload.target is missing or not text", "payload.target")
    issued_at = _time(doc, "issued_at")
    expires_at = _time(doc, "expires_at")
    nonce = doc.get("nonce")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        _refuse("malformed", "payload.nonce is missing or not 16 to 128 letters, digits, - or _", "payload.nonce")
    return target, issued_at, expires_at, nonce


def _time(doc: dict[str, Any], name: str) -> datetime:
    value = doc.get(name)
    if value is None:
        _refuse("malformed", f"payload.{name} is missing", f"payload.{name}")
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        _refuse("malformed", f"payload.{name} is not an RFC 3339 time such as 2025-01-31T12:00:00Z", f"payload.{name}")
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (ValueError, OverflowError):
        _refuse("malformed", f"payload.{name} {_short(value)} is not a valid date and time", f"payload.{name}")


def _check_times(issued_at: datetime, expires_at: datetime, current: datetime, clock_synced: bool | None) -> None:
    if clock_synced is False:
        _refuse("clock_unsynced", "the gateway's clock is not synchronised: payload.expires_at cannot be judged")
    if issued_at - current > MAX_SKEW:  # differences, not sums: no overflow near year 9999
        _refuse(
            "not_yet_valid",
            f"payload.issued_at {format_time(issued_at)} is ahead of now ({format_time(current)})",
            "payload.issued_at",
        )
    if expires_at <= current:
        _refuse(
            "expired",
            f"payload.expires_at {format_time(expires_at)} has passed (now {format_time(current)})",
            "payload.expires_at",
        )
    if not timedelta(0) < expires_at - issued_at <= MAX_TTL:
        _refuse(
            "malformed",
            f"payload.expires_at must be after payload.issued_at, by {MAX_TTL.days} days at most",
            "payload.expires_at",
        )
