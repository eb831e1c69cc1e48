"""Observability end to end: metrics, /healthz, /readyz, JSON logs, secrets, repetition, watchdog.

Real agent processes (``python -m agent run``), real Mosquitto, real HTTP scrapes with urllib,
and a real ``sd_notify`` datagram socket bound by the test. A stuck event loop is simulated by
what causes one in the field: a driver calling blocking I/O on the loop. That driver is a
test-only plugin installed for the agent process through ``PYTHONPATH`` (a package plus a
``.dist-info`` with its entry point), so the agent carries no test hook.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.schemas import GatewayHealth
from agent.observability.logs import (
    REPEAT_BURST_ENV,
    REPEAT_WINDOW_ENV,
    JsonFormatter,
    Redactor,
    RepeatFilter,
    TextFormatter,
    bound,
    choose_format,
    setup_logging,
)
from agent.observability.metrics import normalise_reason, temperature_c
from agent.runtime.systemd import Notifier
from tests.conftest import ROOT, AgentProcess, Mosquitto, free_port, wait_for, write_config

METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 50ms}\n"
FAILING = "  - {id: bad-1, driver: virtual, kind: meter, interval: 50ms, fail_every: 3}\n"


# ---- helpers ---------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local test URL
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, body = _get(url)
    return status, json.loads(body)


class Scrape:
    """One /metrics answer: raw text and samples."""

    def __init__(self, port: int) -> None:
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        self.text = body.decode()
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


def _observed_site(tmp_path: Path, broker_port: int, devices: str, *, health: str = "60s") -> tuple[Path, int]:
    port = free_port()
    config = write_config(
        tmp_path / "site.yaml",
        port=broker_port,
        devices=devices,
        health=health,
        extra=f"observability: {{listen: '127.0.0.1:{port}', stall_after: 1s}}\n",
    )
    return config, port


def _documented_metrics() -> list[str]:
    doc = (ROOT / "docs" / "observability.md").read_text()
    block = doc.split("<!-- metrics:begin -->", 1)[1].split("<!-- metrics:end -->", 1)[0]
    return re.findall(r"^\| `(edge_agent_[a-z0-9_]+)`", block, re.MULTILINE)


class VerboseAgent(AgentProcess):
    """``edge-agent -v run``: debug logging."""

    def start(self) -> VerboseAgent:
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "-v", "run", "-c", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        return self


# ---- metrics, health and readiness -----------------------------------------------------------
def test_metrics_health_and_readiness_through_a_broker_outage(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    broker.stop()  # the agent starts during an outage
    config, port = _observed_site(tmp_path, broker.port, METER + FAILING, health="2s")
    agent = agent_factory(config)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return _get(base + "/healthz")[0] == 200
        except OSError:
            return False

    wait_for(answers, 20, "/healthz to answer 200")  # it answers while the buffer still opens
    wait_for(lambda: _get_json(base + "/readyz")[1]["checks"]["started"], 10, "the agent to start")
    # Started, then the first connection attempt fails (on a loaded machine, a moment later).
    wait_for(lambda: "uplink_error" in _get_json(base + "/readyz")[1], 10, "the first connection attempt to fail")
    status, ready = _get_json(base + "/readyz")
    assert status == 503, ready
    assert ready["checks"] == {
        "config_loaded": True,
        "started": True,
        "buffer_writable": True,
        "uplink_connected": False,
    }
    assert "Connection refused" in ready["uplink_error"]

    wait_for(lambda: Scrape(port).value("edge_agent_buffer_events") >= 20, 10, "events to pile up in the buffer")
    first = Scrape(port)
    time.sleep(1.5)
    second = Scrape(port)
    # Every documented metric is served (the temperature only where the board has a sensor).
    served = {f.name for f in text_string_to_metric_families(second.text)} | {s.name for s in second.samples}
    expected = set(_documented_metrics())
    expected.discard("edge_agent_fleet_requests_total")  # fleet.enabled only: tests/fleet/test_channel.py
    if temperature_c() is None:
        expected.discard("edge_agent_host_temperature_celsius")
        assert "edge_agent_host_temperature_celsius" not in served
    missing = {m for m in expected if m not in served and m.removesuffix("_total") not in served}
    assert not missing, f"documented but not served: {sorted(missing)}"
    assert len(expected) >= 25

    produced = "edge_agent_events_produced_total"
    reading = {"device": "meter-1", "type": "city.meter.reading"}
    assert second.value(produced, **reading) > first.value(produced, **reading) > 0
    assert second.value("edge_agent_buffer_events") > first.value("edge_agent_buffer_events")
    assert second.value("edge_agent_buffer_events", **{"class": "telemetry"}) > 0
    assert second.value("edge_agent_buffer_oldest_age_seconds") >= 1.0
    assert second.value("edge_agent_buffer_bytes") > 0
    assert second.value("edge_agent_uplink_connected") == 0
    assert second.value("edge_agent_uplink_errors_total", reason="connection_refused") >= 1
    assert second.value("edge_agent_events_delivered_total") == 0
    assert second.value("edge_agent_device_up", device="meter-1", driver="virtual") == 1
    assert second.value("edge_agent_device_poll_duration_seconds_count", device="meter-1") >= 20
    assert second.value("edge_agent_device_poll_duration_seconds_bucket", device="meter-1", le="+Inf") >= 20
    assert 0 < second.value("edge_agent_device_poll_duration_seconds_sum", device="meter-1") < 5
    assert second.value("edge_agent_device_poll_failures_total", device="bad-1", reason="timeout") >= 3
    assert second.value("edge_agent_live") == 1
    assert second.value("edge_agent_ready") == 0
    assert second.value("edge_agent_loop_heartbeat_age_seconds") < 1.0
    assert second.has("process_resident_memory_bytes")
    peak = second.value("edge_agent_buffer_events")

    broker.start()
    sub = subscriber_factory(broker.port)
    wait_for(lambda: _get(base + "/readyz")[0] == 200, 15, "/readyz 200 once the broker is back")
    status, ready = _get_json(base + "/readyz")
    assert ready["ok"] is True and all(ready["checks"].values()), ready
    wait_for(lambda: Scrape(port).value("edge_agent_buffer_events") < peak / 10, 15, "the backlog to drain")
    after = Scrape(port)
    assert after.value("edge_agent_uplink_connected") == 1
    assert after.value("edge_agent_events_delivered_total") >= peak
    assert after.value("edge_agent_events_published_total") >= after.value("edge_agent_events_delivered_total")
    assert after.value("edge_agent_ready") == 1
    assert _get(base + "/healthz")[0] == 200
    assert _get(base + "/nothing-here")[0] == 404

    # The health event carries the process and host figures, and validates against the schema.
    def health_with_host() -> dict[str, Any] | None:
        for event in sub.snapshot():
            if event["type"] == "city.gateway.health" and "host" in event["data"]:
                return dict(event["data"])
        return None

    data = wait_for(health_with_host, 10, "a health event with host figures")
    GatewayHealth.model_validate(data)
    assert data["process"]["rss_bytes"] > 10_000_000
    assert data["process"]["cpu_percent"] is not None and data["process"]["cpu_percent"] >= 0
    assert data["process"]["threads"] >= 2
    host = data["host"]
    assert host["disk_free_bytes"] > 0 and host["disk_total_bytes"] >= host["disk_free_bytes"]
    assert 0 < host["mem_available_bytes"] <= host["mem_total_bytes"]
    assert len(host["load_avg"]) == 3
    assert (host["temperature_c"] is None) == (temperature_c() is None)
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0


def test_a_non_loopback_listen_is_refused_unless_allowed(tmp_path: Path) -> None:
    def validate(observability: str) -> subprocess.CompletedProcess[str]:
        config = write_config(tmp_path / "site.yaml", port=1883, devices=METER, extra=observability)
        return subprocess.run(
            [sys.executable, "-m", "agent", "validate", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=ROOT,
        )

    refused = validate("observability: {listen: '0.0.0.0:9108'}\n")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "observability.listen: 0.0.0.0:9108 is not a loopback address" in refused.stderr
    assert "allow_remote: true" in refused.stderr
    assert validate("observability: {listen: '0.0.0.0:9108', allow_remote: true}\n").returncode == 0
    assert validate("observability: {listen: '[::1]:9108'}\n").returncode == 0
    malformed = validate("observability: {listen: '9108'}\n")
    assert malformed.returncode == 2 and "expected host:port" in malformed.stderr


# ---- logs ------------------------------------------------------------------------------------
def test_json_logs_on_the_journal_parse_and_carry_device_context(
    tmp_path: Path, broker: Mosquitto, agent_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As systemd does: JOURNAL_STREAM names the file stderr is connected to (here the log file).
    log_file = tmp_path / "agent-0.log"
    log_file.touch()
    st = log_file.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.delenv("EDGE_AGENT_LOG_FORMAT", raising=False)
    flapping = "  - {id: bad-1, driver: virtual, kind: meter, interval: 50ms, fail_every: 2, offline_after: 1}\n"
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METER + flapping)
    agent = agent_factory(config)
    assert agent.log_path == log_file
    wait_for(lambda: "uplink connected" in agent.output() and "device bad-1 offline" in agent.output(), 20, "logs")
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0

    lines = [json.loads(line) for line in agent.output().splitlines() if line.strip()]  # every line is JSON
    assert len(lines) >= 5
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    online = next(line for line in lines if line["msg"] == "device meter-1 online")
    assert online["device"] == "meter-1" and online["driver"] == "virtual" and online["level"] == "info"
    offline = next(line for line in lines if line["msg"].startswith("device bad-1 offline"))
    assert offline["device"] == "bad-1" and offline["level"] == "warning"
    uplink = next(line for line in lines if line["msg"].startswith("uplink connected"))
    assert "device" not in uplink  # the uplink's task is not a device's


def test_the_mqtt_password_never_reaches_the_log_even_at_debug(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The password is also this device's id, which the agent logs ("device ... online"): a
    # missing redaction would show. Nothing else in a normal run prints the password.
    secret = "hunter2-pump"  # noqa: S105 - a test broker's password
    (tmp_path / "mqtt-password").write_text(secret + "\n")
    monkeypatch.delenv("EDGE_AGENT_LOG_FORMAT", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    config = write_config(
        tmp_path / "site.yaml", port=broker.port, devices=f"  - {{id: {secret}, driver: virtual, kind: meter}}\n"
    )
    config.write_text(
        config.read_text().replace(
            "reconnect_max: 1s}", "reconnect_max: 1s, username: edge, password_file: mqtt-password}"
        )
    )
    sub = subscriber_factory(broker.port)
    agent = VerboseAgent(config, tmp_path / "verbose.log").start()
    try:
        wait_for(lambda: sub.seqs(secret), 20, "events through the authenticated connection")
        wait_for(lambda: "device [REDACTED] online" in agent.output(), 10, "the redacted device line")
        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0
    finally:
        agent.kill()
    out = agent.output()
    assert "DEBUG" in out  # -v took effect
    assert "uplink connected" in out
    assert secret not in out


def test_a_flapping_device_logs_each_change_of_state_and_its_last_line_is_its_state(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: with the repeat folding as shipped (one line per 60 s), a flapping device's later
    "online" lines were folded away, so its last line said offline while it was online."""
    monkeypatch.setenv("EDGE_AGENT_LOG_REPEAT_BURST", "1")  # the production folding, not the suite's
    monkeypatch.delenv("EDGE_AGENT_LOG_REPEAT_WINDOW", raising=False)
    monkeypatch.delenv("EDGE_AGENT_LOG_FORMAT", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    sub = subscriber_factory(broker.port)
    # offline and online again every 100 ms
    flapping = "  - {id: flap-1, driver: virtual, kind: meter, interval: 50ms, fail_every: 2, offline_after: 1}\n"
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=flapping)
    agent = agent_factory(config)

    def statuses() -> list[str]:
        events = sorted((e for e in sub.snapshot() if e["device"] == "flap-1" and e["type"] == "city.device.status"),
                        key=lambda e: e["seq"])  # fmt: skip
        return [e["data"]["status"] for e in events]

    wait_for(lambda: len(statuses()) >= 20, 20, "the device flapping 20 times")
    # It stops flapping: reloaded without faults, it stays online.
    config.write_text(config.read_text().replace("fail_every: 2, ", ""))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in agent.output(), 15, "the reload")
    time.sleep(1.0)  # online for ten polls
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    lines = [line for line in agent.output().splitlines() if re.search(r"device flap-1 (online|offline)", line)]
    states = [re.search(r"device flap-1 (online|offline)", line).group(1) for line in lines]  # type: ignore[union-attr]
    assert len(states) >= 20, lines  # every change is written, none folded
    assert all(a != b for a, b in itertools.pairwise(states)), lines  # so they alternate, as the device did
    assert states[-1] == "online" == statuses()[-1], (lines[-3:], statuses()[-3:])


