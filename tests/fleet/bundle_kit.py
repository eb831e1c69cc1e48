"""What the bundle tests share: a source folder (config, a profile, a model), keys, a gateway site file,
bundles built and signed by the library, and a snapshot of a store folder to prove nothing changed."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.bundles.manifest import verify_manifest
from agent.fleet.bundles.store import BundleStore
from agent.fleet.envelope import TrustedKey
from agent.fleet.keys import generate_key, public_text
from agent.tools.bundle_build import collect, envelope, manifest_body, write_bundle

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = "gw-test"
GROUPS = frozenset({"north"})


@dataclass
class Keys:
    """``ops`` signs bundles, ``cfg`` only configs, ``stranger`` is trusted by nobody."""

    ops: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    cfg: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    stranger: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def trusted(self) -> dict[str, TrustedKey]:
        return {
            "ops": TrustedKey.from_text("ops", public_text(self.ops.public_key()), ["bundle"]),
            "cfg": TrustedKey.from_text("cfg", public_text(self.cfg.public_key()), ["config", "keys"]),
        }

    def site_lines(self) -> str:
        ops, cfg = public_text(self.ops.public_key()), public_text(self.cfg.public_key())
        return (
            "fleet:\n  groups: [north]\n  keys:\n"
            f"    - {{id: ops, public_key: '{ops}', scopes: [bundle]}}\n"
            f"    - {{id: cfg, public_key: '{cfg}', scopes: [config, keys]}}\n"
        )


def key_file(folder: Path) -> tuple[Path, str]:
    """A private key file (0600) as `fleet keygen` writes one, and its public text."""
    pem, public, _ = generate_key()
    path = folder / "signer.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    return path, public


def source(folder: Path, *, model: bytes = b"onnx-bytes" * 100, config: bool = True) -> Path:
    """A bundle folder: config.yaml (a modbus meter using the bundle's profile), the profile, a model."""
    (folder / "profiles").mkdir(parents=True)
    (folder / "models").mkdir()
    profile = yaml.safe_load((ROOT / "config/profiles/eastron-sdm630.yaml").read_text())
    profile["profile"] = "site-meter"
    (folder / "profiles/site-meter.yaml").write_text(yaml.safe_dump(profile))
    write_model(folder, model)
    if config:
        (folder / "config.yaml").write_text(
            "gateway: {id: gw-any}\n"
            "devices:\n"
            "  - {id: meter-1, driver: modbus, transport: tcp, host: 127.0.0.1, port: 5020, profile: site-meter}\n"
        )
    return folder


def write_model(folder: Path, model: bytes, name: str = "tiny") -> None:
    manifest = yaml.safe_load((ROOT / "models/centerface.yaml").read_text())
    manifest.update(file=f"{name}.onnx", sha256=hashlib.sha256(model).hexdigest(), size_bytes=len(model))
    (folder / "models" / f"{name}.onnx").write_bytes(model)
    (folder / "models" / f"{name}.yaml").write_text(yaml.safe_dump(manifest))


def build(
    folder: Path,
    out: Path,
    *,
    version: int,
    key: Ed25519PrivateKey | None,
    key_id: str = "ops",
    targets: tuple[str, ...] = (GATEWAY,),
    ttl: float = 86400,
    now: datetime | None = None,
    min_agent_version: str = "0.1.0",
    health_window: float | None = None,
) -> Path:
    """A bundle file built and signed as `bundle build --key` does."""
    items = collect(folder, None)
    body, _ = manifest_body(
        items, version=version, targets=list(targets), min_agent_version=min_agent_version, ttl=ttl, now=now,
        health_window=health_window,
    )  # fmt: skip
    write_bundle(out, envelope(body, key, key_id), items, force=True)
    return out


def checker(keys: Keys, gateway: str = GATEWAY):
    def check(data: bytes):
        return verify_manifest(data, keys=keys.trusted(), gateway=gateway, groups=GROUPS)

    return check


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a link's target, a folder's mark."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def installed(store: BundleStore, folder: Path, out: Path, keys: Keys, version: int) -> Path:
    """``store`` with a bundle of ``version`` committed; returns the bundle file."""
    build(folder, out, version=version, key=keys.ops)
    store.switch(store.stage(out, checker(keys)))
    store.commit()
    return out


def copy_source(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
