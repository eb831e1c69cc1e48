"""``edge-agent doctor`` against real parts: Mosquitto (plain, TLS, passwords), a Modbus simulator, ptys."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from agent.store.outbox import Outbox, Record
from agent.tools.doctor import (
    MIN_FREE_BYTES,
    Denied,
    Row,
    ServiceUser,
    access_fix,
    certificate_row,
    check_buffer_file,
    check_clock,
    check_config,
    check_device_file,
    check_model_manifest,
    clock_row,
    space_row,
)
from tests.conftest import KEEP_USER, ROOT, AgentProcess, free_port, mosquitto_binary, wait_for, write_config
from tests.runtime.test_security import SecureBroker

ME = pwd.getpwuid(os.geteuid()).pw_name
VIRTUAL = "  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
KEYS = {"check", "target", "verdict", "finding", "fix"}


def modbus(port: int) -> str:
    return (
        f"  - {{id: sdm-1, driver: modbus, host: 127.0.0.1, port: {port}, unit: 1, profile: eastron-sdm630,"
        " timeout: 500ms}\n"
    )


def doctor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m agent.tools.doctor`` as a technician runs it (a fresh process, real output)."""
    return subprocess.run([sys.executable, "-m", "agent.tools.doctor", "-c", str(config), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)  # fmt: skip


def doctor_json(config: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    done = doctor(config, "--json", "--timeout", "3", *args)
    rows = json.loads(done.stdout)
    assert all(set(r) == KEYS for r in rows), rows
    return done.returncode, rows


def only(rows: list[dict[str, Any]], check: str, target: str = "") -> dict[str, Any]:
    found = [r for r in rows if r["check"] == check and target in r["target"]]
    assert len(found) == 1, (check, target, rows)
    return found[0]


def fails(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["verdict"] == "FAIL"]


@pytest.fixture
def meter_simulator() -> Iterator[int]:
    """``edge-agent simulate modbus`` serving an Eastron SDM630 on a free TCP port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630",
                             "--tcp", f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or "serving" not in lines[-1]:
        lines.append(proc.stdout.readline())
        assert lines[-1], f"the simulator exited: {''.join(lines)}"
    yield port
    proc.terminate()
    proc.wait(5)


# ---- end to end -------------------------------------------------------------------------------


def test_a_healthy_gateway_passes_every_check(tmp_path: Path, broker, meter_simulator: int) -> None:
    buffer = tmp_path / "var" / "buffer.db"
    config = write_config(tmp_path / "site.yaml", port=broker.port, buffer=buffer,
                          devices=VIRTUAL + modbus(meter_simulator))  # fmt: skip
    with Outbox(buffer, 1 << 20) as outbox:  # three events waiting for the uplink
        outbox.append([Record("meter-1", "city.meter.reading", 2, n, "ioc/v1/x", b"{}", 1.7e9 + n) for n in (1, 2, 3)])
    before = sorted(p.name for p in buffer.parent.iterdir())

    code, rows = doctor_json(config, "--user", ME)
    assert code == 0, rows
    # The container's kernel clock is not NTP-disciplined (adjtimex says so): a warning, never a failure.
    assert only(rows, "clock")["verdict"] in ("ok", "warn")
    assert "synchronised" in only(rows, "clock")["finding"]
    assert [r for r in rows if r["verdict"] != "ok" and r["check"] != "clock"] == []
    assert "gateway gw-test, 2 devices" in only(rows, "config")["finding"]
    assert "connected" in only(rows, "broker", "tcp")["finding"]
    assert "CONNACK Success" in only(rows, "broker", "mqtt")["finding"]
    assert only(rows, "buffer", str(buffer))["finding"].startswith("quick_check ok")
    assert "3 events buffered" in only(rows, "buffer", str(buffer))["finding"]
    assert only(rows, "models")["finding"] == "no models configured"
    assert "4 values (active_energy=" in only(rows, "device", "meter-1")["finding"]
    assert "voltage L1=" in only(rows, "device", "sdm-1")["finding"]
    # Read-only: no -wal/-shm left behind (owned by root, they would lock the agent out).
    assert sorted(p.name for p in buffer.parent.iterdir()) == before
    assert not [name for name in before if name.endswith(("-wal", "-shm"))]

    table = doctor(config, "--user", ME)
    assert table.returncode == 0, table.stdout + table.stderr
    lines = table.stdout.splitlines()
    assert lines[2].split() == ["CHECK", "TARGET", "VERDICT", "FINDING"]
    assert lines[-1].startswith("all checks passed"), table.stdout
    assert any(line.startswith("device ") and "sdm-1 (modbus)" in line and " ok " in line for line in lines)


def test_the_running_agent_gives_its_own_verdict(tmp_path: Path, broker) -> None:
    """With observability.listen, doctor reads the agent's status model through /healthz and /readyz."""
    port = free_port()
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=VIRTUAL,
                          extra=f"observability: {{listen: '127.0.0.1:{port}'}}\n")  # fmt: skip
    _code, rows = doctor_json(config, "--user", ME)
    assert only(rows, "agent")["verdict"] == "skip"  # nothing runs yet
    assert "not running" in only(rows, "agent")["finding"]
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        ready = lambda: "running and ready" in only(doctor_json(config, "--user", ME)[1], "agent")["finding"]  # noqa: E731
        wait_for(ready, 30, "doctor to see the running agent ready")
        broker.stop()
        not_ready = lambda: only(doctor_json(config, "--user", ME)[1], "agent")["verdict"] == "warn"  # noqa: E731
        wait_for(not_ready, 30, "doctor to see the agent not ready once the broker is gone")
        row = only(doctor_json(config, "--user", ME)[1], "agent")
        assert "not ready: uplink_connected" in row["finding"], row
    finally:
        agent.kill()


def test_broker_down_is_a_failure_with_a_fix(tmp_path: Path, broker) -> None:
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=VIRTUAL)
    broker.stop()
    code, rows = doctor_json(config, "--user", ME)
    assert code == 1
    tcp = only(rows, "broker", "tcp")
    assert fails(rows) == [tcp]
    assert tcp["finding"] == "cannot connect: Connection refused"
    assert f"127.0.0.1:{broker.port}" in tcp["fix"] and "uplink.mqtt.port" in tcp["fix"]
    assert only(rows, "broker", "mqtt")["verdict"] == "skip"

    table = doctor(config, "--user", ME)
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("broker") and "FAIL" in line)
    assert lines[row + 1].startswith("    fix: check that the broker runs")
    assert lines[-1].startswith("1 problem")  # (and a clock warning where the clock is not NTP-synced)


