"""Uplink security against a real Mosquitto: verified TLS, mutual TLS, passwords never logged."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.conftest import KEEP_USER, Mosquitto, free_port, mosquitto_binary, wait_for, write_config

METER = "  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
PASSWORD = "correct horse battery staple"  # noqa: S105 - a test broker's password


class SecureBroker(Mosquitto):
    """Mosquitto with a TLS listener, optionally requiring client certificates."""

    def __init__(
        self,
        workdir: Path,
        ca: trustme.CA,
        *,
        require_cert: bool = False,
        names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    ) -> None:
        super().__init__(workdir)
        ca.issue_cert(*names).private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
        ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {workdir / 'ca.pem'}\n"
            f"certfile {workdir / 'server.pem'}\n"
            f"keyfile {workdir / 'server.pem'}\n"
            f"require_certificate {'true' if require_cert else 'false'}\n"
            "allow_anonymous true\n"
            "log_dest none\n" + KEEP_USER
        )


def _site(tmp_path: Path, port: int, mqtt_extra: str, host: str = "localhost") -> Path:
    config = write_config(tmp_path / "site.yaml", port=port, devices=METER)
    text = config.read_text().replace("host: 127.0.0.1", f"host: {host}")
    config.write_text(text.replace("reconnect_max: 1s}", f"reconnect_max: 1s, {mqtt_extra}}}"))
    return config


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def test_tls_with_the_right_ca_connects(tmp_path: Path, ca: trustme.CA, agent_factory) -> None:
    broker = SecureBroker(tmp_path, ca)
    broker.start()
    try:
        agent = agent_factory(_site(tmp_path, broker.port, f"tls: {{ca_file: {tmp_path / 'ca.pem'}}}"))
        wait_for(lambda: "uplink connected" in agent.output(), 15, "a verified TLS connection")
        agent.signal(signal.SIGTERM)
        assert agent.wait(5) == 0
    finally:
        broker.stop()


def test_tls_refuses_a_broker_signed_by_another_ca(tmp_path: Path, ca: trustme.CA, agent_factory) -> None:
    broker = SecureBroker(tmp_path, ca)
    broker.start()
    try:
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        agent = agent_factory(_site(tmp_path, broker.port, f"tls: {{ca_file: {tmp_path / 'other-ca.pem'}}}"))
        wait_for(lambda: "certificate verify failed" in agent.output(), 15, "the verification failure in the log")
        assert "uplink connected" not in agent.output()
        assert agent.proc is not None
        assert agent.proc.poll() is None  # keeps buffering and retrying, no crash loop
    finally:
        broker.stop()


def test_tls_refuses_a_certificate_for_another_host_name(tmp_path: Path, ca: trustme.CA, agent_factory) -> None:
    broker = SecureBroker(tmp_path, ca, names=("broker.example.org",))  # not localhost
    broker.start()
    try:
        agent = agent_factory(_site(tmp_path, broker.port, f"tls: {{ca_file: {tmp_path / 'ca.pem'}}}"))
        wait_for(lambda: "uplink down" in agent.output(), 15, "a refused connection")
        assert "Hostname mismatch" in agent.output(), agent.output()
        assert "uplink connected" not in agent.output()
    finally:
        broker.stop()


def test_mutual_tls_needs_the_client_certificate(tmp_path: Path, ca: trustme.CA, agent_factory) -> None:
    broker = SecureBroker(tmp_path, ca, require_cert=True)
    broker.start()
    try:
        client = ca.issue_cert("gw-test")
        client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
        client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        first = agent_factory(_site(tmp_path, broker.port, f"tls: {{ca_file: {tmp_path / 'ca.pem'}}}"))
        wait_for(lambda: "uplink down" in first.output(), 15, "refusal without a client certificate")
        first.kill()
        assert "uplink connected" not in first.output()
        tls = (
            f"tls: {{ca_file: {tmp_path / 'ca.pem'}, cert_file: {tmp_path / 'client.crt'},"
            f" key_file: {tmp_path / 'client.key'}}}"
        )
        second = agent_factory(_site(tmp_path, broker.port, tls))
        wait_for(lambda: "uplink connected" in second.output(), 15, "a mutual TLS connection")
    finally:
        broker.stop()


def test_password_auth_and_the_password_never_reaches_the_log(tmp_path: Path, agent_factory) -> None:
    passwords = tmp_path / "passwd"
    passwords.write_text(f"gw-test:{PASSWORD}\n")
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-U", str(passwords)], check=True)
    port = free_port()
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\nlog_dest none\n" + KEEP_USER
    )
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        secret = tmp_path / "mqtt-password"
        secret.write_text("wrong password\n")
        config = _site(tmp_path, port, f"username: gw-test, password_file: {secret}", host="127.0.0.1")
        wrong = agent_factory(config)
        wait_for(lambda: "refused" in wrong.output(), 15, "the broker's refusal")
        assert "uplink connected" not in wrong.output()
        wrong.kill()
        secret.write_text(PASSWORD + "\n")
        right = agent_factory(config)
        wait_for(lambda: "uplink connected" in right.output(), 15, "an authenticated connection")
        right.signal(signal.SIGTERM)
        right.wait(5)
        for log in (wrong.output(), right.output()):
            assert PASSWORD not in log
            assert "wrong password" not in log
    finally:
        proc.terminate()
        proc.wait(5)


def test_run_logs_the_config_warnings_at_start(tmp_path: Path, agent_factory) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o644)
    agent = agent_factory(_site(tmp_path, free_port(), f"username: gw-test, password_file: {secret}", "127.0.0.1"))
    wait_for(lambda: "running" in agent.output(), 15, "the agent running")
    warning = next(line for line in agent.output().splitlines() if "permissions" in line)
    assert "WARNING" in warning
    assert warning.endswith(
        f"{tmp_path / 'site.yaml'}: uplink.mqtt.password_file: permissions 0644 for '{secret}' are too open; "
        f"chmod 600 {secret}"
    )
    assert PASSWORD not in agent.output()
    agent.signal(signal.SIGTERM)
    assert agent.wait(5) == 0