# ---- systemd ---------------------------------------------------------------------------------
HANG_DRIVER = '''
"""Test-only driver: blocks the event loop (blocking I/O in read()) once a trigger file appears."""
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from agent.devices.api import DeviceConfig, Driver, DriverPlugin


class HangConfig(DeviceConfig):
    driver: Literal["hang"]
    trigger: str
    hang_for: float = 4.0


class HangDriver(Driver):
    async def read(self):
        trigger = Path(self.config.trigger)
        if trigger.exists():
            trigger.unlink()
            time.sleep(self.config.hang_for)  # the bug under test: a blocking call on the loop
        return []


PLUGIN = DriverPlugin(name="hang", config_model=HangConfig, factory=lambda: HangDriver, summary="test")
'''


def _install_hang_driver(where: Path) -> Path:
    where.mkdir()
    (where / "edge_agent_test_hang.py").write_text(HANG_DRIVER)
    info = where / "edge_agent_test_hang-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-test-hang\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[edge_agent.drivers]\nhang = edge_agent_test_hang:PLUGIN\n")
    return where


class NotifySocket:
    """The systemd end of $NOTIFY_SOCKET: a datagram socket in the abstract namespace."""

    def __init__(self) -> None:
        self.name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for field in data.decode().split("\n"):
                self.messages.append((time.monotonic(), field))

    def times(self, field: str) -> list[float]:
        return [t for t, f in list(self.messages) if f == field]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_the_watchdog_is_fed_only_while_the_event_loop_progresses(
    tmp_path: Path, broker: Mosquitto, agent_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = _install_hang_driver(tmp_path / "plugins")
    trigger = tmp_path / "hang-now"
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + notify.name)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]))
    devices = METER + f"  - {{id: hang-1, driver: hang, interval: 100ms, trigger: '{trigger}', hang_for: 4}}\n"
    config, port = _observed_site(tmp_path, broker.port, devices)
    try:
        agent = agent_factory(config)
        wait_for(lambda: notify.times("READY=1"), 20, "READY=1")
        ready_at = notify.times("READY=1")[0]
        wait_for(lambda: len([t for t in notify.times("WATCHDOG=1") if t > ready_at]) >= 4, 5, "watchdog pings")
        pings = [t for t in notify.times("WATCHDOG=1") if t > ready_at]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.3 < g < 0.8 for g in gaps), gaps  # every WATCHDOG_USEC / 2
        assert any(f.startswith("STATUS=") and "devices online" in f for _, f in notify.messages)

        trigger.touch()  # the driver blocks the event loop for 4 s at its next poll (<= 0.1 s)
        hang_from = time.monotonic()
        time.sleep(2.2)  # stall_after (1 s) + one ping interval, with margin
        status, body = _get_json(f"http://127.0.0.1:{port}/healthz")  # served from its own thread
        assert status == 503, body
        assert "event_loop" in body["stalls"], body
        time.sleep(1.4)
        silent = [t for t in notify.times("WATCHDOG=1") if hang_from + 1.7 < t < hang_from + 3.6]
        assert silent == [], "the watchdog was fed while the event loop was stuck"
        # The same thread feeds it again once the loop runs: it checks heartbeats, it did not die.
        wait_for(lambda: [t for t in notify.times("WATCHDOG=1") if t > hang_from + 4.0], 5, "pings to resume")
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert re.search(r"watchdog: not pinging systemd.*event_loop: no heartbeat", agent.output()), agent.output()
        assert "watchdog: progressing again" in agent.output()

        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0
        wait_for(lambda: notify.times("STOPPING=1"), 2, "STOPPING=1")
        assert notify.times("STOPPING=1")[0] > ready_at
    finally:
        notify.close()