def test_a_modbus_device_that_does_not_answer_fails_with_the_reason(tmp_path: Path, broker) -> None:
    silent = free_port()  # nothing listens there
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=VIRTUAL + modbus(silent))
    code, rows = doctor_json(config, "--user", ME)
    assert code == 1
    device = only(rows, "device", "sdm-1")
    assert fails(rows) == [device]
    # Reported once the device failed offline_after (3) polls in a row, or the timeout ran out.
    assert re.fullmatch(rf"cannot connect to 127\.0\.0\.1:{silent} \([23] failed polls\)", device["finding"])
    assert device["fix"]
    assert only(rows, "device", "meter-1")["verdict"] == "ok"


def test_a_port_the_service_user_may_not_open_names_the_group(tmp_path: Path, broker) -> None:
    master, slave = os.openpty()
    try:
        port = os.ttyname(slave)
        dialout = grp.getgrnam("dialout").gr_gid
        os.chown(port, 0, dialout)
        os.chmod(port, 0o660)
        sensor = (
            f"  - {{id: temp-1, driver: serial, port: {port}, framing: {{kind: line, pattern: 'T=(?P<t>-?[0-9.]+)'}},"
            " fields: [{name: t, quantity: temperature}]}\n"
        )
        config = write_config(tmp_path / "site.yaml", port=broker.port, devices=sensor)
        code, rows = doctor_json(config, "--user", "nobody")
        assert code == 1
        row = only(rows, "device-file", port)
        assert row["verdict"] == "FAIL"
        assert row["finding"] == "crw-rw---- root:dialout: nobody cannot read and write it (not in group dialout)"
        assert row["fix"].startswith("usermod -aG dialout nobody")
        # Nothing writes to the pty, and this test holds it open: the doctor names the holder.
        device = only(rows, "device", "temp-1")
        assert device["verdict"] == "FAIL"
        silence = rf"no data on {port} for [12]\.\ds \([23] failed polls\)"
        assert re.match(rf"{silence}; {port} is open in pid {os.getpid()} \(", device["finding"]), device["finding"]
        assert device["fix"].startswith("stop that process")
    finally:
        os.close(slave)
        os.close(master)


