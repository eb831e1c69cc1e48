"""The watcher accepts a real, clean agent: ``edge-agent run`` with virtual devices, watched for a few seconds."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProcess, Mosquitto, write_config
from tests.tools.watch_helpers import Watcher

DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 200ms}\n"
    "  - {id: cross-n, driver: virtual, kind: crosswalk, interval: 200ms}\n"
)


def test_a_clean_agent_run_passes(
    tmp_path: Path, broker: Mosquitto, agent_factory: Callable[[Path], AgentProcess]
) -> None:
    # The agent stamps timequality from the kernel, and a test host's kernel may not report NTP (a container):
    # the site vouches for the clock, as a gateway on GPS time would.
    config = write_config(
        tmp_path / "site.yaml", port=broker.port, devices=DEVICES, health="1s", extra="fleet: {clock: trusted}\n"
    )
    # 8 s: the agent may take 2-3 s to start on a loaded machine, and the checks want a few seconds of it
    watcher = Watcher(broker.port, "--gateway", "gw-test", "--every", "1", duration=8.0)
    agent = agent_factory(config)
    code, report, err = watcher.result()
    agent.signal(15)
    assert agent.wait(10) == 0, agent.output()
    assert (code, report["violation_counts"], report["malformed"]) == (0, {}, []), report["violations"]
    gateway = report["gateways"]["gw-test"]
    assert gateway["availability"] == "online"
    devices = gateway["devices"]
    assert set(devices) == {"meter-1", "bay-a1", "cross-n", "gateway"}
    assert devices["meter-1"]["events"] >= 20  # 10 a second for most of 5 s
    assert devices["gateway"]["events"] >= 2  # health every second
    assert all(e["gaps"] == [] for d in devices.values() for e in d["epochs"])
    live = re.findall(r"^watch (\d+)s: (\d+) events \([\d.]+/s\) gw-test \d+; violations 0, malformed 0", err, re.M)
    assert len(live) >= 3, err  # a line a second
    assert int(live[-1][1]) > int(live[0][1])
