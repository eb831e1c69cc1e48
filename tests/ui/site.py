"""A site with the technician page on: a virtual meter, a Modbus meter on a missing port, a real broker."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2

from tests.conftest import AgentProcess, Mosquitto, free_port, wait_for

MISSING_PORT = "/dev/serial/by-id/usb-FTDI_missing-adapter-if00-port0"
MQTT_SECRET = "planted-mqtt-S3cret-4c1b9e"  # noqa: S105 - a secret the bundle must not carry
TOKEN_LINE = re.compile(r"open (http://[^ #]+)#setup=([A-Za-z0-9_-]+) within")
HEADERS = {"X-Edge-Agent": "1"}


def write_site(folder: Path, broker: Mosquitto) -> tuple[Path, int]:
    """The site file and the page's port."""
    port = free_port()
    secret = folder / "mqtt.pass"
    secret.write_text(MQTT_SECRET + "\n")
    secret.chmod(0o600)
    config = folder / "site.yaml"
    config.write_text(
        "gateway: {id: gw-ui, site: lab}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1, username: tech,"
        f" password_file: {secret}, reconnect_min: 200ms, reconnect_max: 1s}}\n"
        f"buffer: {{path: {folder / 'var' / 'buffer.db'}}}\n"
        f'ui: {{enabled: true, listen: "127.0.0.1:{port}"}}\n'
        "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms}\n"
        "  - id: meter-2\n"
        "    driver: modbus\n"
        "    transport: rtu\n"
        f"    serial: {{port: {MISSING_PORT}, baudrate: 9600}}\n"
        "    profile: eastron-sdm630\n"
        "    interval: 500ms\n"
        "    timeout: 200ms\n"
    )
    return config, port


def start_agent(folder: Path, config: Path) -> AgentProcess:
    return AgentProcess(config, folder / "agent.log").start()


def first_token(agent: AgentProcess) -> tuple[str, str]:
    """(page URL, setup token) from the agent's first-start log line."""
    found = wait_for(lambda: TOKEN_LINE.search(agent.output()), 20, "the setup token in the agent's log")
    return found.group(1), found.group(2)


def wait_listening(port: int) -> None:
    def up() -> bool:
        try:
            return httpx2.get(f"http://127.0.0.1:{port}/api/session", timeout=0.5).status_code == 200
        except httpx2.HTTPError:
            return False

    wait_for(up, 20, "the page to answer")


def signed_in(agent: AgentProcess, port: int, password: str, timeout: float = 15) -> httpx2.Client:
    """A client of the page once it answers, past its first start: the setup token from the
    agent's log taken and ``password`` set."""
    wait_listening(port)
    _, token = first_token(agent)
    client = httpx2.Client(base_url=f"http://127.0.0.1:{port}", headers=HEADERS, timeout=timeout)
    assert client.post("/api/setup", json={"token": token}).status_code == 200
    assert client.post("/api/password", json={"password": password}).status_code == 200
    return client
