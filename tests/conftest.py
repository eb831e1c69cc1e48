"""Real parts for the tests: a Mosquitto broker on a free port, a counting subscriber, the agent."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devices.api import DriverContext

ROOT = Path(__file__).resolve().parent.parent


# pytest-xdist workers (./dev test runs four) each take the free ports of their own residue class,
# so two workers never pick the same port between finding it and binding it. Linux hands bind()
# ports of one parity (connect() gets the other), hence the class of port // 2, not of port.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def free_port() -> int:
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if (port >> 1) % _WORKERS == _WORKER:
            return port
    raise RuntimeError("no free port of this worker's class")


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """One test process at a time (xdist workers, parallel runs) for a shared set-up step."""
    folder = Path(tempfile.gettempdir()) / "edge-agent-test-locks"
    folder.mkdir(exist_ok=True)
    with (folder / f"{name}.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        pytest.fail("mosquitto is not installed: run ./dev test (it installs it) or apt-get install mosquitto")
    return found


# As root, mosquitto drops to user `mosquitto`, which can neither read the test's files nor
# write its persistence (the subscriber's queued messages) into the test's folder.
KEEP_USER = "user root\n" if os.geteuid() == 0 else ""


class Mosquitto:
    """A real broker process on a fixed port that tests can stop and start again.

    Persistence is on so a subscriber's queued QoS 1 messages survive a (graceful) restart;
    that keeps broker-side loss out of measurements of the agent's delivery.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "log_dest none\n" + KEEP_USER
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

        def accepting() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            assert self.proc is not None and self.proc.poll() is None, (
                self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""
            )
            return False

        wait_for(accepting, 10, "mosquitto to accept connections")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def _is_availability(topic: str) -> bool:
    """``{prefix}/{gateway}/status`` (device status events are one level deeper)."""
    return topic.endswith("/status") and topic.count("/") == 3  # prefix ioc/v1 in the tests


