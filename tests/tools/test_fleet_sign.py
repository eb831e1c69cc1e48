"""``edge-agent fleet sign``: a site file's sections as a signed config document a gateway verifies,
and every refusal named before anything is written."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.envelope import CONFIG_TYPE, MAX_ENVELOPE_BYTES, Refused, TrustedKey, verify
from agent.fleet.keys import generate_key
from agent.fleet.nonces import NonceStore
from agent.tools.fleet import fleet_main
from tests.conftest import ROOT

SITE = """\
gateway: {id: gw-017, site: lab}
uplink:
  mqtt: {host: 127.0.0.1, port: 1883, topic_prefix: ioc/v1, tls: {ca_file: certs/ca.pem}}
buffer: {path: ./buffer.db, max_bytes: 64MiB}
x-meter: &meter {driver: virtual, kind: meter}
devices:
  - {<<: *meter, id: meter-1, interval: 1s}
  - {<<: *meter, id: meter-2, interval: 500ms}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    pem, public, key_id = generate_key()
    (tmp_path / "ops.pem").write_bytes(pem)
    (tmp_path / "ops.pem").chmod(0o600)
    (tmp_path / "ops.pub").write_text(f"{key_id} {public}")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("not checked by sign\n")
    (tmp_path / "site.yaml").write_text(SITE)
    return tmp_path


def _sign(folder: Path, *extra: str, site: str = "site.yaml", out: str = "doc.json") -> list[str]:
    return [
        "sign",
        str(folder / site),
        "--key",
        str(folder / "ops.pem"),
        "--version",
        "42",
        "--target",
        "gw-017",
        "--out",
        str(folder / out),
        *extra,
    ]


def _keys(folder: Path, scopes: list[str]) -> dict[str, TrustedKey]:
    key_id, public = (folder / "ops.pub").read_text().split()
    return {key_id: TrustedKey.from_text(key_id, public, scopes)}


def _verify(folder: Path, data: bytes, *, gateway: str = "gw-017", scopes: list[str] | None = None) -> dict[str, Any]:
    keys = _keys(folder, scopes or ["config"])
    checked = verify(
        data,
        payload_type=CONFIG_TYPE,
        scope="config",
        keys=keys,
        gateway=gateway,
        groups=frozenset({"north"}),
        nonces=NonceStore(None),
    )
    return checked.body


