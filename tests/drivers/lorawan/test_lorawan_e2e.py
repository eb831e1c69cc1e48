"""End to end: simulator -> Mosquitto -> agent process -> Mosquitto -> subscriber, ChirpStack and TTS at once.

One broker plays both network servers' MQTT and the IOC's; one agent reads a ChirpStack and a TTS
application. The simulator's ledger says what was sent; the subscriber counts what came out.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from drivers.lorawan.simulator import DEFAULT_APPLICATION, Scenario, ledger_json, parse_devices, publish
from tests.conftest import ROOT, AgentProcess, Mosquitto, Subscriber, free_port, wait_for, write_config

CS, TTS = "nwave-nps405:4,bosch-tps110:2,milesight-em300-th:1", "nwave-nps405:3,bosch-tps110:1"
UPLINKS = 6
SILENCE = "interval: 1s, offline_after: 1"
OCCUPANCY, METER, UNDECODED, STATUS = (
    "city.parking.occupancy", "city.meter.reading", "city.device.undecoded", "city.device.status")  # fmt: skip


def _scenario(server: str, round_: int = 0, join: bool | None = None) -> Scenario:
    devices = parse_devices(CS if server == "chirpstack" else TTS)
    return Scenario(server, DEFAULT_APPLICATION[server], devices, uplinks=UPLINKS, gateways=3,  # type: ignore[arg-type]
                    seed=7, round_=round_, join=round_ == 0 if join is None else join, faults=True)  # fmt: skip


def _devices(broker: int) -> str:
    lines = []
    for server in ("chirpstack", "tts"):
        for sent in _scenario(server).ledger:
            role = "" if sent.codec.startswith("milesight") else f", bay: bay-{sent.id}"
            timing = f", {SILENCE}" if sent.silent else ""
            lines.append(f"  - {{id: {sent.id}, driver: lorawan, dev_eui: '{sent.dev_eui.upper()}', "
                         f"codec: {sent.codec}, application: '{DEFAULT_APPLICATION[server]}', "
                         f"network_server: {{type: {server}, broker: '127.0.0.1:{broker}'}}"
                         f"{role}{timing}}}\n")  # fmt: skip
    return "".join(lines)


@dataclass
class Site:
    broker: Mosquitto
    sub: Subscriber
    config: Path
    metrics: int
    agent: AgentProcess
    folder: Path

    def start_agent(self, name: str) -> None:
        self.agent = AgentProcess(self.config, self.folder / f"{name}.log").start()
        wait_for(lambda: self.agent.output().count("connected as") >= 2, 15, "the agent's two NS connections")

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((e["device"], e["type"]) for e in self.sub.snapshot())

    def statuses(self, device: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.sub.snapshot() if e["device"] == device and e["type"] == STATUS]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("lorawan")
    broker = Mosquitto(folder)
    broker.start()
    sub = Subscriber(broker.port, "ioc/v1/#")
    metrics = free_port()
    config = write_config(folder / "site.yaml", port=broker.port, devices=_devices(broker.port),
                          extra=f"observability: {{listen: '127.0.0.1:{metrics}'}}\n")  # fmt: skip
    site = Site(broker, sub, config, metrics, None, folder)  # type: ignore[arg-type]
    try:
        site.start_agent("agent-a")
        yield site
    finally:
        if site.agent is not None:
            site.agent.kill()
        sub.close()
        broker.stop()


def _expected(*ledgers: dict[str, Any]) -> Counter[tuple[str, str]]:
    """The events the ledgers' uplinks must make: one per decodable uplink, one per undecodable."""
    out: Counter[tuple[str, str]] = Counter()
    for ledger in ledgers:
        for device, sent in ledger["devices"].items():
            kind = METER if sent["codec"].startswith("milesight") else OCCUPANCY
            out[device, kind] += sent["uplinks"]
            out[device, UNDECODED] += sent["bad"]
    return +out


def _published(site: Site) -> Counter[tuple[str, str]]:
    return +Counter({k: n for k, n in site.counts().items() if k[1] in (OCCUPANCY, METER, UNDECODED)})


