"""The page inside a real agent process: first-start token, password, live status, a fault in words,
the diagnostics bundle without secrets, the CLI beside the running agent, and SIGTERM."""

from __future__ import annotations

import http.client
import io
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from agent.tools.cli import main
from tests.conftest import ROOT, AgentProcess, Mosquitto, free_port, wait_for
from tests.ui.site import HEADERS, MISSING_PORT, MQTT_SECRET, first_token, start_agent, wait_listening, write_site

PASSWORD = "site-password-7d2e"  # noqa: S105 - the test's own


class Running:
    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        self.folder = folder
        self.config, self.port = write_site(folder, broker)
        self.agent: AgentProcess = start_agent(folder, self.config)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_listening(self.port)

    def client(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, headers=HEADERS, timeout=15)

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
        """``edge-agent ui ...`` beside the running agent (in this process: the CLI's own entry point)."""
        code = main(["ui", *args, "-c", str(self.config)])
        return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("ui-agent")
    broker = Mosquitto(folder)
    broker.start()
    running = Running(folder, broker)
    try:
        yield running
    finally:
        running.agent.kill()
        broker.stop()


def _status(client: httpx2.Client) -> dict[str, Any]:
    r = client.get("/api/status")
    assert r.status_code == 200, r.text
    return r.json()


def test_first_start_token_then_password_then_live_status_and_a_fault(site: Running) -> None:
    url, token = first_token(site.agent)
    assert url == site.url + "/"
    with site.client() as c:
        assert c.get("/api/status").status_code == 401
        assert c.post("/api/setup", json={"token": token}).status_code == 200
        assert c.post("/api/password", json={"password": PASSWORD}).status_code == 200

        def meter_values() -> dict[str, Any] | None:
            devices = {d["id"]: d for d in _status(c)["devices"]}
            return devices if devices["meter-1"]["points"] and devices["meter-2"]["fault"] else None

        devices = wait_for(meter_values, 15, "a virtual reading and the Modbus fault")
        point = devices["meter-1"]["points"][0]
        assert point["quality"] == "good" and isinstance(point["age_s"], float) and point["age_s"] < 5
        fault = devices["meter-2"]["fault"]
        assert devices["meter-2"]["status"] != "online"
        assert fault["cause"] == f"the port {MISSING_PORT} does not exist"
        assert "/dev/serial/by-id" in fault["fix"]
        figures = _status(c)
        assert figures["uplinks"][0]["name"] == "mqtt"
        events = c.get("/api/preview/meter-1").json()["events"]
        reading = next(e for e in events if e["type"] == "city.meter.reading")
        assert reading["verdict"] == "valid" and reading["event"]["source"] == "/gateways/gw-ui/devices/meter-1"
        assert c.get("/api/preview/no-such-meter").status_code == 404
        assert figures["disk"]["free_bytes"] > 0 and figures["buffer"]["max_bytes"] > 0
    # The token was good once.
    with site.client() as other:
        assert other.post("/api/setup", json={"token": token}).status_code == 403
    log = site.agent.output()
    assert "ui: device password set by technician" in log and PASSWORD not in log


def test_the_event_stream_sends_live_values(site: Running) -> None:
    with site.client() as c:
        assert c.post("/api/login", json={"password": PASSWORD}).status_code == 200
        seen: list[float] = []
        started = time.monotonic()
        with c.stream("GET", "/api/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    seen.append(time.monotonic())
                if len(seen) == 3:
                    break
        # At most 5 a second, and steadily: three updates in 0.4 s or more, within a few seconds.
        assert 0.4 <= seen[-1] - seen[0] < 5 and seen[-1] - started < 10


def test_a_kept_alive_connection_answers_without_the_nagle_wait(site: Running) -> None:
    # Without TCP_NODELAY on the page's socket each answer on a reused connection waited ~40 ms.
    connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=5)
    started = time.monotonic()
    for _ in range(10):
        connection.request("GET", "/api/session")
        response = connection.getresponse()
        assert response.status == 200 and response.read()
    took = time.monotonic() - started
    connection.close()
    assert took < 0.3, f"10 requests took {took:.3f} s"


