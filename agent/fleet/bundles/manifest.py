"""The signed manifest of an update bundle: every file with its size and sha256, the version, targets, expiry.

It travels as the bundle's first member, ``bundle.json``: a DSSE envelope (agent/fleet/envelope.py) of
type ``BUNDLE_TYPE`` signed by a key with scope ``bundle``. Its body holds the envelope's own fields
(``target``, ``issued_at``, ``expires_at``, ``nonce``) and::

    {"format": 1, "version": 42, "targets": ["gw-017", "group:north"], "min_agent_version": "0.1.0",
     "files": [{"path": "models/yolo.onnx", "size": 8912, "sha256": "..."}, ...]}

``target`` is the first of ``targets`` (the envelope needs one); the bundle's own check takes the list.
Replays are stopped by the version (persisted highest, agent/fleet/bundles/store.py), not by the
nonce: the same file must verify again on every ``inspect``, so nonces are not remembered.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.fleet.envelope import GROUP_PREFIX, RESERVED, Refused, TrustedKey, verify
from agent.fleet.nonces import NonceStore

BUNDLE_TYPE = "application/vnd.edge-agent.bundle+json"
MANIFEST_NAME = "bundle.json"
FORMAT = 1
TOP_LEVEL = ("config.json", "profiles", "models")  # what a bundle may hold, by its first path component
MAX_FILES = 1000  # a manifest line is ~130 bytes: well under the envelope's 256 KiB
MAX_FILE_BYTES = 8 * 1024**3 - 1  # ustar's size field: 11 octal digits
MAX_PATH = 200
_FIELDS = (*RESERVED, "format", "version", "targets", "min_agent_version", "files", "health_window")
HEALTH_WINDOW_DEFAULT = 120.0  # seconds the running agent watches a bundle before its commit
HEALTH_WINDOW_RANGE = (1.0, 3600.0)
_PATH_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_AGENT_VERSION = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}$")
_TARGET = re.compile(r"^(group:[a-z0-9][a-z0-9_-]{0,62}|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


class BundleError(Exception):
    """A bundle refused: ``code`` and the messages of every problem, each naming its file or field."""

    def __init__(self, code: str, problems: list[str]) -> None:
        super().__init__(code, problems)
        self.code = code
        self.problems = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle, as the manifest declares it."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A manifest's body, its fields checked (its signature may or may not have been: see ``signed_by``)."""

    version: int
    targets: tuple[str, ...]
    min_agent_version: str
    files: tuple[FileEntry, ...]
    issued_at: str
    expires_at: str
    signed_by: str | None  # the key id whose signature verified; None when not checked
    health_window: float = HEALTH_WINDOW_DEFAULT

    @property
    def total_bytes(self) -> int:
        """The declared size of every file together."""
        return sum(entry.size for entry in self.files)

    def entry(self, path: str) -> FileEntry | None:
        """The declared file at ``path``, if any."""
        return next((e for e in self.files if e.path == path), None)


def check_path(path: object, where: str) -> str:
    """A member path as a bundle may hold it: relative, ``/``-separated, no ``..``, under ``TOP_LEVEL``.

    Raises:
        BundleError(unsafe_path): naming ``where`` and what is wrong.
    """
    if not isinstance(path, str) or not path:
        raise BundleError("unsafe_path", [f"{where}: a path is non-empty text"])
    shown = path[:MAX_PATH] + ("..." if len(path) > MAX_PATH else "")
    if path.startswith("/"):
        raise BundleError("unsafe_path", [f"{shown}: an absolute path"])
    parts = path.split("/")
    if ".." in parts:
        raise BundleError("unsafe_path", [f"{shown}: a path with '..'"])
    if len(path) > MAX_PATH or not all(_PATH_PART.match(part) for part in parts):
        raise BundleError(
            "unsafe_path",
            [f"{shown!r}: path parts are letters, digits, '.', '_' and '-' (not first), {MAX_PATH} characters at most"],
        )
    if parts[0] not in TOP_LEVEL or (parts[0] == "config.json") != (len(parts) == 1):
        raise BundleError("unsafe_path", [f"{shown}: not config.json, profiles/... or models/..."])
    return path


def body_fields(
    *,
    version: int,
    targets: list[str],
    min_agent_version: str,
    files: list[FileEntry],
    health_window: float | None = None,
) -> dict[str, Any]:
    """The manifest's own fields, for ``envelope.make_body`` (which adds target, times and nonce).

    Raises:
        ValueError: naming the field.
    """
    doc = {
        "format": FORMAT,
        "version": version,
        "targets": targets,
        "min_agent_version": min_agent_version,
        "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in files],
    }
    if health_window is not None:
        doc["health_window"] = health_window
    try:
        _fields(doc)
    except BundleError as exc:
        raise ValueError(str(exc)) from None
    return doc


