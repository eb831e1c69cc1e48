"""The store's staged apply under failure: a full disk mid-apply, rollback, keep three.

`kill -9` at random moments of an apply: tests/fleet/test_bundle_crash.py (the store and the config together,
in the order the agent runs them).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.fleet.bundles.staging import DiskFull
from agent.fleet.bundles.store import BundleStore
from tests.fleet.bundle_kit import Keys, build, checker, copy_source, installed, snapshot, source, write_model


def committed_intact(store: BundleStore, versions: tuple[int, ...]) -> int:
    """The committed version after recovery; its files match its manifest and ``current`` points at it."""
    store.recover()
    state = store.state()
    assert state.pending is None
    running = store.current()
    assert running is not None
    assert running[0] == state.highest and running[0] in versions
    assert store.check_installed(running[0]) == []
    assert not (store.root / "staging").exists()
    return running[0]


def test_disk_full_during_apply_leaves_the_previous_bundle(small_volume: Path, tmp_path: Path) -> None:
    keys = Keys()
    src = source(tmp_path / "src")
    store = BundleStore(small_volume / "fleet" / "bundles")
    installed(store, src, tmp_path / "v1.bundle", keys, 1)
    buffer = small_volume / "buffer.db"  # stands for the events' buffer beside the bundles
    buffer.write_bytes(os.urandom(1024 * 1024))
    buffered = buffer.read_bytes()
    big = copy_source(src, tmp_path / "big")
    write_model(big, os.urandom(6 * 1024 * 1024))
    write_model(big, os.urandom(6 * 1024 * 1024), name="second")
    bundle = build(big, tmp_path / "v2.bundle", version=2, key=keys.ops)
    before = snapshot(store.root)
    filler = small_volume / "someone-else"

    filled: list[int | None] = []

    def fill(path: str) -> None:  # another writer takes the room once the first file is in
        if filler.exists():
            return
        try:
            with filler.open("wb") as handle:
                while True:
                    handle.write(bytes(1024 * 1024))
                    handle.flush()
        except OSError as exc:
            filled.append(exc.errno)

    with pytest.raises(DiskFull) as caught:
        store.stage(bundle, checker(keys), reserve_bytes=0, progress=fill)
    assert "the disk is full" in str(caught.value) and "cannot unpack " in str(caught.value)
    assert filled == [errno.ENOSPC]
    filler.unlink()
    store.recover()
    assert snapshot(store.root) == before
    assert buffer.read_bytes() == buffered
    assert committed_intact(store, (1,)) == 1


def test_too_big_for_the_disk_is_refused_first(small_volume: Path, tmp_path: Path) -> None:
    keys = Keys()
    big = source(tmp_path / "src", model=os.urandom(20 * 1024 * 1024))
    store = BundleStore(small_volume / "fleet" / "bundles")
    bundle = build(big, tmp_path / "v1.bundle", version=1, key=keys.ops)
    with pytest.raises(Exception, match="must stay free for the buffer") as caught:
        store.stage(bundle, checker(keys))
    assert getattr(caught.value, "code", None) == "no_space"
    assert store.current() is None and not any((small_volume / "fleet" / "bundles").glob("v*"))


def test_rollback_returns_to_the_previous_and_never_retries(tmp_path: Path) -> None:
    keys = Keys()
    src = source(tmp_path / "src")
    store = BundleStore(tmp_path / "state")
    installed(store, src, tmp_path / "v1.bundle", keys, 1)
    newer = copy_source(src, tmp_path / "newer")
    write_model(newer, b"model two")
    bundle = build(newer, tmp_path / "v2.bundle", version=2, key=keys.ops)
    store.switch(store.stage(bundle, checker(keys)))
    assert store.current()[0] == 2
    assert (store.root / "current" / "models" / "tiny.onnx").read_bytes() == b"model two"
    assert store.rollback("health check failed") == 2
    assert store.current()[0] == 1 and store.check_installed(1) == []
    assert not (store.root / "v0000000002").exists()
    with pytest.raises(Exception, match="version 2 was rolled back"):
        store.stage(bundle, checker(keys))


def test_keeps_three(tmp_path: Path) -> None:
    keys = Keys()
    src = source(tmp_path / "src")
    store = BundleStore(tmp_path / "state")
    for version in range(1, 6):
        write_model(src, f"model {version}".encode())
        installed(store, src, tmp_path / f"v{version}.bundle", keys, version)
    assert sorted(p.name for p in store.root.glob("v*")) == ["v0000000003", "v0000000004", "v0000000005"]
    assert store.state().installed == [3, 4, 5] and store.current()[0] == 5
