"""The nonce store: replays refused across restarts, a damaged file failing closed, files only we can read."""

from __future__ import annotations

import logging
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from agent.fleet.envelope import Refused
from agent.fleet.nonces import NonceStore
from tests.fleet.envelopes import NOW, body, later, signed
from tests.fleet.test_envelope import check


def test_a_replay_is_refused_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    data = signed()
    check(data, NonceStore(path))
    reopened = NonceStore(path, now=later(60))
    with pytest.raises(Refused) as refused:
        check(data, reopened, now=later(60))
    assert (refused.value.code, refused.value.field) == ("replayed", "payload.nonce")
    check(signed(), reopened, now=later(60))  # another document still passes


def test_a_nonce_is_forgotten_once_its_document_expired(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    store = NonceStore(path)
    assert store.seen_or_remember("a" * 32, later(10), NOW) is False
    assert store.seen_or_remember("a" * 32, later(10), later(9)) is True
    assert store.seen_or_remember("b" * 32, later(100), later(11)) is False
    assert len(store) == 1  # "a" pruned: its document can no longer pass the expiry check
    assert len(NonceStore(path, now=later(101))) == 0  # nor kept when loaded after expiry


def test_the_file_and_its_folder_are_ours_alone(tmp_path: Path) -> None:
    path = tmp_path / "state" / "fleet" / "nonces.json"
    store = NonceStore(path)
    store.seen_or_remember("a" * 32, later(10), NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["nonces.json"]  # no temporary file left


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b"{not json",
        b"[" * 100_000,
        b'{"version": 2, "nonces": {}}',
        b'{"version": 1, "floor": "soon", "nonces": {}}',
        b'{"version": 1, "floor": null, "nonces": {"abc": [1]}}',
        b'{"version": 1, "floor": null, "nonces": []}',
        b"\xff\xfe",
    ],
    ids=["empty", "not JSON", "deep", "version", "floor", "entry", "nonces", "not UTF-8"],
)
def test_a_damaged_file_is_replaced_and_refuses_what_was_issued_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    path = tmp_path / "nonces.json"
    path.write_bytes(damage)
    damaged_at = later(120)
    with caplog.at_level(logging.ERROR, logger="agent.fleet.nonces"):
        store = NonceStore(path, now=damaged_at)
    assert f"fleet nonce file {path} is damaged" in caplog.text
    assert store.floor == damaged_at
    # Issued before the damage: it may have been accepted, its nonce lost with the file.
    with pytest.raises(Refused) as refused:
        check(signed(), store, now=damaged_at)
    assert (refused.value.code, refused.value.field) == ("replayed", "payload.issued_at")
    check(signed(body(now=damaged_at)), store, now=damaged_at)  # issued since: accepted
    # The file was replaced, floor included: the next start neither complains nor forgets.
    caplog.clear()
    reopened = NonceStore(path, now=later(180))
    assert caplog.text == ""
    assert reopened.floor == damaged_at
    assert len(reopened) == 1


def test_beyond_its_limit_the_store_forgets_the_earliest_expiring_and_refuses_their_era() -> None:
    store = NonceStore(None, limit=3)
    for n, life in enumerate((400, 100, 300, 200)):
        issued = later(n)
        assert store.seen_or_remember(f"{n:032x}", later(life), NOW, issued_at=issued) is False
    assert len(store) == 3
    # Nonce 1 (expiring first, issued at +1 s) was dropped: the floor moved just past its issue time.
    assert store.below_floor(later(1))
    assert not store.below_floor(later(1) + timedelta(microseconds=1))
    assert store.seen_or_remember(f"{0:032x}", later(400), NOW) is True  # the others are still known


def test_an_unwritable_file_is_logged_and_the_store_works_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.ERROR, logger="agent.fleet.nonces"):
        store = NonceStore(blocker / "nonces.json")
        assert store.seen_or_remember("a" * 32, later(10), NOW) is False
    assert "cannot write the fleet nonce file" in caplog.text
    assert store.seen_or_remember("a" * 32, later(10), NOW) is True