def test_the_bundle_is_small_quick_and_carries_no_secret(site: Running) -> None:
    _url, token = first_token(site.agent)
    with site.client() as c:
        assert c.post("/api/login", json={"password": PASSWORD}).status_code == 200
        started = time.monotonic()
        r = c.get("/api/bundle")
        took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].startswith("attachment")
    assert len(r.content) <= 5_000_000 and took <= 10
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert {"config.json", "logs.txt", "versions.json", "metrics.txt", "doctor.json"} <= set(members)
    assert b"gw-ui" in members["config.json"]
    for name, data in members.items():
        for secret in (MQTT_SECRET, PASSWORD, token):
            assert secret.encode() not in data, f"{secret[:8]}... leaked into {name}"
    assert "downloaded by technician: ok" in site.agent.output()


def test_the_cli_gives_a_new_token_and_resets_the_password(site: Running, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = site.cli(capsys, "info")
    assert code == 0 and f"url: {site.url}/" in out and "password: set" in out
    code, out = site.cli(capsys, "token")
    assert code == 0
    assert "\u2580" in out or "\u2584" in out  # half blocks: the terminal QR code
    token = out.split("setup token: ", 1)[1].split()[0]
    assert f"open: {site.url}/#setup={token}" in out
    with site.client() as c:
        assert c.post("/api/setup", json={"token": token}).status_code == 200
        assert c.get("/api/status").status_code == 403  # a new password first
    code, out = site.cli(capsys, "reset")
    assert code == 0
    new = out.split("new device password: ", 1)[1].split()[0]
    with site.client() as c:
        assert c.post("/api/login", json={"password": PASSWORD}).status_code == 401
        assert c.post("/api/login", json={"password": new}).status_code == 200


def test_sigterm_runs_the_agents_shutdown_with_the_page_on(site: Running) -> None:
    before = len(site.agent.output())
    site.agent.signal(signal.SIGTERM)
    assert site.agent.wait(8) == 0
    log = site.agent.output()[before:]
    assert "agent stopped in" in log and "Traceback" not in log and "ERROR" not in log
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", site.port), 0.5):
        pass


PROBE = """
import asyncio, sys
from pathlib import Path
from agent.config.model import load_config
from agent.runtime.agent import Agent

async def main() -> None:
    agent = Agent(load_config(Path(sys.argv[1])))
    async def stop_when_running() -> None:
        while not agent.status.running:
            await asyncio.sleep(0.02)
        agent.request_stop()
    task = asyncio.get_running_loop().create_task(stop_when_running())
    await agent.run()
    await task

asyncio.run(main())
print("done:" + ",".join(m for m in ("starlette", "uvicorn", "agent.ui.server") if m in sys.modules))
"""


def _probe(folder: Path, enabled: bool, port: int) -> tuple[str, str]:
    """Run an agent in a fresh interpreter until it runs, stop it; (modules it loaded, its log)."""
    config = folder / "site.yaml"
    config.write_text(
        "gateway: {id: gw-probe}\n"
        "uplink: {mqtt: {host: 127.0.0.1, port: 1, reconnect_min: 200ms}}\n"
        f"buffer: {{path: {folder / 'buffer.db'}}}\n"
        f'ui: {{enabled: {str(enabled).lower()}, listen: "127.0.0.1:{port}"}}\n'
        "devices: [{id: meter-1, driver: virtual, kind: meter}]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], done.stderr


def test_starlette_and_uvicorn_are_not_imported_with_the_page_off(tmp_path: Path) -> None:
    # With the page on they are (the agent above serves it); the probe prints what it finds, so
    # a page left on by mistake shows here as "starlette,uvicorn,agent.ui.server".
    loaded, _log = _probe(tmp_path, False, free_port())
    assert loaded == "done:"


def test_a_busy_port_leaves_the_agent_running_without_the_page(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        loaded, log = _probe(tmp_path, True, holder.getsockname()[1])
    assert loaded.startswith("done:starlette")
    assert "ui.listen: cannot listen on 127.0.0.1:" in log and "running without the page" in log
    assert "Traceback" not in log.split("ui.listen: cannot listen", 1)[1]