def _settle(site: Site, expected: Counter[tuple[str, str]], what: str) -> None:
    try:
        wait_for(lambda: _published(site) == expected, 15, what)
    except AssertionError:
        got = _published(site)
        raise AssertionError(f"{what}: missing {dict(expected - got)}, extra {dict(got - expected)}") from None
    time.sleep(0.3)  # anything extra (a duplicate) would come now
    assert _published(site) == expected


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_one_event_per_uplink_through_duplicates_restarts_joins_and_silence(site: Site) -> None:
    ledger_file = site.folder / "ledger-cs-0.json"
    cli = subprocess.run(
        [sys.executable, "-m", "agent", "simulate", "lorawan", "--ns", "chirpstack", "--broker",
         f"127.0.0.1:{site.broker.port}", "--devices", CS, "--uplinks", str(UPLINKS), "--rate", "0", "--seed", "7",
         "--ledger", str(ledger_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    cs0 = json.loads(ledger_file.read_text())
    assert json.loads(cli.stdout) == cs0
    assert cs0["totals"]["duplicates"] > 0 and cs0["totals"]["gaps"] > 0 and cs0["totals"]["bad"] == 1
    tts0_scenario = _scenario("tts")
    publish(tts0_scenario, "127.0.0.1", site.broker.port, 0)
    tts0 = ledger_json(tts0_scenario)
    _settle(site, _expected(cs0, tts0), "one event per uplink of both servers")
    ids = [e["id"] for e in site.sub.snapshot()]
    assert len(ids) == len(set(ids))

    # Both connections are in the gateway's health and the metrics.
    links = {f"{server}:127.0.0.1:{site.broker.port}/{DEFAULT_APPLICATION[server]}" for server in ("chirpstack", "tts")}
    health = lambda: [e["data"] for e in site.sub.snapshot() if e["type"] == "city.gateway.health"]  # noqa: E731
    wait_for(lambda: any("links" in h for h in health()), 10, "a gateway health event")
    first = next(h["links"] for h in health() if "links" in h)
    assert {name: (state["driver"], state["connected"]) for name, state in first.items()} == {
        name: ("lorawan", True) for name in links}  # fmt: skip
    for name in links:
        server = name.split(":", 1)[0]
        assert _metric(site.metrics, "edge_agent_driver_link_up", driver="lorawan", link=name) == 1
        # Per connection: every message the simulator sent, the one not JSON, the unconfigured DevEUI's uplink.
        counted = {kind: _metric(site.metrics, "edge_agent_driver_link_messages_total", driver="lorawan", link=name,
                                 kind=kind) for kind in ("messages", "bad_messages", "unknown_uplinks")}  # fmt: skip
        assert counted == {"messages": len(_scenario(server).messages()), "bad_messages": 1, "unknown_uplinks": 1}

    # Bad payloads and messages are counted; the device goes on, and so does everyone else.
    bad_device = next(d for d, s in cs0["devices"].items() if s["bad"])
    assert _metric(site.metrics, "edge_agent_device_poll_failures_total", device=bad_device,
                   reason="undecoded_too_short") == 1  # fmt: skip
    log = site.agent.output()
    assert "not understood (not JSON (set json=true in ChirpStack's [integration.mqtt])): b'\\x08\\x01 protobuf" in log
    assert "DevEUI ffffffffffff0001 (stray) is not configured; its messages are counted, not published" in log

    # Silence: the silent devices (heard once) go offline after interval x offline_after.
    silent = [d for ledger in (cs0, tts0) for d, s in ledger["devices"].items() if s["silent"]]
    assert len(silent) == 2
    for device in silent:
        wait_for(lambda d=device: any(s["status"] == "offline" for s in site.statuses(d)), 10, f"{device} offline")  # type: ignore[misc]
        reason = next(s["reason"] for s in site.statuses(device) if s["status"] == "offline")
        assert re.fullmatch(r"silent 1 s, expected every 1 s", reason), reason

    # A redelivery while the agent runs makes nothing.
    publish(_scenario("chirpstack"), "127.0.0.1", site.broker.port, 0)
    publish(_scenario("tts"), "127.0.0.1", site.broker.port, 0)
    time.sleep(0.5)
    expected = _expected(cs0, tts0)
    assert _published(site) == expected

    # The agent stops; ChirpStack's next round and a redelivery of the first wait in its session.
    site.agent.signal(signal.SIGTERM)
    assert site.agent.wait(15) == 0
    cs1_scenario = _scenario("chirpstack", 1)
    publish(cs1_scenario, "127.0.0.1", site.broker.port, 0)
    publish(_scenario("chirpstack"), "127.0.0.1", site.broker.port, 0)
    site.start_agent("agent-b")
    expected += _expected(ledger_json(cs1_scenario))
    _settle(site, expected, "the round published while the agent was down, and nothing from the redelivery")

    # A join: TTS devices start a new session, f_cnt from 1 again; every uplink is published.
    tts_silent = next(d for d, s in tts0["devices"].items() if s["silent"])
    offline_before = len([s for s in site.statuses(tts_silent) if s["status"] == "offline"])
    tts2 = _scenario("tts", 2, join=True)
    publish(tts2, "127.0.0.1", site.broker.port, 0)
    expected += _expected(ledger_json(tts2))
    _settle(site, expected, "every uplink after the join")
    assert "joined: a new session, frame counter tracking restarts (was 6)" in site.agent.output()
    # The silent one was heard again: online, then (silent again) offline.
    wait_for(lambda: len([s for s in site.statuses(tts_silent) if s["status"] == "offline"]) > offline_before,
             10, "the silent device offline again")  # fmt: skip
    assert [s["status"] for s in site.statuses(tts_silent)][-2:] == ["online", "offline"]


def test_a_broker_outage_marks_no_device_offline(site: Site) -> None:
    tts_silent = next(s.id for s in _scenario("tts").ledger if s.silent)
    offline = len([s for s in site.statuses(tts_silent) if s["status"] == "offline"])
    publish(_scenario("tts", 3, join=False), "127.0.0.1", site.broker.port, 0)  # the silent device is heard
    wait_for(lambda: site.statuses(tts_silent)[-1]["status"] == "online", 10, "the silent device online")
    down = datetime.now(UTC)
    site.broker.stop()
    link = f"tts:127.0.0.1:{site.broker.port}/{DEFAULT_APPLICATION['tts']}"
    wait_for(lambda: _metric(site.metrics, "edge_agent_driver_link_up", driver="lorawan", link=link) == 0, 2,
             "the connection down in the metrics")  # fmt: skip
    time.sleep(max(0.0, 2.5 - (datetime.now(UTC) - down).total_seconds()))  # more than interval x offline_after
    site.broker.start()
    up = datetime.now(UTC)
    wait_for(lambda: len([s for s in site.statuses(tts_silent) if s["status"] == "offline"]) > offline, 15,
             "the silent device offline once its timer ran on after the outage")  # fmt: skip
    went = [s for e in site.sub.snapshot() if e["type"] == STATUS for s in [e["data"]] if s["status"] == "offline"]
    during = [s for s in went if down.isoformat() <= s["since"].replace("Z", "+00:00") <= up.isoformat()]
    assert during == []
    last = datetime.fromisoformat(site.statuses(tts_silent)[-1]["since"].replace("Z", "+00:00"))
    assert last >= up  # the timer stood still while the broker was away


def _publish_raw(port: int, messages: list[tuple[str, bytes, int]], delay: float) -> threading.Thread:
    """Publish ``messages`` after ``delay`` s, from a thread (while a tool listens)."""

    def run() -> None:
        time.sleep(delay)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"stray-{time.monotonic_ns()}")
        client.connect("127.0.0.1", port, 10)
        client.loop_start()
        infos = [client.publish(topic, body, qos=qos) for topic, body, qos in messages]
        for info in infos:
            info.wait_for_publish(5)
        client.disconnect()
        client.loop_stop()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _strays(qos: int) -> list[tuple[str, bytes, int]]:
    """A ChirpStack uplink of an unconfigured DevEUI (profile "Nwave NPS405") and a message that is not JSON."""
    scenario = _scenario("chirpstack", 9, join=False)
    scenario.uplinks = 0  # no uplinks of configured devices: only status reports and the strays
    return [(t, b, qos) for t, b, _ in scenario.messages() if "ffffffffffff0001" in t]


def test_scan_lists_unconfigured_deveuis_and_doctor_checks_each_connection(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.config.model import load_config
    from agent.tools.doctor.devices import check_devices
    from drivers.lorawan.tools import scan_main

    logged = len(site.agent.output())
    thread = _publish_raw(site.broker.port, _strays(1), 0.4)
    assert scan_main(["-c", str(site.config), "--seconds", "1.0"]) == 0
    thread.join()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVEUI", "NAME", "LAST", "SEEN", "(UTC)", "UPLINKS", "CODEC", "(guessed)"]
    [stray] = lines[1:]
    assert stray.split()[0] == "ffffffffffff0001" and stray.split()[1] == "stray"
    assert stray.split()[-2:] == ["1", "nwave-nps405"]

    thread = _publish_raw(site.broker.port, _strays(0), 0.4)  # ChirpStack publishing at QoS 0
    rows = asyncio.run(check_devices(load_config(site.config), 1.0))
    thread.join()
    by_target = {row.target.split(" (")[0]: row for row in rows}
    chirpstack = by_target[f"lorawan chirpstack:127.0.0.1:{site.broker.port}/{DEFAULT_APPLICATION['chirpstack']}"]
    assert chirpstack.verdict == "warn" and "not understood" in chirpstack.finding
    assert chirpstack.fix == "ChirpStack: set json=true in [integration.mqtt]"
    assert "1 unconfigured DevEUI(s)" in chirpstack.finding
    tts = by_target[f"lorawan tts:127.0.0.1:{site.broker.port}/{DEFAULT_APPLICATION['tts']}"]
    assert tts.verdict == "ok" and tts.finding.startswith("connected; in 1 s 0 message(s)")
    assert len(rows) == 2  # one per connection, not one per device
    # The agent kept its sessions: the doctor and the scan came with client ids of their own.
    assert "connection lost" not in site.agent.output()[logged:]
    assert "ChirpStack publishes uplinks at QoS 0" in site.agent.output()[logged:]  # the agent saw it too
