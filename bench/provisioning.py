#!/usr/bin/env python3
"""Provisioning benchmark (issue 16): N real agents start at once with only a claim credential.

Everything is real: one Mosquitto on a free loopback port with mutual TLS, the CN as user name and
the shipped ACL (plus the claim identity's user block); the responder as a process
(``edge-agent fleet provision-responder``, default rate limit 10/s); N agent processes
(``python -m agent run``), each with its own state folder, serial SN-0001.. and no device, all
started at once. Certificates are made with ``cryptography`` (agent/fleet/provisioning/ca.py).

Prints: time until all are provisioned (from the first spawn to the last identity.json), issuances
in the busiest second (from the responder's decision log), retries per gateway (requests beyond
the first), CONNECTs per second (from the broker's log: claim and operational connections),
responder CPU per issuance (user+sys from /proc). Asserts nothing.

    .venv/bin/python bench/provisioning.py               # 100 agents
    .venv/bin/python bench/provisioning.py --gateways 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from agent.fleet.provisioning.ca import BACKDATE, client_certificate, key_pem, make_ca, pem  # noqa: E402

CLAIM_CN = "claim-bench"
_children: list[subprocess.Popen[bytes]] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def make_lab(folder: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root, root_key = make_ca("bench root")
    _write(folder / "ca.pem", pem(root))
    _write(folder / "ca.key", key_pem(root_key), 0o600)
    for name in (CLAIM_CN, "provisioner"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = client_certificate(root, root_key, key.public_key(), name, now - BACKDATE, now + dt.timedelta(days=2))
        _write(folder / f"{name}.crt", pem(cert))
        _write(folder / f"{name}.key", key_pem(key), 0o600)
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(root_key, hashes.SHA256())
    )
    _write(folder / "server.pem", pem(server))
    _write(folder / "server.key", key_pem(key), 0o600)


def start_broker(folder: Path) -> int:
    port = _free_port()
    acl = (ROOT / "config" / "mosquitto" / "acl").read_text()
    acl += f"\nuser {CLAIM_CN}\ntopic deny ioc/v1/{CLAIM_CN}/#\ntopic deny fleet/v1/{CLAIM_CN}/#\n"
    _write(folder / "acl", acl.encode())
    user = "user root\n" if os.geteuid() == 0 else ""
    conf = (
        f"per_listener_settings false\nlistener {port} 127.0.0.1\ncafile {folder}/ca.pem\n"
        f"certfile {folder}/server.pem\nkeyfile {folder}/server.key\ntls_version tlsv1.2\n"
        f"require_certificate true\nuse_identity_as_username true\nallow_anonymous false\nacl_file {folder}/acl\n"
        f"max_connections -1\nlog_dest file {folder}/mosquitto.log\nlog_type notice\nlog_timestamp_format %s\n{user}"
    )
    _write(folder / "mosquitto.conf", conf.encode())
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    _children.append(subprocess.Popen([binary, "-c", str(folder / "mosquitto.conf")]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def start_responder(folder: Path, port: int, gateways: int, rate: float | None) -> subprocess.Popen[bytes]:
    allow = [{"serial": f"SN-{i:04d}", "gateway_id": f"gw-{i:03d}"} for i in range(1, gateways + 1)]
    doc: dict[str, object] = {"ca": {"cert_file": str(folder / "ca.pem"), "key_file": str(folder / "ca.key")},
           "state_file": str(folder / "responder-state.json"), "allow": allow}  # fmt: skip
    if rate is not None:
        doc["rate_limit"] = rate
    _write(folder / "responder.yaml", json.dumps(doc).encode())
    log = (folder / "responder.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "fleet", "provision-responder", "--config", str(folder / "responder.yaml"),
         "--host", "127.0.0.1", "--port", str(port), "--ca-file", str(folder / "ca.pem"),
         "--cert-file", str(folder / "provisioner.crt"), "--key-file", str(folder / "provisioner.key")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    _children.append(proc)
    deadline = time.monotonic() + 30
    while "listening on" not in (folder / "responder.log").read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("the responder did not start:\n" + (folder / "responder.log").read_text())
        time.sleep(0.1)
    return proc


def site(folder: Path, lab: Path, port: int, serial: str) -> Path:
    folder.mkdir()
    text = (
        "gateway: {site: bench, health_interval: 60s}\n"
        f"uplink:\n  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: ioc/v1, tls: {{ca_file: {lab}/ca.pem}}}}\n"
        f"buffer: {{path: {folder}/buffer.db}}\n"
        f"fleet:\n  identity:\n    ca_file: {lab}/ca.pem\n"
        f"    claim: {{cert_file: {lab}/{CLAIM_CN}.crt, key_file: {lab}/{CLAIM_CN}.key, serial: {serial}}}\n"
        "devices: []\n"
    )
    return _write(folder / "site.yaml", text.encode())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=100)
    parser.add_argument("--rate", type=float, help="the responder's rate_limit (default: its own, 10/s)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prov-"))
    lab = work / "lab"
    lab.mkdir()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        make_lab(lab)
        port = start_broker(lab)
        responder = start_responder(lab, port, args.gateways, args.rate)
        cpu_before = cpu_seconds(responder.pid)
        configs = [site(work / f"g{i:03d}", lab, port, f"SN-{i:04d}") for i in range(1, args.gateways + 1)]
        started = time.time()
        for config in configs:
            log = (config.parent / "agent.log").open("wb")
            _children.append(subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)],
                                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))  # fmt: skip
        spawned = time.time() - started
        identities = [c.parent / "fleet" / "identity" / "identity.json" for c in configs]
        done_at = None
        while time.time() - started < args.timeout:
            if all(p.exists() for p in identities):
                done_at = time.time()
                break
            time.sleep(0.1)
        time.sleep(2)  # the last operational CONNECTs
        cpu = cpu_seconds(responder.pid) - cpu_before
        report(work, lab, args, started, spawned, done_at, identities, cpu)
    finally:
        for proc in _children:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _first_request(folder: Path) -> float | None:
    """When the agent in ``folder`` sent its first claim request (from its log), as a UNIX time."""
    for line in (folder / "agent.log").read_text(errors="replace").splitlines():
        if "claim: request 1 sent" in line:
            return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


DECISION = re.compile(r"^(\S+ \S+) INFO\s+agent\.fleet\.provisioning: claim serial=(\S+) .* outcome=(\w+)")


def report(work: Path, lab: Path, args: argparse.Namespace, started: float, spawned: float,
           done_at: float | None, identities: list[Path], cpu: float) -> None:  # fmt: skip
    issued_seconds: Counter[int] = Counter()
    requests: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for line in (lab / "responder.log").read_text().splitlines():
        found = DECISION.match(line) or re.match(
            r"^(\S+ \S+) WARNING\s+agent\.fleet\.provisioning: claim serial=(\S+) .* outcome=(\w+)", line
        )
        if not found:
            continue
        when = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        requests[found.group(2)] += 1
        outcomes[found.group(3)] += 1
        if found.group(3) == "issued":
            issued_seconds[int(when)] += 1
    connects: Counter[int] = Counter()
    for line in (lab / "mosquitto.log").read_text().splitlines():
        if "New client connected" in line:
            connects[int(line.split(":", 1)[0])] += 1
    provisioned = sum(p.exists() for p in identities)
    retries = [requests.get(f"SN-{i:04d}", 0) - 1 for i in range(1, args.gateways + 1)]
    print(f"gateways                 : {args.gateways} agent processes, spawned in {spawned:.1f} s; rate limit "
          f"{args.rate or 10:g}/s")  # fmt: skip
    if done_at is not None:
        print(f"all provisioned after    : {done_at - started:.1f} s (floor {args.gateways / (args.rate or 10):.0f} s)")
    else:
        print(f"provisioned              : {provisioned}/{args.gateways} after {args.timeout:.0f} s (timed out)")
    # Where the time went: N Python processes starting on this machine's cores, then the claim itself.
    asked = [_first_request(c) for c in (p.parent.parent.parent for p in identities)]
    sent = [t - started for t in asked if t is not None]
    if sent:
        print(f"first requests sent      : from {min(sent):.1f} s to {max(sent):.1f} s after the spawn "
              f"({len(sent)} agents starting on {os.cpu_count()} cores)")  # fmt: skip
        if done_at is not None:
            print(f"last first request -> all: {done_at - started - max(sent):.1f} s")
    print(f"decisions                : {dict(outcomes)}")
    print(f"issuances, busiest second: {max(issued_seconds.values(), default=0)}")
    print(f"retries per gateway      : mean {sum(retries) / len(retries):.2f}, max {max(retries)}")
    if connects:
        print(f"CONNECTs per second      : peak {max(connects.values())}, total {sum(connects.values())} over "
              f"{max(connects) - min(connects) + 1} s")  # fmt: skip
    issued = outcomes.get("issued", 0)
    if issued:
        print(f"responder CPU            : {cpu:.2f} s user+sys, {1000 * cpu / issued:.2f} ms per issuance "
              f"({1000 * cpu / max(1, sum(outcomes.values())):.2f} ms per decision)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
