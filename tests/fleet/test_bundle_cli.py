"""`edge-agent bundle build|sign|inspect|apply` as real processes, on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fleet.bundle_kit import key_file, snapshot, source, write_model


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "bundle", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def site(tmp: Path, public: str, scopes: str = "[bundle]") -> Path:
    path = tmp / "site.yaml"
    path.write_text(
        "gateway: {id: gw-test}\n"
        f"buffer: {{path: {tmp / 'var' / 'buffer.db'}}}\n"
        "devices:\n  - {id: meter-1, driver: virtual, kind: meter, interval: 1s}\n"
        f"fleet:\n  groups: [north]\n  keys:\n    - {{id: ops, public_key: '{public}', scopes: {scopes}}}\n"
    )
    return path


def test_build_sign_inspect_apply(tmp_path: Path) -> None:
    key, public = key_file(tmp_path)
    src = source(tmp_path / "src")
    out = tmp_path / "site-1.bundle"
    built = run("build", src, "--version", "1", "--target", "group:north", "--out", out, "--json")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["signed"] is False
    assert [f["path"] for f in summary["files"]] == [
        "config.json",
        "profiles/site-meter.yaml",
        "models/tiny.onnx",
        "models/tiny.yaml",
    ]
    gateway = site(tmp_path, public)
    unsigned = run("inspect", out, "-c", gateway, "--json")
    assert unsigned.returncode == 1
    assert json.loads(unsigned.stdout)["codes"] == ["unsigned"]
    signed = run("sign", out, "--key", key, "--key-id", "ops")
    assert signed.returncode == 0, signed.stderr
    report = run("inspect", out, "-c", gateway, "--json")
    assert report.returncode == 0, report.stdout
    doc = json.loads(report.stdout)
    assert doc["verified"] and doc["signed_by"] == "ops" and doc["version"] == 1
    assert all(f["ok"] for f in doc["files"])

    dry = run("apply", out, "-c", gateway, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert json.loads(dry.stdout)["status"] == "would_apply"
    assert not (tmp_path / "var" / "fleet" / "bundles" / "current").exists()

    applied = run("apply", out, "-c", gateway)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "committed version 1" in applied.stdout and "added    models/tiny.onnx" in applied.stdout
    current = tmp_path / "var" / "fleet" / "bundles" / "current"
    assert (current / "models" / "tiny.onnx").read_bytes() == (src / "models" / "tiny.onnx").read_bytes()

    again = run("apply", out, "-c", gateway)
    assert again.returncode == 1 and "version 1 is already installed" in again.stderr


def test_inspect_names_every_problem(tmp_path: Path) -> None:
    key, public = key_file(tmp_path)
    src = source(tmp_path / "src")
    out = tmp_path / "b.bundle"
    assert run("build", src, "--version", "3", "--target", "gw-test", "--out", out, "--key", key).returncode == 0
    data = bytearray(out.read_bytes())
    for marker in (b"onnx-bytes", b"profile: site-meter"):
        at = data.index(marker, 2048)
        data[at] ^= 0x20  # one bit flipped inside each file's data
    out.write_bytes(bytes(data))
    report = run("inspect", out, "--public-key", public)
    assert report.returncode == 1
    assert "problem: models/tiny.onnx: sha256 mismatch" in report.stdout
    assert "problem: profiles/site-meter.yaml: sha256 mismatch" in report.stdout
    assert "signature: verified" in report.stdout


def test_build_refuses_a_broken_folder(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    (src / "config.yaml").write_text(
        "gateway: {id: gw-any}\ndevices:\n  - {id: meter-1, driver: modbus, transport: tcp, host: h, port: 99999,"
        " profile: site-meter}\n"
    )
    write_model(src, b"new model")
    (src / "models" / "tiny.onnx").write_bytes(b"replaced after the manifest was written")
    (src / "notes.txt").write_text("hello")
    (src / "models" / "orphan.onnx").write_bytes(b"?")
    out = tmp_path / "b.bundle"
    result = run("build", src, "--version", "1", "--target", "gw-test", "--out", out)
    assert result.returncode == 2
    assert "devices[0].port" in result.stderr
    assert "models/tiny.yaml" in result.stderr and "sha256 mismatch" in result.stderr
    assert "notes.txt: unexpected file" in result.stderr
    assert "models/orphan.onnx: no manifest in models/ names it" in result.stderr
    assert not out.exists()


def test_apply_refusal_changes_nothing(tmp_path: Path) -> None:
    key, public = key_file(tmp_path)
    gateway = site(tmp_path, public, scopes="[config]")
    src = source(tmp_path / "src")
    out = tmp_path / "b.bundle"
    signing = ("--key", key, "--key-id", "ops")
    assert run("build", src, "--version", "2", "--target", "gw-test", "--out", out, *signing).returncode == 0
    no_scope = run("apply", out, "-c", gateway)
    assert no_scope.returncode == 2 and "no key with scope bundle" in no_scope.stderr
    gateway = site(tmp_path, public)
    assert run("apply", out, "-c", gateway).returncode == 0
    root = tmp_path / "var" / "fleet" / "bundles"
    before = snapshot(root)
    other = tmp_path / "o.bundle"
    assert run("build", src, "--version", "3", "--target", "gw-x", "--out", other, *signing).returncode == 0
    wrong = run("apply", other, "-c", gateway, "--json")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["code"] == "wrong_target"
    assert snapshot(root) == before
