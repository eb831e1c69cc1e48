"""Running agents for the bundle tests: a site file per gateway, a bundle source folder, the bundle status followed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.keys import public_text
from tests.conftest import wait_for
from tests.fleet.bundle_kit import ROOT, Keys, write_model

ROOT_TOPIC = "fleet/v1"


def site(folder: Path, gateway: str, port: int, keys: Keys) -> Path:
    """A site file: the fleet channel on, keys ``ops`` (bundle) and ``cfg`` (config, keys), a virtual meter."""
    folder.mkdir(parents=True, exist_ok=True)
    fleet = {
        "enabled": True,
        "clock": "trusted",
        "groups": ["north"],
        "keys": [
            {"id": "ops", "public_key": public_text(keys.ops.public_key()), "scopes": ["bundle"]},
            {"id": "cfg", "public_key": public_text(keys.cfg.public_key()), "scopes": ["config", "keys"]},
        ],
    }
    path = folder / "site.yaml"
    path.write_text(
        f"gateway: {{id: {gateway}, site: lab, health_interval: 60s}}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1, keepalive: 5s,"
        " reconnect_min: 200ms, reconnect_max: 1s}\n"
        f"buffer: {{path: {folder / 'buffer.db'}, max_bytes: 64MiB}}\n"
        f"fleet: {json.dumps(fleet)}\n"
        "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms}\n"
    )
    return path


def source(folder: Path, *, interval: str = "100ms", model: bytes = b"\x01weights\x02" * 64) -> Path:
    """A bundle folder: config.yaml (meter-1 faster, a Modbus meter on the bundle's profile), the profile, a model."""
    (folder / "profiles").mkdir(parents=True)
    (folder / "models").mkdir()
    profile = yaml.safe_load((ROOT / "config/profiles/eastron-sdm630.yaml").read_text())
    profile["profile"] = "site-meter"
    (folder / "profiles/site-meter.yaml").write_text(yaml.safe_dump(profile))
    write_model(folder, model)
    (folder / "config.yaml").write_text(
        "gateway: {id: gw-any}\n"
        "devices:\n"
        f"  - {{id: meter-1, driver: virtual, kind: meter, interval: {interval}}}\n"
        "  - {id: meter-9, driver: modbus, transport: tcp, host: 127.0.0.1, port: 9, unit: 1, profile: site-meter}\n"
    )
    return folder


class Follower:
    """Follows gateways' bundle status, reported config and inventory (retained) on a plain broker."""

    def __init__(self, port: int, gateways: list[str]) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._topics = [t for gw in gateways for t in (f"{ROOT_TOPIC}/{gw}/bundle/status",
                        f"{ROOT_TOPIC}/{gw}/reported", f"ioc/v1/{gw}/inventory")]  # fmt: skip
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"follower-{time.monotonic_ns()}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._ready.wait(10)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        client.subscribe([(t, 1) for t in self._topics])
        self._ready.set()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        if message.payload:
            with self._lock:
                self.docs.append((message.topic, json.loads(message.payload)))

    def of(self, gateway: str, kind: str) -> list[dict[str, Any]]:
        """``kind``: bundle, reported or inventory."""
        suffix = {"bundle": "/bundle/status", "reported": "/reported", "inventory": "/inventory"}[kind]
        with self._lock:
            return [d for t, d in self.docs if t.endswith(f"/{gateway}{suffix}")]

    def wait(self, gateway: str, kind: str, timeout: float, **expected: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((d for d in self.of(gateway, kind) if all(d.get(k) == v for k, v in expected.items())), None)

        try:
            return wait_for(found, timeout, f"{gateway} {kind} {expected}")  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"{gateway}: no {kind} with {expected}; last {self.of(gateway, kind)[-3:]}") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
