"""Making a bundle file from a folder (``edge-agent bundle build``) and signing one (``bundle sign``), offline.

The folder holds any of ``config.yaml`` (a whole site file: it must validate as the agent validates
it, and its pushable sections go into the bundle's ``config.json``, as a desired document's
``sections``), ``profiles/*.yaml`` (device profiles, each checked as the Modbus driver reads it)
and ``models/`` (manifests and the files they name, each hash checked). Anything else is refused,
so nobody signs a broken or unexpected bundle.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.bundles.manifest import BUNDLE_TYPE, MANIFEST_NAME, BundleError, FileEntry, body_fields, check_path
from agent.fleet.bundles.tarball import BLOCK, add, header, members, writer
from agent.fleet.envelope import MAX_ENVELOPE_BYTES, make_body, pae

MODEL_SUFFIXES = (".yaml", ".yml", ".json")


class BuildError(ValueError):
    """The folder cannot become a bundle; ``problems`` names each file and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def collect(folder: Path, sections: list[str] | None) -> list[tuple[str, bytes | Path]]:
    """(path in the bundle, bytes or the file to copy) for everything ``folder`` holds, each checked.

    Raises:
        BuildError: every problem found, each naming its file.
    """
    problems: list[str] = []
    items: list[tuple[str, bytes | Path]] = []
    if not folder.is_dir():
        raise BuildError([f"{folder}: not a folder"])
    for child in sorted(folder.rglob("*")):
        rel = child.relative_to(folder).as_posix()
        if child.is_symlink():
            problems.append(f"{rel}: a symbolic link; copy the file in")
        elif child.is_dir():
            if rel not in ("profiles", "models"):
                problems.append(f"{rel}: unexpected folder (a bundle holds config.yaml, profiles/, models/)")
        elif rel != "config.yaml" and not rel.startswith(("profiles/", "models/")):
            problems.append(f"{rel}: unexpected file (a bundle holds config.yaml, profiles/*.yaml, models/*)")
    if (folder / "config.yaml").is_file():
        items += _config(folder / "config.yaml", sections, problems)
    items += _profiles(folder, problems)
    items += _models(folder, problems)
    for path, _ in items:
        try:
            check_path(path, path)
        except BundleError as exc:
            problems.append(str(exc))
    if not items and not problems:
        problems.append(f"{folder}: holds none of config.yaml, profiles/*.yaml, models/*")
    if problems:
        raise BuildError(problems)
    return items


def _config(path: Path, sections: list[str] | None, problems: list[str]) -> list[tuple[str, bytes | Path]]:
    from agent.errors import ConfigError
    from agent.tools.fleet.documents import site_sections

    try:
        chosen = site_sections(path, sections)
    except ConfigError as exc:
        problems += [f"config.yaml: {p}" for p in exc.problems]
        return []
    except ValueError as exc:
        problems.append(f"config.yaml: {exc}")
        return []
    text = json.dumps({"sections": chosen}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return [("config.json", text.encode())]


def _profiles(folder: Path, problems: list[str]) -> list[tuple[str, bytes | Path]]:
    from drivers.modbus.profiles import ProfileError, apply_profile

    found: list[tuple[str, bytes | Path]] = []
    for file in sorted((folder / "profiles").glob("*")) if (folder / "profiles").is_dir() else []:
        if file.is_symlink() or not file.is_file():
            continue
        rel = f"profiles/{file.name}"
        if file.suffix != ".yaml":
            problems.append(f"{rel}: a profile is a .yaml file")
            continue
        try:
            # The driver's own reading of it, found as a site file next to this folder would find it.
            apply_profile({"profile": file.stem}, folder)
        except ProfileError as exc:
            problems.append(f"{rel}: {exc}")
            continue
        found.append((rel, file))
    return found


def _models(folder: Path, problems: list[str]) -> list[tuple[str, bytes | Path]]:
    from agent.inference.manifest import ModelError, load_manifest

    models = folder / "models"
    if not models.is_dir():
        return []
    files = {f.name: f for f in sorted(models.iterdir()) if f.is_file() and not f.is_symlink()}
    named: set[str] = set()
    found: list[tuple[str, bytes | Path]] = []
    for name, file in files.items():
        if file.suffix not in MODEL_SUFFIXES:
            continue
        try:
            manifest = load_manifest(file)  # validates it and checks its model file's sha256
        except ModelError as exc:
            problems.append(f"models/{name}: {exc}")
            continue
        model = manifest.model_path
        if model.parent.resolve() != models.resolve():
            problems.append(f"models/{name}: file {manifest.file!r} must sit beside the manifest in models/")
            continue
        named.add(model.name)
        found.append((f"models/{name}", file))
    for name, file in files.items():
        if file.suffix in MODEL_SUFFIXES:
            continue
        if name not in named:
            problems.append(f"models/{name}: no manifest in models/ names it")
            continue
        found.append((f"models/{name}", file))
    return sorted(found, key=lambda item: item[0])


def _digest(source: bytes | Path) -> tuple[int, str]:
    if isinstance(source, bytes):
        return len(source), hashlib.sha256(source).hexdigest()
    with source.open("rb") as handle:
        return source.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest()


def manifest_body(
    items: list[tuple[str, bytes | Path]],
    *,
    version: int,
    targets: list[str],
    min_agent_version: str,
    ttl: float,
    now: datetime | None = None,
    health_window: float | None = None,
) -> tuple[dict[str, Any], list[FileEntry]]:
    """The signed body: the envelope's fields and the list of files (``ValueError`` naming a bad field)."""
    entries = [FileEntry(path, *_digest(source)) for path, source in items]
    fields = body_fields(
        version=version,
        targets=targets,
        min_agent_version=min_agent_version,
        files=entries,
        health_window=health_window,
    )
    return make_body(target=targets[0], ttl=ttl, fields=fields, now=now), entries


def envelope(body: dict[str, Any], key: Ed25519PrivateKey | None, key_id: str) -> bytes:
    """The manifest's envelope; unsigned (an empty ``signatures``) without a key, for ``bundle sign`` later."""
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return _wrap(raw, [] if key is None else [_signature(raw, key, key_id)])


def _signature(raw: bytes, key: Ed25519PrivateKey, key_id: str) -> dict[str, str]:
    return {"keyid": key_id, "sig": base64.b64encode(key.sign(pae(BUNDLE_TYPE, raw))).decode("ascii")}


def _wrap(raw: bytes, signatures: list[dict[str, str]]) -> bytes:
    doc = {"payloadType": BUNDLE_TYPE, "payload": base64.b64encode(raw).decode("ascii"), "signatures": signatures}
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"the manifest is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} a gateway accepts")
    return data


