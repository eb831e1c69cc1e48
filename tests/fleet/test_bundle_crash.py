"""`kill -9` at 100 random moments of the running agent's apply order, then the agent's own start-up:
the bundle and the config that run are the previous ones intact, or the new ones committed, never a mix.

The child is a fork of this process (no interpreter start-up, so an apply of a few milliseconds is
killed at random microseconds) doing the steps in the order agent/fleet/bundles/runner.py and
agent/fleet/desired/apply.py do them; what runs afterwards is what ``at_start`` (the agent's start:
recover, reconcile, roll back a pending config) decides.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config.model import AgentConfigBase, load_config
from agent.fleet.bundles.startup import applied_of, sections_of
from agent.fleet.bundles.store import BundleStore, bundles_dir
from agent.fleet.desired.startup import at_start
from agent.fleet.desired.state import DesiredState, state_dir
from agent.tools.bundle_build import collect, envelope, manifest_body, write_bundle
from tests.fleet.bundle_agents import site, source
from tests.fleet.bundle_kit import Keys, checker, write_model

KILLS = 100


def _apply(buffer: Path, bundle: Path, keys: Keys) -> None:
    """The running agent's order: stage, switch, config pending, (reload, health window), commit, config applied."""
    state = DesiredState(state_dir(buffer))
    store = BundleStore(bundles_dir(buffer.parent))
    staged = store.stage(bundle, checker(keys))
    store.switch(staged)
    previous = state.applied()
    applied = applied_of(store.root / "current", staged.manifest.version, previous.sections if previous else {})
    state.save_pending({"version": applied.version, "hash": applied.hash, "digest": applied.digest})
    store.commit()
    state.save_applied(applied)
    state.clear_pending()


def _fork_apply(buffer: Path, bundle: Path, keys: Keys) -> int:
    pid = os.fork()
    if pid == 0:  # the child: apply, then leave at once (no pytest teardown in here)
        code = 0
        try:
            _apply(buffer, bundle, keys)
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def _what_runs(local: AgentConfigBase, config: Path) -> tuple[int, int]:
    """(bundle version, config version) after the agent's start-up; asserts the bundle's files are intact."""
    _, start = at_start(local, config)
    store = BundleStore(bundles_dir(local.buffer.path.parent))
    current = store.current()
    assert current is not None and store.state().pending is None
    assert store.check_installed(current[0]) == []
    assert not (store.root / "staging").exists()
    if start.running.version:  # the config that runs is that bundle's own
        assert start.sections == sections_of(store.root / "current")
    return current[0], start.running.version


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A folder on tmpfs: fsync is cheap there, and a process kill (not a power cut) is what is tested."""
    folder = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_kill_9_at_100_random_moments_of_an_apply(tmp_path: Path, memory_dir: Path) -> None:
    keys = Keys()
    config = site(memory_dir / "gw", "gw-test", 1883, keys)
    local = load_config(config)
    buffer = local.buffer.path
    src = source(tmp_path / "src")
    for i in range(6):  # several files: several moments between fsyncs and renames
        write_model(src, os.urandom(16 * 1024), name=f"m{i}")
    items = collect(src, None)  # checked once; each version differs in its config's interval

    def bundle(version: int) -> Path:
        meter = {"id": "meter-1", "driver": "virtual", "kind": "meter", "interval": f"{version}s"}
        config_json = json.dumps({"sections": {"devices": [meter]}}).encode()
        mine = [(path, config_json if path == "config.json" else data) for path, data in items]
        body, _ = manifest_body(mine, version=version, targets=["gw-test"], min_agent_version="0.1.0", ttl=3600)
        out = tmp_path / f"v{version}.bundle"
        write_bundle(out, envelope(body, keys.ops, "ops"), mine, force=True)
        return out

    pid = _fork_apply(buffer, bundle(1), keys)
    began = time.monotonic()
    assert os.waitpid(pid, 0)[1] == 0
    duration = time.monotonic() - began
    assert _what_runs(local, config) == (1, 1)
    rng = random.Random(16)
    outcomes = {"old": 0, "new": 0}
    version = before = 1
    for _ in range(KILLS):
        version += 1
        file = bundle(version)
        pid = _fork_apply(buffer, file, keys)
        time.sleep(rng.uniform(0, duration * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        running = _what_runs(local, config)
        assert running in ((before, before), (version, version)), (before, version, running)  # never a mix
        outcomes["new" if running[0] == version else "old"] += 1
        before = running[0]
    print(f"apply {duration * 1000:.1f} ms; after {KILLS} kills: {outcomes}")
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
