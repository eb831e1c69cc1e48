"""The diagnostics bundle's parts on the gateway's disk, and what its redaction removes (real files)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

from agent.config.model import load_config
from agent.fleet.bundle import KEEP_SECONDS, MAX_BUNDLE, PART_SIZE, BundleStore
from agent.fleet.redact import Scrubber, _masked
from agent.observability.logs import REDACTED


def test_a_bundle_is_kept_in_parts_for_ten_minutes_two_at_most(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "fleet" / "diagnostics")
    members = {"logs.txt": os.urandom(200_000), "b.json": b"{}"}  # incompressible: several parts
    first = store.write(members, now=1000.0)
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    content = b"".join(store.part(first.id, i, now=1000.0) or b"" for i in range(first.parts))
    assert len(content) == first.size and hashlib.sha256(content).hexdigest() == first.sha256
    assert first.parts == -(-first.size // PART_SIZE) > 1
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == [f"{first.id}/b.json", f"{first.id}/logs.txt"]
    assert store.part(first.id, first.parts, now=1000.0) == b""  # past the end
    assert store.part("../../etc/passwd", 0, now=1000.0) is None  # ids are names, never paths

    second = store.write(members, now=1001.0)
    third = store.write(members, now=1002.0)
    kept = sorted(p.name for p in store.folder.iterdir())
    assert kept == sorted(f"{b.id}.tar.gz" for b in (second, third))  # the oldest went
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in store.folder.iterdir())
    assert store.part(first.id, 0, now=1002.0) is None
    # Ten minutes after it was written (by the file's clock), a bundle is gone.
    mtime = (store.folder / f"{third.id}.tar.gz").stat().st_mtime
    assert store.part(third.id, 0, now=mtime + KEEP_SECONDS - 1) is not None
    assert store.part(third.id, 0, now=mtime + KEEP_SECONDS + 1) is None
    assert list(store.folder.iterdir()) == []
    assert first.size < MAX_BUNDLE


def test_secrets_are_removed_by_name_and_by_value(tmp_path: Path) -> None:
    password, users = tmp_path / "mqtt.pw", tmp_path / "opc.users"
    password.write_text("broker-secret-1234\n")
    users.write_text("# operators\nalice:alice-secret-5678\n")
    for f in (password, users):
        f.chmod(0o600)
    site = tmp_path / "site.yaml"
    site.write_text(
        "gateway: {id: gw-1}\n"
        f"uplink:\n  mqtt: {{host: 127.0.0.1, username: gw, password_file: {password}}}\n"
        f"  opcua: {{enabled: false, users_file: {users}}}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\n"
        "devices: []\n"
    )
    scrubber = Scrubber(load_config(site))
    text = scrubber.text("connect with broker-secret-1234; user alice-secret-5678; rtsp://cam:hunter22@10.0.0.5/")
    assert "broker-secret-1234" not in text and "alice-secret-5678" not in text and "hunter22" not in text, text
    dumped = scrubber.config(load_config(site))
    assert str(password) in dumped and str(users) in dumped  # where the secrets are, not what they are
    assert "secret-1234" not in dumped and "secret-5678" not in dumped
    json.loads(dumped)
    masked = _masked({"password": "x1", "password_file": "/p", "a": [{"api_key": "k", "token": None}]}, {"/p"})
    assert masked == {"password": REDACTED, "password_file": "/p", "a": [{"api_key": REDACTED, "token": None}]}