def test_a_bad_config_lists_every_problem_and_skips_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(
        "gateway: {id: gw-test}\n"
        "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: -1s}\n"
        "  - {id: meter-2, driver: virtual, kind: metre}\n"
    )
    code, rows = doctor_json(config, "--user", ME)
    assert code == 1
    problems = [r for r in rows if r["check"] == "config"]
    assert [r["verdict"] for r in problems] == ["FAIL", "FAIL"]
    assert problems[0]["target"] == f"{config}:3" and problems[0]["finding"].startswith("devices[0].interval")
    assert problems[1]["target"] == f"{config}:4" and "devices[1].kind" in problems[1]["finding"]
    assert f"edge-agent validate -c {config}" in problems[0]["fix"]
    needs_config = [r for r in rows if r["check"] not in ("config", "clock")]
    assert needs_config and all(r["verdict"] == "skip" for r in needs_config)
    assert only(rows, "clock")["verdict"] in ("ok", "warn")


def test_secret_files_others_may_read_are_warnings_with_the_chmod(tmp_path: Path, broker) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=VIRTUAL)
    config.write_text(
        config.read_text().replace("keepalive: 5s", f"keepalive: 5s, username: gw, password_file: {secret}")
    )
    code, rows = doctor_json(config, "--user", ME)
    assert code == 0, fails(rows)  # a warning, not a failure
    assert only(rows, "config", "uplink.mqtt.password_file") == {
        "check": "config",
        "target": "uplink.mqtt.password_file",
        "verdict": "warn",
        "finding": f"permissions 0644 for '{secret}' are too open",
        "fix": f"chmod 600 {secret}",
    }
    table = doctor(config, "--user", ME)
    assert re.search(r"^all checks passed, [12] warnings$", table.stdout.splitlines()[-1]), table.stdout

    secret.chmod(0o600)
    _, rows = doctor_json(config, "--user", ME)
    assert [r for r in rows if r["check"] == "config" and r["verdict"] != "ok"] == []


def test_plain_mqtt_to_a_remote_broker_is_a_warning(tmp_path: Path) -> None:
    site = write_config(tmp_path / "site.yaml", port=1883, devices=VIRTUAL)
    site.write_text(site.read_text().replace("host: 127.0.0.1", "host: broker.example.org, tls: {enabled: false}"))
    config, rows = check_config(site)
    assert config is not None
    assert rows[1:] == [
        Row(
            "config",
            "uplink.mqtt.tls.enabled",
            "warn",
            "plain MQTT to broker.example.org: events travel unencrypted and unauthenticated",
            "remove 'enabled: false' (TLS is the default) and use the broker's TLS port (8883)",
        )
    ]
    site.write_text(site.read_text().replace(", tls: {enabled: false}", ""))  # the default: TLS, no warning
    config, rows = check_config(site)
    assert config is not None and config.uplink.mqtt.tls.active and config.uplink.mqtt.port == 1883
    assert [r.verdict for r in rows] == ["ok"]


def test_an_unreadable_secret_is_fixed_for_its_owner_alone(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o640)  # its group may read it: the fix must not widen that to the service user's group
    user = ServiceUser("edge-agent", 4242, 4242, frozenset({4242, secret.stat().st_gid}))
    problem = Denied(secret, secret.stat(), 4, "cannot read it")
    assert access_fix(problem, user, secret=True) == f"chown edge-agent {secret} && chmod 600 {secret}"
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    ca.chmod(0o600)
    public = Denied(ca, ca.stat(), 4, "cannot read it")
    assert access_fix(public, ServiceUser("edge-agent", 4242, 4242, frozenset({4242})), secret=False).startswith(
        "chgrp"
    )


