"""A running agent applies bundles handed over by `edge-agent bundle apply` (real broker, agent, CLI, files).

One agent for the module: every refusal (tampered, unsigned, wrong key, expired, wrong target,
truncated, older) is answered by the agent, named, reported on its bundle status topic, and leaves
the store, the config and the events as they were; a good bundle is applied through the reload
(its config on the remote config's version line, its profile in use), watched, committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.bundles.downgrade import make
from agent.fleet.bundles.inbox import agent_running, hand_over
from agent.fleet.bundles.store import BundleStore, bundles_dir
from tests.conftest import AgentProcess, Mosquitto, wait_for
from tests.fleet.bundle_agents import Follower, site, source
from tests.fleet.bundle_kit import Keys, build, snapshot

GATEWAY = "gw-test"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("bundle-agent")
    broker = Mosquitto(base)
    broker.start()
    keys = Keys()
    config = site(base / "gw", GATEWAY, broker.port, keys)
    follower = Follower(broker.port, [GATEWAY])
    agent = AgentProcess(config, base / "agent.log").start()
    try:
        store = BundleStore(bundles_dir(base / "gw"))
        wait_for(lambda: agent_running(store.root), 30, "the agent's inbox")
        follower.wait(GATEWAY, "reported", 30, status="applied")
        yield {"base": base, "keys": keys, "config": config, "store": store, "follower": follower, "agent": agent}
    finally:
        agent.kill()
        follower.close()
        broker.stop()


def _apply(config: Path, file: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "agent", "bundle", "apply", str(file), "-c", str(config), "--json", "--wait", "60"]
    return subprocess.Popen(
        [*command, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def _result(proc: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=90)
    assert out, err.decode()
    return proc.returncode, json.loads(out)


def _bad_bundles(rig: dict[str, Any], good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the refusal must say)."""
    base, keys = rig["base"], rig["keys"]
    src = base / "src"
    bad: dict[str, tuple[Path, str]] = {}
    data = good.read_bytes()
    tampered = base / "tampered.bundle"
    at = data.index(b"weights")  # a byte of the model changed: its hash no longer matches
    tampered.write_bytes(data[:at] + b"W" + data[at + 1 :])
    bad["tampered"] = (tampered, "models/tiny.onnx: sha256 mismatch")
    bad["unsigned"] = (build(src, base / "unsigned.bundle", version=6, key=None), "unsigned")
    bad["wrong key"] = (build(src, base / "stranger.bundle", version=6, key=keys.stranger, key_id="ops"), "signature")
    past = datetime.now(UTC) - timedelta(days=2)
    bad["expired"] = (build(src, base / "expired.bundle", version=6, key=keys.ops, now=past, ttl=3600), "expired")
    bad["wrong target"] = (
        build(src, base / "other.bundle", version=6, key=keys.ops, targets=("gw-other",)),
        "name neither this gateway",
    )
    truncated = base / "truncated.bundle"
    truncated.write_bytes(data[: at + 100])  # inside the model
    bad["truncated"] = (truncated, "ends")
    return bad


def test_refusals_change_nothing_and_a_good_bundle_applies_through_the_reload(rig: dict[str, Any]) -> None:
    base, keys, config, store, follower = rig["base"], rig["keys"], rig["config"], rig["store"], rig["follower"]
    src = source(base / "src")
    good = build(src, base / "good.bundle", version=5, key=keys.ops, health_window=1)
    bad = _bad_bundles(rig, good)
    before = snapshot(store.root) if store.root.exists() else {}
    before = {k: v for k, v in before.items() if not k.startswith("inbox")}
    # Handed over as the CLI does (its own function, in threads: the agent takes them in turn).
    with ThreadPoolExecutor(len(bad)) as pool:
        found = pool.map(lambda item: hand_over(store.root, item[0], print, wait=30), bad.values())
        answers = dict(zip(bad, found, strict=True))
    for name, answer in answers.items():
        assert answer is not None and answer["state"] == "refused", (name, answer)
        text = " ".join(e["message"] for e in answer["errors"]) + " " + answer["code"]
        assert bad[name][1] in text, (name, answer)
    after = {k: v for k, v in snapshot(store.root).items() if not k.startswith("inbox")}
    assert after == before  # nothing changed: no folder, no state, no link
    # The retained status is the newest state (several refusals in a row may fold into the last one).
    last = wait_for(lambda: [d for d in follower.of(GATEWAY, "bundle") if d.get("state") == "refused"], 10, "a report")
    assert any(want in last[-1]["reason"] + last[-1]["code"] for _, want in bad.values()), last[-1]
    assert last[-1]["running"] == 0 and last[-1]["origin"] == "local"
    assert not [d for d in follower.of(GATEWAY, "reported") if d.get("version")]  # the config never changed

    code, out = _result(_apply(config, good))
    assert (code, out["status"], out["version"]) == (0, "applied", 5), out
    assert {"change": "added", "path": "profiles/site-meter.yaml"} in out["changes"]
    assert store.current() is not None and store.current()[0] == 5  # type: ignore[index]
    assert store.state().highest == 5 and store.state().pending is None
    reported = follower.wait(GATEWAY, "reported", 10, version=5, status="applied")
    assert reported["running"]["version"] == 5  # the bundle's config is the remote config version 5
    inventory = follower.wait(GATEWAY, "inventory", 10)  # the first; the newest must name the bundle's profile
    wait_for(lambda: "bundles/current/profiles/site-meter.yaml" in json.dumps(follower.of(GATEWAY, "inventory")[-1]),
             15, "the inventory naming the bundle's profile")  # fmt: skip
    assert inventory

    older = build(src, base / "older.bundle", version=4, key=keys.ops, health_window=1)
    answer = hand_over(store.root, older, print, wait=30)
    assert answer is not None and "version 4 older than installed 5" in answer["reason"], answer
    assert store.current()[0] == 5  # type: ignore[index]

    # A signed directive names version 4: taken once, then 4 is the highest and runs (config line too).
    directive = base / "allow-4.json"
    directive.write_bytes(make(4, target=GATEWAY, ttl=3600, key=keys.ops, key_id="ops"))
    code, out = _result(_apply(config, older, "--allow-downgrade", str(directive)))
    assert (code, out["status"], out["version"]) == (0, "applied", 4), out
    assert store.current()[0] == 4 and store.state().highest == 4  # type: ignore[index]
    follower.wait(GATEWAY, "reported", 10, version=4, status="applied")
    oldest = build(src, base / "oldest.bundle", version=3, key=keys.ops, health_window=1)
    answer = hand_over(store.root, oldest, print, wait=30, allow=directive.read_bytes())
    assert answer is not None and answer["code"] == "replayed", answer  # used once (and it named 4, not 3)
    assert store.current()[0] == 4  # type: ignore[index]
    log = (base / "agent.log").read_text()
    assert "bundle version 5 applied" in log and "sha256 mismatch" in log  # the audit log has both


def test_a_bundle_too_big_for_the_buffers_disk_is_not_even_copied(small_volume: Path, tmp_path: Path) -> None:
    """The hand-over checks the free space first (16 MiB tmpfs): the copy would leave the buffer no room."""
    root = small_volume / "fleet" / "bundles"
    (root / "inbox").mkdir(parents=True)
    big = tmp_path / "big.bundle"
    big.write_bytes(os.urandom(8 * 1024 * 1024))  # twice that, and the reserve, is more than 16 MiB
    with pytest.raises(OSError, match="would not fit twice") as caught:
        hand_over(root, big, print, wait=1)
    assert caught.value.errno == 28 and sorted(p.name for p in (root / "inbox").iterdir()) == []