def peek(envelope: bytes) -> dict[str, Any] | None:
    """The body an envelope carries, unverified (for ``inspect`` of an unsigned bundle); None if unreadable."""
    try:
        body = json.loads(base64.b64decode(json.loads(envelope)["payload"], validate=True))
    except (ValueError, TypeError, KeyError, binascii.Error, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def parse_unverified(envelope: bytes) -> Manifest:
    """The manifest's fields, signature not checked (``signed_by`` None).

    Raises:
        BundleError(malformed): naming the field.
    """
    body = peek(envelope)
    if body is None:
        raise BundleError("malformed", [f"{MANIFEST_NAME}: not a signed envelope with a JSON payload"])
    return _fields(body)


def verify_manifest(
    envelope: bytes,
    *,
    keys: Mapping[str, TrustedKey],
    gateway: str | None,
    groups: frozenset[str],
    now: datetime | None = None,
) -> Manifest:
    """The manifest if it is signed by a trusted key with scope ``bundle``, unexpired and meant for us.

    ``gateway`` None: nobody's (the operator's ``inspect``): the targets are not judged.

    Raises:
        BundleError: the envelope's code (``unsigned``, ``unknown_key``, ``scope``, ``expired``...),
            ``wrong_target`` or ``malformed``, naming the field.
    """
    body = peek(envelope)
    claimed = body.get("target") if body is not None else None
    try:
        # The bundle names a list of targets; the envelope's single ``target`` is checked below with them.
        verified = verify(
            envelope,
            payload_type=BUNDLE_TYPE,
            scope="bundle",
            keys=keys,
            gateway=claimed if isinstance(claimed, str) else "",
            groups=frozenset(),
            nonces=NonceStore(None),
            now=now,
            clock_synced=None,
        )
    except Refused as exc:
        raise BundleError(exc.code, [f"{MANIFEST_NAME}: {exc.message}"]) from None
    manifest = _fields(verified.body)
    if gateway is not None and not any(
        t == gateway or (t.startswith(GROUP_PREFIX) and t[len(GROUP_PREFIX) :] in groups) for t in manifest.targets
    ):
        raise BundleError(
            "wrong_target",
            [f"targets {', '.join(manifest.targets)} name neither this gateway ({gateway}) nor one of its groups"],
        )
    return Manifest(**{**manifest.__dict__, "signed_by": verified.key_id})


def agent_version_ok(minimum: str, running: str) -> bool:
    """Is ``running`` (``0.1.0``, maybe with a suffix such as ``.dev3``) at least ``minimum``?"""
    return _numbers(running) >= _numbers(minimum)


def _numbers(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits[0]))
    return tuple(parts) + (0,) * (4 - len(parts))


def _bad(field: str, message: str) -> BundleError:
    return BundleError("malformed", [f"{MANIFEST_NAME}: payload.{field}: {message}"])


def _fields(body: Mapping[str, Any]) -> Manifest:
    for name in body:
        if name not in _FIELDS:
            raise _bad(str(name)[:40], f"unknown field (allowed: {', '.join(_FIELDS)})")
    if body.get("format") != FORMAT:
        raise _bad("format", f"must be {FORMAT} (a newer agent's bundle?), not {body.get('format')!r}"[:120])
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**53:
        raise _bad("version", "must be an integer >= 1")
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets or len(targets) > 1000:
        raise _bad("targets", "must list 1 to 1000 gateway ids or group:<name>")
    for i, target in enumerate(targets):
        if not isinstance(target, str) or not _TARGET.match(target):
            raise _bad(f"targets[{i}]", "a gateway id or group:<name>")
    if "target" in body and body["target"] != targets[0]:
        raise _bad("target", "must be the first of targets")
    minimum = body.get("min_agent_version")
    if not isinstance(minimum, str) or not _AGENT_VERSION.match(minimum):
        raise _bad("min_agent_version", "must be a version such as 0.1.0")
    files = body.get("files")
    if not isinstance(files, list) or not files or len(files) > MAX_FILES:
        raise _bad("files", f"must list 1 to {MAX_FILES} files")
    entries = [_entry(item, f"files[{i}]") for i, item in enumerate(files)]
    seen: set[str] = set()
    for entry in entries:
        folded = entry.path.lower()  # two names one case-insensitive file system would merge
        if folded in seen:
            raise _bad("files", f"{entry.path} is listed twice")
        seen.add(folded)
    window = body.get("health_window", HEALTH_WINDOW_DEFAULT)
    low, high = HEALTH_WINDOW_RANGE
    if not isinstance(window, int | float) or isinstance(window, bool) or not low <= window <= high:
        raise _bad("health_window", f"must be a number of seconds from {low:g} to {high:g}")
    return Manifest(
        version,
        tuple(targets),
        minimum,
        tuple(entries),
        str(body.get("issued_at", "")),
        str(body.get("expires_at", "")),
        None,
        float(window),
    )


def _entry(item: Any, where: str) -> FileEntry:
    if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
        raise _bad(where, "must be an object of exactly path, size and sha256")
    path = check_path(item["path"], f"payload.{where}.path")
    size = item["size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
        raise _bad(f"{where}.size", f"must be an integer of 0 to {MAX_FILE_BYTES} bytes")
    digest = item["sha256"]
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise _bad(f"{where}.sha256", "must be 64 lowercase hex digits")
    return FileEntry(path, size, digest)