class ExpiringBroker(SecureBroker):
    """A TLS broker whose certificate for localhost ends at ``not_after``."""

    def __init__(self, workdir: Path, ca: trustme.CA, not_after: datetime) -> None:
        super().__init__(workdir, ca)
        leaf = ca.issue_cert("localhost", "127.0.0.1", not_after=not_after)
        leaf.private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))


@pytest.mark.parametrize(("days", "verdict"), [(400, "ok"), (10, "warn")])
def test_tls_broker_certificate_verified_and_its_expiry_shown(tmp_path: Path, days: int, verdict: str) -> None:
    not_after = datetime.now(UTC) + timedelta(days=days)
    broker = ExpiringBroker(tmp_path, trustme.CA(), not_after)
    broker.start()
    try:
        config = _tls_site(tmp_path, broker.port, tmp_path / "ca.pem")
        code, rows = doctor_json(config, "--user", ME)
        tls = only(rows, "broker", "tls")
        assert tls["verdict"] == verdict, tls
        assert f"expires {not_after:%Y-%m-%d}" in tls["finding"]
        assert "certificate verified for localhost" in tls["finding"]
        assert only(rows, "broker", "mqtt")["verdict"] == "ok"
        assert code == 0  # a warning alone does not fail the doctor
        if verdict == "warn":
            assert tls["fix"] == f"renew the broker's certificate before {not_after:%Y-%m-%d}"
    finally:
        broker.stop()


def test_tls_broker_signed_by_another_ca_fails_naming_ca_file(tmp_path: Path) -> None:
    broker = SecureBroker(tmp_path, trustme.CA())
    broker.start()
    try:
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        code, rows = doctor_json(_tls_site(tmp_path, broker.port, tmp_path / "other-ca.pem"), "--user", ME)
        assert code == 1
        tls = only(rows, "broker", "tls")
        assert tls["verdict"] == "FAIL"
        assert tls["finding"].startswith("certificate not accepted: ")  # OpenSSL's words (self-signed ... in chain)
        assert "uplink.mqtt.tls.ca_file" in tls["fix"]
        assert only(rows, "broker", "mqtt")["verdict"] == "skip"
    finally:
        broker.stop()


def test_tls_broker_wanting_a_client_certificate_says_so(tmp_path: Path) -> None:
    broker = SecureBroker(tmp_path, trustme.CA(), require_cert=True)
    broker.start()
    try:
        code, rows = doctor_json(_tls_site(tmp_path, broker.port, tmp_path / "ca.pem"), "--user", ME)
        assert code == 1
        tls = only(rows, "broker", "tls")
        assert tls["verdict"] == "FAIL"
        assert tls["finding"].startswith("the broker wants a client certificate")
        assert "uplink.mqtt.tls.cert_file and key_file" in tls["fix"]
    finally:
        broker.stop()


def test_wrong_password_is_refused_and_never_printed(tmp_path: Path) -> None:
    password = "correct horse battery staple"  # noqa: S105 - a test broker's password
    accounts = tmp_path / "passwd"
    accounts.write_text(f"gw-test:{password}\n")
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-U", str(accounts)], check=True)
    port = free_port()
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {accounts}\nlog_dest none\n" + KEEP_USER
    )
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        secret = tmp_path / "mqtt-password"
        config = write_config(tmp_path / "site.yaml", port=port, devices=VIRTUAL)
        config.write_text(config.read_text().replace("keepalive: 5s", f"keepalive: 5s, username: gw-test, "
                                                                      f"password_file: {secret}"))  # fmt: skip
        secret.write_text("wrong password\n")
        _wait_for_port(port)
        done = doctor(config, "--user", ME, "--json")
        assert done.returncode == 1
        mqtt = only(json.loads(done.stdout), "broker", "mqtt")
        assert mqtt["verdict"] == "FAIL"
        assert mqtt["finding"].startswith("broker refused CONNECT: Not authorized")
        assert "check uplink.mqtt.username / password_file" in mqtt["fix"]
        assert "wrong password" not in done.stdout + done.stderr

        secret.write_text(password + "\n")
        done = doctor(config, "--user", ME, "--json")
        mqtt = only(json.loads(done.stdout), "broker", "mqtt")
        assert mqtt["verdict"] == "ok"
        assert f"user gw-test, password from {secret}" in mqtt["finding"]
        assert password not in done.stdout + done.stderr
    finally:
        proc.terminate()
        proc.wait(5)