class Subscriber:
    """An independent counting subscriber: every (device, seq) received, with duplicates."""

    def __init__(self, port: int, topic: str = "#", *, client_id: str | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.topics: list[str] = []
        self.raw: list[tuple[str, bytes, bool]] = []
        self.garbage: list[bytes] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        cid = client_id or f"test-sub-{os.getpid()}-{time.monotonic_ns()}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.topic = topic
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_for(self.connected.is_set, 10, "subscriber to connect")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self.topic, qos=1)
        self.connected.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.raw.append((msg.topic, msg.payload, msg.retain))
            if _is_availability(msg.topic):
                return
            try:
                decoded = json.loads(msg.payload)
            except ValueError:
                self.garbage.append(msg.payload)  # the tests assert there is none
                return
            batch = decoded if isinstance(decoded, list) else [decoded]  # CloudEvents batch format
            self.events += batch
            self.topics += [msg.topic] * len(batch)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def seqs(self, device: str, event_type: str | None = None) -> list[int]:
        return [
            e["seq"]
            for e in self.snapshot()
            if e["device"] == device and (event_type is None or e["type"] == event_type)
        ]

    def report(self, device: str) -> dict[str, Any]:
        """Loss and duplicates over the device's whole sequence; order within each type.

        Order is promised per device within a delivery class: a status event (class alarm)
        may overtake a backlog of readings (class telemetry) after an outage.
        """
        report = analyse(self.seqs(device))
        types = {e["type"] for e in self.snapshot() if e["device"] == device}
        report["inversions"] = sum(analyse(self.seqs(device, t))["inversions"] for t in types)
        return report

    def wait_for_all(self, upto: dict[str, int], timeout: float) -> None:
        """Wait until every seq 1..upto[device] arrived; name the missing ones if not."""

        def done() -> bool:
            return all(set(range(1, upto[d] + 1)) <= set(self.seqs(d)) for d in upto)

        try:
            wait_for(done, timeout, "every seq")
        except AssertionError:
            missing = {d: sorted(set(range(1, upto[d] + 1)) - set(self.seqs(d)))[:20] for d in upto}
            raise AssertionError(f"not received within {timeout}s (first 20 missing): {missing}") from None

    def wait_quiet(self, quiet: float = 1.0, timeout: float = 30) -> None:
        """Wait until nothing new arrived for ``quiet`` seconds: the broker has handed over what it holds
        (on a loaded machine the subscriber may trail the PUBACKs the agent got by seconds)."""
        deadline = time.monotonic() + timeout
        count, since = len(self.raw), time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, f"still receiving after {timeout}s"
            time.sleep(0.05)
            if len(self.raw) != count:
                count, since = len(self.raw), time.monotonic()

    def status_payloads(self) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.raw if _is_availability(t)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber_factory() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(port: int, topic: str = "#", **kw: Any) -> Subscriber:
        s = Subscriber(port, topic, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
    garbage = [g[:80] for s in made for g in s.garbage]
    assert not garbage, f"payloads that are not JSON reached the broker: {garbage}"


def analyse(seqs: list[int]) -> dict[str, Any]:
    """Lost, duplicated and out-of-order counts of one device's received sequence numbers."""
    seen: set[int] = set()
    firsts: list[int] = []
    for s in seqs:
        if s not in seen:
            firsts.append(s)
            seen.add(s)
    top = max(seen) if seen else 0
    return {
        "max": top,
        "lost": sorted(set(range(1, top + 1)) - seen),
        "duplicates": len(seqs) - len(seen),
        "inversions": sum(1 for a, b in itertools.pairwise(firsts) if b < a),
        "inverted_at": [(a, b) for a, b in itertools.pairwise(firsts) if b < a][:5],
    }


def last_seqs(buffer: Path) -> dict[str, int]:
    """Last seq given to each device, read from the agent's buffer without locking it."""
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT device, seq FROM sequences").fetchall())
    finally:
        db.close()


def buffer_counters(buffer: Path) -> dict[str, int]:
    """The buffer's accounting counters, read without locking it."""
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT name, value FROM counters").fetchall())
    finally:
        db.close()


def write_config(
    path: Path,
    *,
    port: int,
    devices: str,
    buffer: Path | None = None,
    extra: str = "",
    max_bytes: str = "64MiB",
    health: str = "60s",
) -> Path:
    path.write_text(
        f"gateway: {{id: gw-test, site: lab, health_interval: {health}}}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1, keepalive: 5s,"
        " reconnect_min: 200ms, reconnect_max: 1s}\n"
        f"buffer: {{path: {buffer or path.parent / 'buffer.db'}, max_bytes: {max_bytes}}}\n"
        f"{extra}"
        "devices:\n"
        f"{devices}"
    )
    return path


class AgentProcess:
    """``edge-agent run`` as a real process, as systemd would run it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.log = self.log_path.open("ab")
        # Tests read the agent's log as a probe (reconnects, drops); the production limit of one
        # line per repeated fault per minute would hide what they look for. The rate limit has
        # its own test, which sets these variables itself.
        env = dict(os.environ)
        env.setdefault("EDGE_AGENT_LOG_REPEAT_BURST", "1000")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.wait_handles(sig)
        self.proc.send_signal(sig)

    def wait_handles(self, sig: int, timeout: float = 30) -> None:
        """Wait until the agent catches ``sig`` (its handlers are installed once it runs): sent
        earlier, on a loaded machine still importing, it would kill the process outright."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status")

        def caught() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return True  # exited: the caller's wait() says how
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            return bool(int(fields["SigCgt"], 16) >> (sig - 1) & 1)

        wait_for(caught, timeout, f"the agent to handle signal {sig}")

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[[Path], AgentProcess]]:
    made: list[AgentProcess] = []

    def make(config: Path) -> AgentProcess:
        a = AgentProcess(config, tmp_path / f"agent-{len(made)}.log")
        made.append(a)
        return a.start()

    yield make
    for a in made:
        a.kill()


class Recorder(DriverContext):
    """The runtime's side of a driver in a test: what the driver reported, in order."""

    def __init__(self, device_id: str = "device") -> None:
        self.device_id = device_id
        self.outcomes: list[str] = []

    def poll_ok(self) -> None:
        self.outcomes.append("ok")

    def poll_failed(self, reason: str) -> None:
        self.outcomes.append(reason)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB file system (tmpfs), so the disk, not ``max_bytes``, is the limit."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