# ---- units -----------------------------------------------------------------------------------
def _record(msg: str, *args: object, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("agent.test", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_redaction_of_values_keys_urls_and_tracebacks() -> None:
    redactor = Redactor()
    redactor.add_secret("s3cr3t-Value")
    redactor.add_secret("ab")  # too short to redact blindly: ignored
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAKC\n-----END RSA PRIVATE KEY-----"
    text = TextFormatter(redactor)
    line = text.format(_record("broker said %s; key %s; password=hunter22 token: abc", "s3cr3t-Value", pem))
    assert "s3cr3t-Value" not in line and "MIIEow" not in line and "hunter22" not in line and "abc" not in line
    assert line.count("[REDACTED]") == 4
    assert "about tabs" in text.format(_record("about tabs"))
    assert "mqtts://edge:[REDACTED]@broker:8883" in text.format(_record("mqtts://edge:pw1234@broker:8883"))
    assert "check username and password_file" in text.format(_record("check username and password_file"))

    try:
        raise ValueError('bad {"password": "p@ss w0rd"} with s3cr3t-Value')
    except ValueError:
        record = _record("failed", level=logging.ERROR)
        record.exc_info = sys.exc_info()
    out = JsonFormatter(redactor).format(record)
    parsed = json.loads(out)
    assert "s3cr3t-Value" not in out and "p@ss w0rd" not in out
    assert "Traceback" in parsed["exc"] and "[REDACTED]" in parsed["exc"]


def test_repeat_filter_counts_suppressed_lines_per_key() -> None:
    now = [1000.0]
    limiter = RepeatFilter(window=60, burst=1, clock=lambda: now[0])
    assert limiter.filter(_record("device %s offline: %s", "m1", "timeout", device="m1"))
    for _ in range(57):
        now[0] += 1
        assert not limiter.filter(_record("device %s offline: %s", "m1", "timeout", device="m1"))
    assert limiter.filter(_record("device %s offline: %s", "m2", "timeout", device="m2"))  # another device
    assert limiter.filter(_record("device %s offline: %s", "m1", "x", level=logging.DEBUG, device="m1"))
    now[0] = 1060.0
    record = _record("device %s offline: %s", "m1", "timeout", device="m1")
    assert limiter.filter(record)
    assert record.getMessage() == "device m1 offline: timeout (repeated 57 times in the last 60 s)"
    assert json.loads(JsonFormatter(Redactor()).format(record))["repeated"] == 57
    now[0] += 1
    assert not limiter.filter(_record("device %s offline: %s", "m1", "timeout", device="m1"))
    burst = RepeatFilter(window=60, burst=3, clock=lambda: now[0])
    assert [burst.filter(_record("uplink lost")) for _ in range(5)] == [True, True, True, False, False]


def test_a_change_of_state_is_never_folded_only_repeats_of_the_same_state_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13: after a quick broker restart the log ended on "uplink down ... retrying" while
    delivery had resumed: the second "uplink connected" fell in the first one's 60 s window.

    The lines go through the real logging setup (setup_logging, production folding) from the
    uplink's and the device runner's loggers, with their templates and the state each passes.
    """
    monkeypatch.delenv(REPEAT_WINDOW_ENV, raising=False)
    monkeypatch.setenv(REPEAT_BURST_ENV, "1")
    out = io.StringIO()
    handler = setup_logging(stream=out, fmt="text")
    uplink, devices = logging.getLogger("agent.uplinks.mqtt.uplink"), logging.getLogger("agent.devices.runner")

    def up(state: str) -> dict[str, str]:  # what agent/uplinks/mqtt/uplink.py passes
        return {"subject": "uplink", "state": state}

    def dev(name: str, state: str) -> dict[str, str]:  # what agent/devices/runner.py passes
        return {"subject": f"device {name}", "state": state}

    try:
        uplink.info("uplink connected to %s:%d", "127.0.0.1", 1883, extra=up("connected"))
        for _ in range(3):  # a broker restarted three times within the minute
            uplink.warning("uplink lost: %s; buffering until it is back", "connection lost", extra=up("down"))
            uplink.warning(
                "uplink down: %s; retrying with backoff", "cannot connect to 127.0.0.1:1883: refused", extra=up("down")
            )
            uplink.warning("uplink down: %s; retrying with backoff", "no CONNACK from 127.0.0.1:1883", extra=up("down"))
            uplink.info("uplink connected to %s:%d", "127.0.0.1", 1883, extra=up("connected"))
        uplink.info("uplink: %s", "2 PUBACK(s) missing; reconnecting to send them again", extra=up("reconnecting"))
        uplink.info("uplink connected to %s:%d", "127.0.0.1", 1883, extra=up("connected"))
        with bound(device="flap-1", driver="virtual"):
            for _ in range(5):
                devices.info("device %s %s", "flap-1", "online", extra=dev("flap-1", "online"))
                devices.warning("device %s offline: %s", "flap-1", "simulated timeout", extra=dev("flap-1", "offline"))
            with bound(device="meter-2"):  # another device's changes are its own
                devices.warning("device %s offline: %s", "meter-2", "timeout", extra=dev("meter-2", "offline"))
            devices.info("device %s %s", "flap-1", "online", extra=dev("flap-1", "online"))
            devices.info(
                "device %s %s", "flap-1", "online", extra=dev("flap-1", "online")
            )  # the same state again: a repeat, folded
        for state in ("open", "closed", "open", "open"):  # any line can say it announces a state
            logging.getLogger("agent.test").info("valve %s", state, extra={"subject": "valve-1", "state": state})
    finally:
        logging.getLogger().removeHandler(handler)
    lines = out.getvalue().splitlines()
    said = [re.sub(r"^.*? (agent\.\S+): ", "", line) for line in lines]
    uplink_lines = [line for line in said if line.startswith("uplink")]
    assert uplink_lines[-2:] == ["uplink: 2 PUBACK(s) missing; reconnecting to send them again",
                                 "uplink connected to 127.0.0.1:1883"], said  # fmt: skip
    assert uplink_lines.count("uplink connected to 127.0.0.1:1883") == 5, said  # each reconnection
    # Each "lost" follows "connected": a change, written. "down" repeats the state "lost" began:
    # folded as before, once a minute (the first one is written, a line not seen before).
    assert sum(line.startswith("uplink lost") for line in uplink_lines) == 3, said
    assert sum(line.startswith("uplink down") for line in uplink_lines) == 1, said
    flap = [line for line in said if "flap-1" in line]
    assert len(flap) == 11 and flap[-1] == "device flap-1 online", said
    assert "device meter-2 offline: timeout" in said
    assert [line for line in said if line.startswith("valve")] == ["valve open", "valve closed", "valve open"]


def test_log_format_choice(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert choose_format(stream, journal) == "json"
        assert choose_format(stream, {**journal, "EDGE_AGENT_LOG_FORMAT": "text"}) == "text"
        assert choose_format(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) == "text"
        assert choose_format(stream, {"EDGE_AGENT_LOG_FORMAT": "json"}) == "json"
        assert choose_format(stream, {}) == "text"


def test_sd_notify_paths_and_watchdog_pid() -> None:
    assert Notifier.from_env({}) is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    name = f"edge-agent-unit-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert notifier is not None and notifier.watchdog_interval == 15.0
        assert notifier.ready("up")
        assert server.recv(100) == b"READY=1\nSTATUS=up"
        notifier.close()
    other = Notifier.from_env(
        {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert other is not None and other.watchdog_interval is None  # the watchdog is someone else's
    assert not other.status("nobody listens")  # never raises
    other.close()


@pytest.mark.parametrize(
    ("message", "label"),
    [
        ("DriverReadError: simulated timeout (fail_every)", "timeout"),
        ("cannot connect to 127.0.0.1:1883: [Errno 111] Connection refused", "connection_refused"),
        ("broker refused the connection: Not authorized (check username and password_file)", "not_authorized"),
        ("connection to 10.0.0.1:1883 closed (Unspecified error)", "connection_lost"),
        ("nothing from the broker for 46 s (link dead?)", "link_dead"),
        ("no PUBACK for 61 s; reconnecting to resend", "no_puback"),
        ("cannot connect to h:8883: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "tls"),
        ("exception 2 (illegal data address)", "device_exception"),
        ("no valid frame for 3.2s, only bad ones (crc 4)", "bad_checksum"),
        ("no data on /dev/ttyUSB0 for 3.0s", "no_data"),
        ("ZeroDivisionError: division by zero", "zero_division_error"),
        ("Something 42 odd happened here today", "something_odd_happened_here"),
    ],
)
def test_reasons_are_normalised(message: str, label: str) -> None:
    assert normalise_reason(message) == label


def test_temperature_prefers_the_cpu_zone(tmp_path: Path) -> None:
    assert temperature_c(str(tmp_path)) is None
    for n, (kind, milli) in enumerate([("gpu-thermal", "61000"), ("cpu-thermal", "48312"), ("broken", "x")]):
        zone = tmp_path / f"thermal_zone{n}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    assert temperature_c(str(tmp_path)) == pytest.approx(48.312)


def test_a_stuck_commit_thread_or_uplink_is_a_stall(tmp_path: Path) -> None:
    """The verdict behind /healthz and the watchdog, for the parts a test cannot hang for real.

    (A disk that stops answering, an uplink coroutine that hangs while connected.)
    """
    from agent.config.model import parse_config
    from agent.runtime.agent import Agent

    config = parse_config(
        "gateway: {id: gw-unit}\nobservability: {stall_after: 2s}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\nuplink: {{mqtt: {{keepalive: 5s}}}}\n",
        tmp_path / "site.yaml",
    )
    agent = Agent(config)
    live = agent.liveness
    now = time.monotonic()
    live.beat = now
    db, feed = agent.store.db, agent.store.main
    db.busy_op, feed.commits = "commit", 10
    live.running = True
    assert live.stalls() == {}

    db.busy_since = now - 2.5  # one commit has been running for 2.5 s: the disk stopped answering
    assert set(live.stalls()) == {"buffer"}
    ok, details = live.readiness()
    assert not ok and details["checks"]["buffer_writable"] is False
    db.busy_since = None
    feed.last_commit_ok, feed.last_commit_error = False, "OperationalError: disk I/O error"
    ok, details = live.readiness()
    assert not ok and details["buffer_error"] == "OperationalError: disk I/O error"
    assert live.stalls() == {}  # a failed commit is not a stuck one
    feed.last_commit_ok = True

    agent.uplinks.main.uplink.status.connected = True
    live.progress_at["mqtt"] = now - 20  # > stall_after + 2 x keepalive (12 s) without progress
    live.commits_at_progress["mqtt"] = 10
    assert live.stalls() == {}  # nothing committed since: nothing to send, an idle link is fine
    feed.commits = 11
    assert set(live.stalls()) == {"uplink"}
    live.progress_at["mqtt"] = now - 5
    assert live.stalls() == {}
    live.beat = now - 3
    assert set(live.stalls()) == {"event_loop"}
    live, body = agent.liveness.liveness()
    assert not live and "event_loop" in body["stalls"]
