"""The network server's broker over TLS with a password file: a real Mosquitto with a TLS listener,
a CA made here, accounts made by mosquitto_passwd; a real agent reading two applications of it,
one with the right password and one with a wrong one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.lorawan.simulator import DEFAULT_APPLICATION, Scenario, parse_devices, publish
from tests.conftest import KEEP_USER, ROOT, AgentProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.fleet.renewal_kit import KitCA

GOOD_APP = DEFAULT_APPLICATION["chirpstack"]
BAD_APP = "0b1e2c3d-4f5a-4b6c-8d7e-9f0a1b2c3d4e"
PASSWORD = "ns-api-key-2f7c"  # noqa: S105 - the test broker's account
WRONG = "not-the-api-key"
OCCUPANCY = "city.parking.occupancy"


class TlsPasswordBroker(Mosquitto):
    """A plain listener for the test's clients (simulator, subscriber, the agent's own uplink) and the
    network server's TLS listener: accounts from mosquitto_passwd, nobody anonymous."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.tls_port = free_port()
        self.ca = KitCA()
        (workdir / "ca.pem").write_bytes(self.ca.pem)
        server = self.ca.server(workdir)
        accounts = workdir / "passwd"
        accounts.write_text(f"chirpstack:{PASSWORD}\n")
        mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        subprocess.run([mosquitto_passwd, "-U", str(accounts)], check=True)
        self.conf.write_text(
            "per_listener_settings true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            f"log_dest none\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls_port} 127.0.0.1\ncafile {workdir / 'ca.pem'}\ncertfile {server}\nkeyfile {server}\n"
            f"allow_anonymous false\npassword_file {accounts}\n" + KEEP_USER
        )


@dataclass
class Site:
    broker: TlsPasswordBroker
    sub: Subscriber
    agent: AgentProcess
    config: Path
    metrics: int
    scenario: Scenario


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def _devices(broker: TlsPasswordBroker, folder: Path, scenario: Scenario) -> str:
    good, bad = _secret(folder / "ns-password", PASSWORD), _secret(folder / "ns-wrong", WRONG)
    server = (f"type: chirpstack, broker: '127.0.0.1:{broker.tls_port}', username: chirpstack, "
              f"tls: {{ca_file: {folder / 'ca.pem'}}}")  # fmt: skip
    lines = [f"  - {{id: {s.id}, driver: lorawan, dev_eui: '{s.dev_eui}', codec: {s.codec}, bay: bay-{s.id}, "
             f"application: '{GOOD_APP}', network_server: {{{server}, password_file: {good}}}}}\n"
             for s in scenario.ledger]  # fmt: skip
    lines.append(f"  - {{id: locked-out, driver: lorawan, dev_eui: '70b3d5fffe00beef', codec: nwave-nps405, "
                 f"bay: bay-x, application: '{BAD_APP}', offline_after: 1, "
                 f"network_server: {{{server}, password_file: {bad}}}}}\n")  # fmt: skip
    return "".join(lines)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("lorawan-secure")
    broker = TlsPasswordBroker(folder)
    broker.start()
    sub = Subscriber(broker.port, "ioc/v1/#")
    scenario = Scenario("chirpstack", GOOD_APP, parse_devices("nwave-nps405:3"), uplinks=3, gateways=1, seed=11,
                        round_=0, join=False, faults=False)  # fmt: skip
    metrics = free_port()
    config = write_config(folder / "site.yaml", port=broker.port, devices=_devices(broker, folder, scenario),
                          extra=f"observability: {{listen: '127.0.0.1:{metrics}'}}\n")  # fmt: skip
    agent = AgentProcess(config, folder / "agent.log").start()
    try:
        yield Site(broker, sub, agent, config, metrics, scenario)
    finally:
        agent.kill()
        sub.close()
        broker.stop()


def _metric(port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and ",".join(sorted(line[len(name) + 1 : line.index("}")].split(","))) == want:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_tls_and_password_file_connect_and_a_wrong_password_is_one_link_down(site: Site) -> None:
    wait_for(lambda: "connected as" in site.agent.output(), 15, "the TLS connection with the right password")
    publish(site.scenario, "127.0.0.1", site.broker.port, 0)
    expected = Counter({s.id: s.uplinks for s in site.scenario.ledger})
    published = lambda: Counter(e["device"] for e in site.sub.snapshot() if e["type"] == OCCUPANCY)  # noqa: E731
    wait_for(lambda: published() == expected, 15, "one occupancy event per uplink, over TLS")

    # The other application's password is wrong: its device goes offline with the reason and the fix.
    good = f"chirpstack:127.0.0.1:{site.broker.tls_port}/{GOOD_APP}"
    bad = f"chirpstack:127.0.0.1:{site.broker.tls_port}/{BAD_APP}"
    reason = (f"lorawan {bad}: network server broker 127.0.0.1:{site.broker.tls_port}: connection refused: "
              "Not authorized; check network_server.username and network_server.password_file")  # fmt: skip
    statuses = lambda: [e["data"] for e in site.sub.snapshot()  # noqa: E731
                        if e["device"] == "locked-out" and e["type"] == "city.device.status"]  # fmt: skip
    wait_for(lambda: any(s["status"] == "offline" for s in statuses()), 15, "the locked-out device offline")
    offline = next(s for s in statuses() if s["status"] == "offline")
    assert reason in offline["reason"], offline
    log = site.agent.output()
    assert reason in log
    assert PASSWORD not in log and WRONG not in log
    # The link is down in the metrics; the good one is up, and the agent runs on.
    assert _metric(site.metrics, "edge_agent_driver_link_up", driver="lorawan", link=bad) == 0
    assert _metric(site.metrics, "edge_agent_driver_link_up", driver="lorawan", link=good) == 1
    assert site.agent.proc is not None and site.agent.proc.poll() is None
    assert published() == expected  # nothing extra


def test_validate_refuses_a_password_file_others_can_read(site: Site, tmp_path: Path) -> None:
    (site.config.parent / "ns-password").chmod(0o644)
    try:
        result = subprocess.run([sys.executable, "-m", "agent", "validate", "-c", str(site.config)], cwd=ROOT,
                                capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    finally:
        (site.config.parent / "ns-password").chmod(0o600)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"devices[0].network_server.password_file: permissions 0644 for '{site.config.parent / 'ns-password'}' " \
           "are too open; chmod 600" in out, out  # fmt: skip
    assert "devices[3]" not in out  # the wrong password's file is 0600: only the open one is named