def test_a_signed_site_file_verifies_as_config_and_holds_its_sections(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet_main([*_sign(folder), "--json", "--health-window", "300", "--require-new-devices"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = folder / "doc.json"
    assert out.stat().st_mode & 0o777 == 0o644  # public: signed, not secret
    body = _verify(folder, out.read_bytes())
    # Merge keys folded in, the order and spelling as written; uplink and fleet only when named.
    assert body["sections"] == {
        "devices": [
            {"driver": "virtual", "kind": "meter", "id": "meter-1", "interval": "1s"},
            {"driver": "virtual", "kind": "meter", "id": "meter-2", "interval": "500ms"},
        ]
    }
    assert (body["version"], body["target"], body["health_window"], body["require_new_devices"]) == (
        42,
        "gw-017",
        300,
        True,
    )
    issued, expires = (datetime.fromisoformat(body[k]) for k in ("issued_at", "expires_at"))
    assert expires - issued == timedelta(days=7)  # the default --ttl
    canonical = json.dumps(body["sections"], sort_keys=True, separators=(",", ":")).encode()
    assert summary == {
        "out": str(out),
        "version": 42,
        "target": "gw-017",
        "hash": "sha256:" + hashlib.sha256(canonical).hexdigest(),
        "sections": ["devices"],
        "expires_at": body["expires_at"],
    }
    # A key without the config scope may not sign it, and another gateway is not its target.
    with pytest.raises(Refused, match="scope"):
        _verify(folder, out.read_bytes(), scopes=["read", "write"])
    with pytest.raises(Refused, match="wrong_target"):
        _verify(folder, out.read_bytes(), gateway="gw-018")


def test_named_sections_for_a_group_keep_relative_paths_as_written(folder: Path) -> None:
    extra = ["--sections", "uplink,devices", "--ttl", "12h", "--force"]
    args = _sign(folder, *extra)
    args[args.index("--target") + 1] = "group:north"
    (folder / "doc.json").write_text("an older document")
    assert fleet_main(args) == 0
    data = (folder / "doc.json").read_bytes()
    body = _verify(folder, data, gateway="gw-099")  # any gateway of the group
    assert list(body["sections"]) == ["uplink", "devices"]
    assert body["sections"]["uplink"]["mqtt"]["tls"] == {"ca_file": "certs/ca.pem"}  # the gateway resolves it
    assert body["target"] == "group:north" and body["health_window"] == 120 and body["require_new_devices"] is False
    issued, expires = (datetime.fromisoformat(body[k]) for k in ("issued_at", "expires_at"))
    assert expires - issued == timedelta(hours=12)
    assert not list(folder.glob(".doc.json.*"))  # the temporary file was renamed into place


def test_an_invalid_site_file_is_refused_with_its_line(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "bad.yaml").write_text(SITE.replace("interval: 500ms", "interval: often"))
    assert fleet_main(_sign(folder, site="bad.yaml")) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'bad.yaml'}:8: devices[1].interval" in err, err
    assert not (folder / "doc.json").exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--sections", "gateway"], "'gateway' is the local site file's own"),
        (["--sections", "devices,buffer"], "'buffer' is the local site file's own"),
        (["--sections", "plugins"], "unknown section 'plugins'"),
        (["--sections", "priorities"], "no top-level priorities section"),
        (["--ttl", "31d"], "--ttl '31d': from 1 s to 30d"),
        (["--ttl", "soon"], "--ttl 'soon': a number of seconds or a duration"),
        (["--health-window", "5"], "--health-window 5: 10 to 3600"),
        (["--version", "0"], "--version 0: an integer >= 1"),
        (["--target", "gw-1..gw-3"], "one gateway id or group:<name>"),
        (["--target", "group:North"], "a group name is lowercase"),
    ],
)
def test_bad_options_are_named(folder: Path, capsys: pytest.CaptureFixture[str], extra: list[str], said: str) -> None:
    assert fleet_main(_sign(folder, *extra)) == 2
    assert said in capsys.readouterr().err
    assert not (folder / "doc.json").exists()


def test_over_256_kib_is_refused_saying_by_how_much(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    devices = "".join(f"  - {{driver: virtual, kind: meter, id: meter-{i:05d}, interval: 1s}}\n" for i in range(3200))
    (folder / "big.yaml").write_text(SITE.split("devices:")[0] + "devices:\n" + devices)
    assert (folder / "big.yaml").stat().st_size < 1024 * 1024  # a valid site file, too big to push whole
    assert fleet_main(_sign(folder, site="big.yaml")) == 2
    err = capsys.readouterr().err
    over = err.split("bytes, ")[1].split(" over")[0]
    size = int(err.split("would be ")[1].split(" bytes")[0])
    assert int(over) == size - MAX_ENVELOPE_BYTES > 0, err
    assert not (folder / "doc.json").exists()


def test_a_key_others_can_read_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "ops.pem").chmod(0o644)
    assert fleet_main(_sign(folder)) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert not (folder / "doc.json").exists()


def test_an_existing_out_file_is_kept(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "doc.json").write_text("keep me")
    assert fleet_main(_sign(folder)) == 2
    assert "exists; not overwriting it (--force" in capsys.readouterr().err
    assert (folder / "doc.json").read_text() == "keep me"


def test_sign_is_offline_and_loads_no_mqtt_client(folder: Path) -> None:
    probe = (
        "import sys; from agent.tools.fleet import fleet_main;"
        f"code = fleet_main({_sign(folder, '--sections', 'devices')!r});"
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] == 'paho'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
    payload = json.loads((folder / "doc.json").read_bytes())["payload"]
    assert json.loads(base64.b64decode(payload))["version"] == 42