def test_edge_agent_doctor_runs_without_loading_the_vision_stack(tmp_path: Path) -> None:
    """The CLI reaches the doctor; without models it never imports OpenCV or onnxruntime (the vision extra)."""
    config = write_config(tmp_path / "site.yaml", port=free_port(), devices=VIRTUAL)  # nothing listens there
    script = (
        "import sys; from agent.tools.cli import main; code = main(sys.argv[1:]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cv2', 'onnxruntime') "
        "or m.startswith('agent.inference')), file=sys.stderr); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "doctor", "-c", str(config), "--json", "--user", ME, "--timeout", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    rows = json.loads(done.stdout)
    assert only(rows, "broker", "tcp")["finding"] == "cannot connect: Connection refused"
    assert only(rows, "models")["finding"] == "no models configured"
    assert only(rows, "device", "meter-1")["verdict"] == "ok"
    assert done.stderr.splitlines()[-1] == "[]", done.stderr


# ---- single checks, in process ----------------------------------------------------------------


def test_model_manifest_detects_a_tampered_file(tmp_path: Path) -> None:
    model = tmp_path / "models" / "detector.onnx"
    model.parent.mkdir()
    model.write_bytes(b"weights" * 1000)
    manifest = tmp_path / "models" / "detector.json"
    manifest.write_text(json.dumps({"file": "detector.onnx", "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}))
    good = check_model_manifest(manifest)
    assert (good.verdict, good.finding) == ("ok", "detector.onnx: sha256 matches (6.8 KiB)")

    model.write_bytes(b"weights" * 999 + b"WEIGHTS")
    bad = check_model_manifest(manifest)
    assert bad.verdict == "FAIL"
    assert "does not match the manifest's" in bad.finding and bad.fix

    yaml_manifest = tmp_path / "models" / "missing.yaml"
    yaml_manifest.write_text("file: gone.onnx\nsha256: " + "0" * 64 + "\n")  # unquoted: YAML reads a number
    unquoted = check_model_manifest(yaml_manifest)
    assert unquoted.verdict == "FAIL" and "not 64 hex digits" in unquoted.finding
    yaml_manifest.write_text("file: gone.onnx\nsha256: '" + "0" * 64 + "'\n")
    missing = check_model_manifest(yaml_manifest)
    assert missing.verdict == "FAIL" and "gone.onnx: No such file or directory" in missing.finding


def test_device_file_verdicts_from_mode_owner_and_groups(tmp_path: Path) -> None:
    nobody = ServiceUser.lookup("nobody")
    master, slave = os.openpty()
    try:
        port = os.ttyname(slave)
        os.chown(port, 0, 0)
        os.chmod(port, 0o666)  # noqa: S103 - a test pty, open to everyone on purpose
        assert check_device_file(port, ["d"], nobody).verdict == "ok"
        os.chmod(port, 0o600)  # no group would help: a udev rule is the fix
        locked = check_device_file(port, ["d"], nobody)
        assert locked.verdict == "FAIL" and locked.fix is not None and "udev rule" in locked.fix
        assert check_device_file(port, ["d"], ServiceUser.lookup("root")).verdict == "ok"
    finally:
        os.close(slave)
        os.close(master)
    plain = tmp_path / "ttyUSB0"  # what `echo > /dev/ttyUSB0` leaves when the adapter is missing
    plain.write_text("\n")
    assert check_device_file(str(plain), ["d"], nobody).finding.startswith("not a device")
    missing = check_device_file("/dev/serial/by-id/usb-FTDI_nowhere-if00-port0", ["d"], nobody)
    assert missing.verdict == "FAIL"
    assert missing.finding.startswith("serial port /dev/serial/by-id/usb-FTDI_nowhere-if00-port0 not found; ")


def test_buffer_file_access_corruption_and_read_only() -> None:
    folder = Path(tempfile.mkdtemp(prefix="doctor-"))  # under /tmp, so `nobody` can reach it
    try:
        folder.chmod(0o755)
        path = folder / "buffer.db"
        with Outbox(path, 1 << 20) as outbox:
            outbox.append([Record("m", "city.meter.reading", 2, 1, "t", b"{}", 1.7e9)])
        before = sorted(p.name for p in folder.iterdir())  # the file (and the buffer's disk reserve)
        me = ServiceUser.lookup(ME)
        assert "1 events buffered" in check_buffer_file(path, me).finding
        assert sorted(p.name for p in folder.iterdir()) == before  # no -wal/-shm left behind
        assert not [name for name in before if name.endswith(("-wal", "-shm"))]

        path.chmod(0o644)  # owned by root: the agent's user could not write it
        locked = check_buffer_file(path, ServiceUser.lookup("nobody"))
        assert locked.verdict == "FAIL" and locked.fix == f"chown nobody:nogroup {path}*"

        with sqlite3.connect(path) as db:  # break a table's page: quick_check must say so
            page = db.execute("PRAGMA page_size").fetchone()[0]
        data = bytearray(path.read_bytes())
        data[page + 8 : 2 * page] = b"\xff" * (page - 8)
        path.write_bytes(bytes(data))
        broken = check_buffer_file(path, me)
        assert broken.verdict == "FAIL", broken
    finally:
        shutil.rmtree(folder)


def test_free_space_thresholds() -> None:
    mib = 1024 * 1024
    assert space_row(MIN_FREE_BYTES - 1, 0, 64 * mib).verdict == "FAIL"
    assert space_row(32 * mib, 0, 64 * mib).verdict == "warn"
    assert space_row(32 * mib, 40 * mib, 64 * mib).verdict == "ok"  # the buffer's own size counts as room


def test_clock_verdicts() -> None:
    assert clock_row(datetime(2020, 1, 1, tzinfo=UTC), True, "timedatectl: NTPSynchronized=yes").verdict == "FAIL"
    assert clock_row(datetime(2025, 6, 1, tzinfo=UTC), True, "timedatectl: NTPSynchronized=yes").verdict == "ok"
    unknown = clock_row(datetime(2025, 6, 1, tzinfo=UTC), None, "adjtimex unavailable")
    assert unknown.verdict == "warn" and "cannot tell" in unknown.finding
    real = check_clock(5)  # this machine: timedatectl if systemd runs, else the kernel's adjtimex
    assert real.verdict in ("ok", "warn") and ("timedatectl" in real.finding or "adjtimex" in real.finding)


def test_certificate_validity_period() -> None:
    cert = {"notBefore": "Jan  1 00:00:00 2025 GMT", "notAfter": "Jan  1 00:00:00 2026 GMT"}
    at = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
    assert certificate_row("t", "TLSv1.3", "h", cert, at).verdict == "ok"
    assert certificate_row("t", "TLSv1.3", "h", cert, datetime(2025, 12, 20, tzinfo=UTC).timestamp()).verdict == "warn"
    expired = certificate_row("t", "TLSv1.3", "h", cert, datetime(2026, 2, 1, tzinfo=UTC).timestamp())
    assert (expired.verdict, expired.finding) == ("FAIL", "certificate expired on 2026-01-01")
    early = certificate_row("t", "TLSv1.3", "h", cert, datetime(2024, 2, 1, tzinfo=UTC).timestamp())
    assert early.verdict == "FAIL" and early.fix is not None and "clock" in early.fix


# ---- helpers ------------------------------------------------------------------------------------


def _tls_site(tmp_path: Path, port: int, ca_file: Path) -> Path:
    config = write_config(tmp_path / "site.yaml", port=port, devices=VIRTUAL)
    text = config.read_text().replace("host: 127.0.0.1", "host: localhost")
    config.write_text(text.replace("keepalive: 5s", f"keepalive: 5s, tls: {{ca_file: {ca_file}}}"))
    return config


def _wait_for_port(port: int) -> None:
    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            return False
        return True

    wait_for(accepting, 10, "the broker to listen")
