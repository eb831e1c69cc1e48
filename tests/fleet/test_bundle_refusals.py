"""Bad bundles are refused by name and change nothing: real files, real signatures, a real store folder."""

from __future__ import annotations

import io
import os
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError
from agent.fleet.bundles.store import BundleStore
from agent.fleet.bundles.tarball import BLOCK, members
from tests.fleet.bundle_kit import Keys, build, checker, installed, snapshot, source


@pytest.fixture
def setup(tmp_path: Path):
    keys = Keys()
    src = source(tmp_path / "src")
    store = BundleStore(tmp_path / "state" / "fleet" / "bundles")
    installed(store, src, tmp_path / "v5.bundle", keys, 5)
    return keys, src, store, tmp_path


def refused(store: BundleStore, bundle: Path, keys: Keys, code: str, text: str, gateway: str = "gw-test") -> None:
    before = snapshot(store.root)
    with pytest.raises(BundleError) as caught:
        store.stage(bundle, checker(keys, gateway))
    assert caught.value.code == code, caught.value
    assert text in str(caught.value)
    store.recover()
    assert snapshot(store.root) == before  # previous bundle, state, pointer: untouched
    assert store.current() is not None and store.current()[0] == 5
    assert store.check_installed(5) == []


def members_of(bundle: Path) -> list[tuple[str, bytes]]:
    with bundle.open("rb") as stream:
        return [(m.path, data.read()) for m, data in members(stream)]


def rewrite(bundle: Path, out: Path, items: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as archive:
        for item in items:
            if isinstance(item, tarfile.TarInfo):
                archive.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                archive.addfile(info, io.BytesIO(item[1]))
    return out


def test_a_tampered_model_is_named(setup) -> None:
    keys, src, store, tmp = setup
    bundle = build(src, tmp / "b.bundle", version=6, key=keys.ops)
    items = members_of(bundle)
    items = [(p, (b"X" + d[1:]) if p == "models/tiny.onnx" else d) for p, d in items]
    tampered = rewrite(bundle, tmp / "t.bundle", items)
    refused(store, tampered, keys, "sha256_mismatch", "models/tiny.onnx: sha256 mismatch")


def test_unsigned_wrong_key_and_key_without_scope(setup) -> None:
    keys, src, store, tmp = setup
    refused(store, build(src, tmp / "u.bundle", version=6, key=None), keys, "unsigned", "unsigned")
    wrong = build(src, tmp / "w.bundle", version=6, key=keys.stranger, key_id="ops")
    refused(store, wrong, keys, "bad_signature", "does not verify")
    unknown = build(src, tmp / "x.bundle", version=6, key=keys.stranger, key_id="nobody")
    refused(store, unknown, keys, "unknown_key", "not a trusted key")
    scope = build(src, tmp / "s.bundle", version=6, key=keys.cfg, key_id="cfg")
    refused(store, scope, keys, "scope", "may not sign for 'bundle'")


def test_older_and_same_version(setup) -> None:
    keys, src, store, tmp = setup
    older = build(src, tmp / "o.bundle", version=4, key=keys.ops)
    refused(store, older, keys, "stale", "version 4 older than installed 5")
    same = build(src, tmp / "e.bundle", version=5, key=keys.ops)
    refused(store, same, keys, "stale", "version 5 is already installed")


def test_expired_wrong_target_and_newer_agent(setup) -> None:
    keys, src, store, tmp = setup
    old = datetime.now(UTC) - timedelta(days=3)
    expired = build(src, tmp / "x.bundle", version=6, key=keys.ops, ttl=86400, now=old)
    refused(store, expired, keys, "expired", "payload.expires_at")
    other = build(src, tmp / "t.bundle", version=6, key=keys.ops, targets=("gw-other", "group:south"))
    refused(store, other, keys, "wrong_target", "name neither this gateway (gw-test)")
    group = build(src, tmp / "g.bundle", version=6, key=keys.ops, targets=("gw-other", "group:north"))
    staged = store.stage(group, checker(keys))  # one of its targets is our group: accepted
    assert staged.manifest.version == 6
    store.recover()
    future = build(src, tmp / "f.bundle", version=7, key=keys.ops, min_agent_version="99.0")
    refused(store, future, keys, "agent_too_old", "min_agent_version 99.0")


def test_truncated_at_several_points(setup) -> None:
    keys, src, store, tmp = setup
    data = build(src, tmp / "b.bundle", version=6, key=keys.ops).read_bytes()
    for cut in (100, BLOCK + 10, len(data) // 2, len(data) - 1024 * 10 - 1):
        short = tmp / f"cut{cut}.bundle"
        short.write_bytes(data[:cut])
        before = snapshot(store.root)
        with pytest.raises(BundleError) as caught:
            store.stage(short, checker(keys))
        assert caught.value.code in ("truncated", "missing"), caught.value
        store.recover()
        assert snapshot(store.root) == before


def test_traversal_symlink_device_and_size(setup) -> None:
    keys, src, store, tmp = setup
    bundle = build(src, tmp / "b.bundle", version=6, key=keys.ops)
    items = members_of(bundle)
    manifest = items[0]
    for name, kind, text in (
        ("../../etc/evil", tarfile.REGTYPE, "a path with '..'"),
        ("/etc/evil", tarfile.REGTYPE, "an absolute path"),
        ("models/link.onnx", tarfile.SYMTYPE, "models/link.onnx: a symbolic link"),
        ("models/hard.onnx", tarfile.LNKTYPE, "models/hard.onnx: a hard link"),
        ("models/dev", tarfile.CHRTYPE, "models/dev: a character device"),
        ("models/fifo", tarfile.FIFOTYPE, "models/fifo: a FIFO"),
    ):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        bad = rewrite(bundle, tmp / "bad.bundle", [manifest, info, *items[1:]])
        code = "unsafe_path" if kind == tarfile.REGTYPE else "unsafe_member"
        refused(store, bad, keys, code, text)
    assert not (tmp / "etc").exists()
    grown = [(p, d + b"!" if p == "profiles/site-meter.yaml" else d) for p, d in items]
    refused(store, rewrite(bundle, tmp / "g.bundle", grown), keys, "size_mismatch", "profiles/site-meter.yaml: ")
    extra = rewrite(bundle, tmp / "e.bundle", [*items, ("models/extra.onnx", b"x")])
    refused(store, extra, keys, "unlisted", "models/extra.onnx: not in the manifest")
    missing = rewrite(bundle, tmp / "m.bundle", items[:-1])
    refused(store, missing, keys, "missing", f"{items[-1][0]}: in the manifest, not in the bundle")
    first = rewrite(bundle, tmp / "f.bundle", [*items[1:], items[0]])
    refused(store, first, keys, "malformed", f"not the manifest {MANIFEST_NAME}")


def test_no_space_is_refused_before_writing(setup) -> None:
    keys, src, store, tmp = setup
    bundle = build(src, tmp / "b.bundle", version=6, key=keys.ops)
    vfs = os.statvfs(store.root)
    free = vfs.f_bavail * vfs.f_frsize
    before = snapshot(store.root)
    with pytest.raises(BundleError) as caught:
        store.stage(bundle, checker(keys), reserve_bytes=free)  # nothing left for the bundle beside the reserve
    assert caught.value.code == "no_space" and "must stay free for the buffer" in str(caught.value)
    store.recover()
    assert snapshot(store.root) == before
