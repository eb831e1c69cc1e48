"""`edge-agent fleet push-bundle` end to end: a real broker killed mid-transfer, two real agents, one
offline during the push; both end applied (once) with the bundle's config and profile in use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import AgentProcess, Mosquitto, wait_for
from tests.fleet.bundle_agents import Follower, site, source
from tests.fleet.bundle_kit import Keys, build

REPO = Path(__file__).resolve().parents[2]


def test_push_resumes_after_the_broker_dies_and_reaches_a_gateway_that_was_offline(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    keys = Keys()
    configs = {gw: site(tmp_path / gw, gw, broker.port, keys) for gw in ("gw-a", "gw-b")}
    follower = Follower(broker.port, list(configs))
    agents: list[AgentProcess] = []
    push: subprocess.Popen[bytes] | None = None
    try:
        agents.append(AgentProcess(configs["gw-a"], tmp_path / "gw-a.log").start())
        follower.wait("gw-a", "reported", 30, status="applied")
        src = source(tmp_path / "src", model=os.urandom(600_000))  # ~600 kB: 2 s at the rate below
        bundle = build(src, tmp_path / "site.bundle", version=9, key=keys.ops, targets=("group:north",),
                       health_window=1)  # fmt: skip
        push = subprocess.Popen(
            [sys.executable, "-m", "agent", "fleet", "push-bundle", str(bundle), "--to", "gw-a,gw-b",
             "--rate", "300000", "--port", str(broker.port), "--wait", "90", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        # Half-way through gw-a's transfer the broker dies (SIGKILL: nothing saved since its last autosave).
        transfers = tmp_path / "gw-a" / "fleet" / "bundles" / "transfers"
        wait_for(lambda: sum(p.stat().st_size for p in transfers.glob("*.part")) >= 200_000, 30, "gw-a a third in")
        broker.stop(signal.SIGKILL)
        broker.start()
        agents.append(AgentProcess(configs["gw-b"], tmp_path / "gw-b.log").start())  # it was offline until now
        out, err = push.communicate(timeout=90)
        assert push.returncode == 0, (out, err.decode())
        result = json.loads(out)
        assert [g["status"] for g in result["gateways"]] == ["applied", "applied"], result
        assert result["gateways"][0]["asks"] >= 2  # gw-a asked again after the broker came back: resumed
        for gw in ("gw-a", "gw-b"):
            reported = follower.wait(gw, "reported", 15, version=9, status="applied")
            assert reported["running"]["version"] == 9
            log = (tmp_path / f"{gw}.log").read_text()
            assert log.count("bundle version 9 applied") == 1, gw  # applied once
            wait_for(lambda gw=gw: "bundles/current/profiles/site-meter.yaml" in json.dumps(
                follower.of(gw, "inventory")[-1:]), 15, f"{gw}'s inventory naming the bundle's profile")  # fmt: skip
        # The transfer resumed: gw-a fetched far less than two copies.
        assert result["gateways"][0]["sent"] < 2 * bundle.stat().st_size
        assert not list(transfers.glob("*.part"))
        assert (tmp_path / "gw-a" / "fleet" / "bundles").stat().st_mode & 0o777 == 0o700
        # An older one is refused from its offer, before a byte is fetched: exit 1, the reason named.
        older = build(src, tmp_path / "older.bundle", version=8, key=keys.ops, targets=("gw-a",), health_window=1)
        refused = subprocess.run(
            [sys.executable, "-m", "agent", "fleet", "push-bundle", str(older), "--to", "gw-a",
             "--port", str(broker.port), "--wait", "30", "--json"],
            capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
        )  # fmt: skip
        row = json.loads(refused.stdout)["gateways"][0]
        assert refused.returncode == 1 and row["status"] == "refused" and row["sent"] == 0, row
        assert "version 8 older than installed 9" in row["reason"], row
    finally:
        if push is not None and push.poll() is None:
            push.kill()
        for agent in agents:
            agent.kill()
        follower.close()
        broker.stop()
