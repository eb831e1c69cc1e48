"""The operator's whole loop against real agents: ``fleet keygen``, ``fleet push-config`` to three
gateways, ``fleet status``, each a process, through one real Mosquitto.

The CLI and the gateways were built apart against docs/fleet.md; this is where they meet. Every
gateway must report the pushed version applied, ``status`` must show it, and the unchanged
device's sequence must arrive without a gap on every gateway.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, AgentProcess, Mosquitto, wait_for, write_config

GATEWAYS = ("gw-001", "gw-002", "gw-003")
METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
NEW = "  - {id: meter-2, driver: virtual, kind: meter, interval: 100ms}\n"


def _cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args], capture_output=True, text=True, cwd=ROOT,
        timeout=timeout, check=False,
    )  # fmt: skip


def _seqs(sub: Any, gateway: str, device: str) -> list[int]:
    """The seqs of one gateway's device (the topic names the gateway: ioc/v1/{gw}/{device}/...)."""
    with sub.lock:
        pairs = list(zip(sub.topics, sub.events, strict=True))
    return [e["seq"] for topic, e in pairs if topic.split("/")[2] == gateway and e.get("device") == device]


def _site(folder: Path, gateway: str, port: int, key: dict[str, Any], devices: str) -> Path:
    folder.mkdir()
    fleet = {"enabled": True, "clock": "trusted", "keys": [{k: key[k] for k in ("id", "public_key", "scopes")}]}
    path = write_config(folder / "site.yaml", port=port, devices=devices, extra=f"fleet: {json.dumps(fleet)}\n")
    path.write_text(path.read_text().replace("gw-test", gateway))
    return path


def test_push_config_reaches_every_gateway_and_status_shows_it(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    made = _cli("keygen", "--out", str(tmp_path / "ops.pem"), "--scopes", "config", "read", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    sub = subscriber_factory(broker.port, "ioc/v1/#")
    agents: list[AgentProcess] = [agent_factory(_site(tmp_path / gw, gw, broker.port, key, METER)) for gw in GATEWAYS]
    wait_for(lambda: all(_seqs(sub, gw, "meter-1") for gw in GATEWAYS), 30, "events from every gateway")
    # The new site file (for the operator's machine): one more meter on each gateway.
    site_b = _site(tmp_path / "operator", "gw-001", broker.port, key, METER + NEW)

    pushed = _cli(
        "push-config", str(site_b), "--to", "gw-001..gw-003", "--key", str(tmp_path / "ops.pem"),
        "--key-id", key["id"], "--version", "7", "--health-window", "10", "--port", str(broker.port),
        "--wait", "60", "--json",
    )  # fmt: skip
    assert pushed.returncode == 0, (pushed.stdout, pushed.stderr, [a.output()[-3000:] for a in agents])
    result = json.loads(pushed.stdout)
    assert {gw: row["status"] for gw, row in result["gateways"].items()} == dict.fromkeys(GATEWAYS, "applied")
    assert result["summary"]["applied"] == 3

    shown = _cli("status", "--to", "gw-001..gw-003", "--port", str(broker.port), "--json", timeout=30)
    assert shown.returncode == 0, (shown.stdout, shown.stderr)
    rows = {row["gateway"]: row for row in json.loads(shown.stdout)}
    for gw in GATEWAYS:
        assert (rows[gw]["availability"], rows[gw]["config_version"], rows[gw]["config_status"]) == (
            "online",
            7,
            "applied",
        ), rows[gw]
        assert rows[gw]["agent_version"], rows[gw]  # the inventory is there too

    wait_for(lambda: all(_seqs(sub, gw, "meter-2") for gw in GATEWAYS), 20, "the new meter on every gateway")
    for agent in agents:
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
    for gw in GATEWAYS:
        seqs = _seqs(sub, gw, "meter-1")
        assert seqs and set(seqs) == set(range(1, max(seqs) + 1)), f"{gw}: a gap in meter-1"
