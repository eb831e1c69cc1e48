"""``edge-agent validate`` and ``doctor`` show each section's origin and version from the state directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.config.model import load_config
from agent.fleet.desired.document import sections_hash
from agent.fleet.desired.state import Applied, DesiredState
from agent.tools.doctor.remote_config import check_remote_config
from tests.conftest import ROOT
from tests.fleet.desired_docs import Keys, devices, site


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-c", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip


def test_validate_and_doctor_name_each_sections_origin(tmp_path: Path) -> None:
    path = site(tmp_path, 1, Keys())
    done = _validate(path)
    assert done.returncode == 0, done.stderr
    assert "remote config: none applied" in done.stdout
    assert check_remote_config(load_config(path), path)[0].verdict == "ok"

    sections = {"devices": devices({"id": "meter-1", "interval": "1s"}, {"id": "meter-2"}), "priorities": {}}
    state = DesiredState(tmp_path / "fleet" / "config")
    state.save_applied(Applied(41, sections_hash(sections), sections, "0" * 64, b"{}"))
    done = _validate(path)
    assert done.returncode == 0, done.stderr
    assert f"remote config: version 41 ({sections_hash(sections)})" in done.stdout and "2 devices" in done.stdout
    for line in ("devices: remote v41", "priorities: remote v41", "uplink: local", "fleet: local"):
        assert f"  {line}\n" in done.stdout, done.stdout
    row = check_remote_config(load_config(path), path)[0]
    assert row.verdict == "ok" and "version 41" in row.finding and "devices: remote v41" in row.finding

    state.save_pending({"version": 42})
    row = check_remote_config(load_config(path), path)[0]
    assert row.verdict == "warn" and "version 42" in row.finding
    assert "version 42 was being applied" in _validate(path).stdout
    state.clear_pending()

    # State that no longer validates (written by hand here: the agent never applies such a thing).
    broken = {"devices": devices({"id": "meter-1", "interval": "1s"}), "fleet": {"enabled": True, "keys": []}}
    state.save_applied(Applied(43, sections_hash(broken), broken, "0" * 64, b"{}"))
    row = check_remote_config(load_config(path), path)[0]
    assert row.verdict == "FAIL" and "version 43 no longer validates" in row.finding, row
    assert "no longer validates" in _validate(path).stdout
