"""The uplink check's steps (agent/tools/doctor/steps.py, the MQTT plugin's ``checker``) against real
Mosquitto brokers: plain, TLS, with accounts (a refused login), an unresolvable host and a closed
port. Each failure stops at its step, with the cause and the fix; the later steps are skipped, saying why."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from agent.tools.doctor.steps import check_uplink
from agent.uplinks.mqtt.config import MqttConfig
from tests.conftest import KEEP_USER, Mosquitto, Subscriber, free_port, mosquitto_binary, wait_for
from tests.runtime.test_security import SecureBroker

GATEWAY = "gw-steps"
TIMEOUT = 3.0
ACCOUNT_PASSWORD = "uplink-steps-pass-81c2"  # noqa: S105 - the test broker's account


class Brokers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "plain").mkdir()
        (folder / "tls").mkdir()
        self.plain = Mosquitto(folder / "plain")
        self.tls = SecureBroker(folder / "tls", trustme.CA())
        self.auth_port = free_port()
        accounts = folder / "accounts"
        accounts.write_text(f"gw:{ACCOUNT_PASSWORD}\n")
        passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        subprocess.run([passwd, "-U", str(accounts)], check=True)
        conf = folder / "auth.conf"
        conf.write_text(
            f"listener {self.auth_port} 127.0.0.1\nallow_anonymous false\npassword_file {accounts}\nlog_dest none\n"
            + KEEP_USER
        )
        self.auth = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.plain.stop()
        self.tls.stop()
        self.auth.terminate()
        self.auth.wait(10)


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    running = Brokers(tmp_path_factory.mktemp("uplink-steps"))
    try:
        running.plain.start()
        running.tls.start()
        yield running
    finally:
        running.stop()


def _check(**settings: Any) -> dict[str, Any]:
    return check_uplink(MqttConfig.model_validate(settings), GATEWAY, TIMEOUT)


def _steps(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in result["steps"]}


def _statuses(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["status"]) for s in result["steps"]]


def test_plain_broker_every_step_and_the_test_message_arrives(brokers: Brokers) -> None:
    watcher = Subscriber(brokers.plain.port, "ioc/v1/+/test")
    try:
        result = _check(host="127.0.0.1", port=brokers.plain.port)
        expected = [("DNS", "ok"), ("TCP", "ok"), ("TLS", "skip"), ("CONNACK", "ok"), ("publish", "ok")]
        assert _statuses(result) == expected
        assert result["ok"] is True and result["target"] == f"127.0.0.1:{brokers.plain.port}"
        steps = _steps(result)
        assert steps["DNS"]["detail"] == "127.0.0.1 is an address: no lookup"
        assert steps["CONNACK"]["detail"] == "Success (MQTT 3.1.1, anonymous)"
        assert steps["publish"]["detail"] == f"PUBACK for QoS 1 on ioc/v1/{GATEWAY}/test"
        assert all(isinstance(s["ms"], float) and s["ms"] >= 0 for s in result["steps"] if s["status"] == "ok")
        wait_for(lambda: watcher.raw, 5, "the test message")
        topic, payload, retained = watcher.raw[0]
        assert (topic, retained) == (f"ioc/v1/{GATEWAY}/test", False)
        assert json.loads(payload)["check"] == "uplink"
    finally:
        watcher.client.loop_stop()
        watcher.client.disconnect()


def test_tls_broker_by_name_with_its_ca(brokers: Brokers) -> None:
    ca = brokers.folder / "tls" / "ca.pem"
    result = _check(host="localhost", port=brokers.tls.port, protocol="5", tls={"ca_file": str(ca)})
    assert [s for _n, s in _statuses(result)] == ["ok"] * 5, result
    steps = _steps(result)
    assert "127.0.0.1" in steps["DNS"]["detail"] and "certificate verified for localhost" in steps["TLS"]["detail"]
    assert steps["CONNACK"]["detail"].startswith("Success (MQTT 5")


def test_tls_broker_with_another_ca_fails_at_tls(brokers: Brokers) -> None:
    other = brokers.folder / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    result = _check(host="localhost", port=brokers.tls.port, tls={"ca_file": str(other)})
    assert _statuses(result)[2:] == [("TLS", "fail"), ("CONNACK", "skip"), ("publish", "skip")]
    tls = _steps(result)["TLS"]
    assert tls["cause"].startswith("certificate not accepted: ") and "uplink.mqtt.tls.ca_file" in tls["fix"]
    assert _steps(result)["CONNACK"]["detail"] == "not tried: the TLS handshake failed"


def test_refused_login_fails_at_connack_with_the_reason(brokers: Brokers) -> None:
    wait_for(lambda: brokers.auth.poll() is None and _reachable(brokers.auth_port), 10, "the accounts broker")
    secret = brokers.folder / "wrong-password"
    secret.write_text("not-the-password\n")
    result = _check(host="127.0.0.1", port=brokers.auth_port, username="gw", password_file=str(secret))
    assert _statuses(result)[3:] == [("CONNACK", "fail"), ("publish", "skip")] and result["ok"] is False
    connack = _steps(result)["CONNACK"]
    assert connack["cause"] == "the broker refused CONNECT: Not authorized"
    assert "uplink.mqtt.username / password_file" in connack["fix"]
    assert "not-the-password" not in json.dumps(result)
    secret.write_text(ACCOUNT_PASSWORD + "\n")
    fixed = _check(host="127.0.0.1", port=brokers.auth_port, username="gw", password_file=str(secret))
    assert _statuses(fixed)[3:] == [("CONNACK", "ok"), ("publish", "ok")]
    assert _steps(fixed)["CONNACK"]["detail"] == "Success (MQTT 3.1.1, user gw)"


def test_unresolvable_host_fails_at_dns(brokers: Brokers) -> None:
    result = _check(host="broker.invalid", port=1883, tls={"enabled": False})
    assert _statuses(result) == [("DNS", "fail")] + [(n, "skip") for n in ("TCP", "TLS", "CONNACK", "publish")]
    dns = _steps(result)["DNS"]
    assert dns["cause"].startswith("cannot resolve broker.invalid: ") and "uplink.mqtt.host" in dns["fix"]
    assert _steps(result)["TCP"]["detail"] == "not tried: no address for the broker"


def test_closed_port_fails_at_tcp(brokers: Brokers) -> None:
    port = free_port()
    result = _check(host="127.0.0.1", port=port)
    assert _statuses(result)[:2] == [("DNS", "ok"), ("TCP", "fail")] and result["ok"] is False
    tcp = _steps(result)["TCP"]
    assert tcp["cause"] == f"127.0.0.1 port {port}: Connection refused"
    assert tcp["fix"].startswith("start the broker or point uplink.mqtt.port at the port it listens on (usually 1883")
    assert {s["status"] for s in result["steps"][2:]} == {"skip"}


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True