def write_bundle(out: Path, signed: bytes, items: list[tuple[str, bytes | Path]], *, force: bool) -> int:
    """Write the bundle file (0644: signed, not secret); returns its size. Never over ``out`` without ``force``."""
    with _replacing(out, force=force) as stream:
        archive = writer(stream)
        add(archive, MANIFEST_NAME, io.BytesIO(signed), len(signed))
        for path, source in items:
            if isinstance(source, bytes):
                add(archive, path, io.BytesIO(source), len(source))
            else:
                with source.open("rb") as handle:
                    add(archive, path, handle, source.stat().st_size)
        archive.close()
    return out.stat().st_size


def sign_file(path: Path, out: Path, key: Ed25519PrivateKey, key_id: str, *, force: bool) -> dict[str, Any]:
    """Add a signature to the bundle's manifest (the rest copied byte for byte); returns the signed body.

    Raises:
        ValueError: not a bundle, or a manifest that is not an envelope of a bundle.
    """
    from agent.fleet.bundles.manifest import peek

    with path.open("rb") as stream:
        first = next(members(stream), None)
        if first is None or first[0].path != MANIFEST_NAME or first[0].size > MAX_ENVELOPE_BYTES:
            raise ValueError(f"{path}: not a bundle (its first member must be {MANIFEST_NAME})")
        data = first[1].read()
        rest_at = BLOCK + -(-first[0].size // BLOCK) * BLOCK
    doc = json.loads(data)
    body = peek(data)
    if body is None or doc.get("payloadType") != BUNDLE_TYPE:
        raise ValueError(f"{path}: {MANIFEST_NAME} is not a bundle manifest envelope")
    raw = base64.b64decode(doc["payload"])  # signed as it is: the body is never re-serialised
    kept = [s for s in doc.get("signatures") or [] if isinstance(s, dict) and s.get("keyid") != key_id]
    signed = _wrap(raw, [*kept, _signature(raw, key, key_id)])
    same = out.resolve() == path.resolve()
    with _replacing(out, force=force or same) as stream, path.open("rb") as source:
        stream.write(header(MANIFEST_NAME, len(signed)) + signed + bytes(-len(signed) % BLOCK))
        source.seek(rest_at)  # the members after the manifest, and the end blocks, unchanged
        while chunk := source.read(1024 * 1024):
            stream.write(chunk)
    return body


@contextmanager
def _replacing(out: Path, *, force: bool) -> Iterator[BinaryIO]:
    if out.exists() and not force:
        raise ValueError(f"{out} exists; not overwriting it (--force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), 0o644)
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, out)  # never a half-written bundle under the name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
