"""``edge-agent doctor``: the technician's health check of a gateway, one row per finding.

It checks what the agent needs, as the agent's own service user would meet it: the site
file, the device files (serial ports), the broker (TCP, TLS, MQTT CONNECT), the clock, the
buffer's disk, model files, and whether every enabled device answers. Each row has a verdict
(ok, warn, FAIL, or skip when a check cannot run), a short finding, and for anything not ok
a concrete fix. The exit status is 1 if any row is FAIL (warnings alone exit 0).

The doctor usually runs as root while the agent runs as ``edge-agent``, so file access is
computed from each file's mode, owner and group and the service user's groups, never with
``os.access`` (which answers for root). It is careful on a live gateway: it connects to the
broker under its own client id (the agent's session is not taken over), opens the buffer
read-only without leaving files behind, and does not read a serial port another process
(usually the running agent) holds open.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agent.config.model import AgentConfigBase, config_warnings, load_config
from agent.contract.events import CROSSWALK_PRESENCE, METER_READING, PARKING_OCCUPANCY, Reading
from agent.devices.api import DeviceConfig, Driver, DriverContext
from agent.devices.registry import load_plugins
from agent.errors import ConfigError
from agent.uplinks.mqtt.config import MqttConfig, mqtt_settings

Verdict = Literal["ok", "warn", "FAIL", "skip"]

DEFAULT_USER = "edge-agent"
DEFAULT_TIMEOUT = 5.0
MIN_FREE_BYTES = 16 * 1024 * 1024  # below this the buffer cannot work at all
CERT_WARN_DAYS = 30
EARLIEST_YEAR = 2024  # a clock before this is certainly wrong (no RTC, no network time yet)
STOP_TIMEOUT = 2.0
CLIENT_CERT_WAIT = 0.5  # s a TLS 1.3 broker has to refuse a client certificate after the handshake
TARGET_WIDTH = 40  # the table's target column; longer ones are shortened in the middle
R, W, X = 4, 2, 1  # permission bits, as in each rwx triplet of a mode

# X509 verification codes (OpenSSL) that deserve their own fix.
_X509_NOT_YET_VALID = 9
_X509_EXPIRED = 10
_X509_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)
_X509_HOSTNAME_MISMATCH = 62


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    check: str
    target: str
    verdict: Verdict
    finding: str
    fix: str | None = None


# ---- the service user and file access -------------------------------------------------------


@dataclass(frozen=True)
class ServiceUser:
    """The account the agent runs as: what it may open is computed from modes, not os.access."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def lookup(cls, name: str) -> ServiceUser:
        """The user's uid, primary and supplementary groups.

        Raises:
            KeyError: no such user.
        """
        pw = pwd.getpwnam(name)
        return cls(name, pw.pw_uid, pw.pw_gid, frozenset(os.getgrouplist(name, pw.pw_gid)))

    def allowed(self, st: os.stat_result, want: int) -> bool:
        """Whether the mode bits of ``st`` grant ``want`` (R|W|X) to this user (ACLs aside)."""
        if self.uid == 0:
            return True  # root: CAP_DAC_OVERRIDE (search on a directory, read and write on anything)
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want

    @property
    def group_name(self) -> str:
        """Name of the primary group."""
        return _group_name(self.gid)


def default_user() -> str:
    """``edge-agent`` if that account exists, else whoever runs the doctor."""
    try:
        pwd.getpwnam(DEFAULT_USER)
    except KeyError:
        return pwd.getpwuid(os.geteuid()).pw_name
    return DEFAULT_USER


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe(st: os.stat_result) -> str:
    """``crw-rw---- root:dialout``."""
    return f"{stat.filemode(st.st_mode)} {_user_name(st.st_uid)}:{_group_name(st.st_gid)}"


def _wants(want: int) -> str:
    return " and ".join(w for bit, w in ((R, "read"), (W, "write"), (X, "enter")) if want & bit)


@dataclass(frozen=True)
class Denied:
    """Why a user cannot reach a file: the path that stops it and that path's status."""

    path: Path
    st: os.stat_result
    want: int
    finding: str


def denied(path: Path, user: ServiceUser, want: int) -> Denied | None:
    """What stops ``user`` from ``want`` on ``path`` (which must exist): a folder on the way or the file."""
    real = path.resolve()
    for folder in reversed(real.parents):
        st = folder.stat()
        if not user.allowed(st, X):
            return Denied(folder, st, X, f"{user.name} cannot enter {folder} ({describe(st)})")
    st = real.stat()
    if not user.allowed(st, want):
        return Denied(real, st, want, f"{describe(st)}: {user.name} cannot {_wants(want)} it")
    return None


def _group_fix(d: Denied, user: ServiceUser) -> str | None:
    """``usermod -aG <group>`` when the file's group has the access the user lacks."""
    if (d.st.st_mode >> 3) & d.want == d.want and d.st.st_gid not in user.groups and d.st.st_uid != user.uid:
        return (
            f"usermod -aG {_group_name(d.st.st_gid)} {user.name}, then restart the agent "
            "(group membership is read when a process starts)"
        )
    return None


def access_fix(d: Denied, user: ServiceUser, *, secret: bool = False, home: str = "") -> str:
    """A command that gives ``user`` the access it lacks (``home``: where such files belong)."""
    if secret and d.want != X:  # its owner alone may read it (validate and run warn about anything wider)
        return f"chown {user.name} {d.path} && chmod 600 {d.path}"
    by_group = _group_fix(d, user)
    if by_group is not None:
        return by_group
    if d.want == X:
        where = f" (e.g. {home})" if home else ""
        return f"move it to a folder {user.name} can enter{where}, or chmod o+x {d.path}"
    if stat.S_ISCHR(d.st.st_mode):
        return (
            f'give the device a group with read-write access, e.g. a udev rule GROUP="dialout", MODE="0660" '
            f"in /etc/udev/rules.d/99-edge-agent.rules, then usermod -aG dialout {user.name}"
        )
    if stat.S_ISDIR(d.st.st_mode):
        return f"chown -R {user.name}:{user.group_name} {d.path}"
    if d.want == R:
        return f"chgrp {user.group_name} {d.path} && chmod g+r {d.path}"
    return f"chown {user.name}:{user.group_name} {d.path}"


# ---- 1. config ------------------------------------------------------------------------------


def check_config(path: Path) -> tuple[AgentConfigBase | None, list[Row]]:
    """Load and validate the site file; one FAIL row per problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        rows = []
        for problem in exc.problems:
            where, sep, message = problem.partition(": ")
            if not sep:
                where, message = str(path), problem
            rows.append(
                Row("config", where, "FAIL", message, f"correct it, then re-check: edge-agent validate -c {path}")
            )
        return None, rows
    enabled = [d for d in config.devices if d.enabled]
    drivers = ", ".join(sorted({d.driver for d in config.devices})) or "none"
    count = f"{len(config.devices)} devices ({len(enabled)} enabled)"
    finding = f"valid: gateway {config.gateway.id}, {count}, drivers: {drivers}"
    rows = [Row("config", str(path), "ok", finding)]
    for warning in config_warnings(config):
        field, _, text = warning.partition(": ")
        problem, _, fix = text.rpartition("; ")
        rows.append(Row("config", field, "warn", problem or text, fix if problem else None))
    return config, rows


def check_files(path: Path, config: AgentConfigBase, user: ServiceUser) -> list[Row]:
    """The site file, the password file and the TLS files must be readable by the service user."""
    mqtt = mqtt_settings(config)
    files: list[tuple[str, Path | None]] = [
        ("site file", path),
        ("password_file", mqtt.password_file),
        ("tls.ca_file", mqtt.tls.ca_file),
        ("tls.cert_file", mqtt.tls.cert_file),
        ("tls.key_file", mqtt.tls.key_file),
    ]
    rows = []
    for what, file in files:
        if file is None:
            continue
        try:
            problem = denied(file, user, R)
        except OSError as exc:
            rows.append(
                Row("files", str(file), "FAIL", f"{what}: {exc.strerror or exc}", "check the path in the config")
            )
            continue
        if problem is None:
            rows.append(Row("files", str(file), "ok", f"{what} readable by {user.name}"))
        else:
            fix = access_fix(problem, user, secret=what in ("password_file", "tls.key_file"))
            rows.append(Row("files", str(file), "FAIL", f"{what}: {problem.finding}", fix))
    return rows


# ---- 2. device files ------------------------------------------------------------------------


def check_device_files(config: AgentConfigBase, user: ServiceUser) -> list[Row]:
    """Each device file: present, a character device, readable and writable by the service user."""
    users: dict[str, list[str]] = {}
    for device in config.devices:
        if device.enabled:
            for path in device.device_paths():
                users.setdefault(path, []).append(device.id)
    if not users:
        return [Row("device-file", "-", "ok", "no local device files configured")]
    return [check_device_file(path, ids, user) for path, ids in users.items()]


def check_device_file(path: str, device_ids: list[str], user: ServiceUser) -> Row:
    """One device file (a serial port, /dev/videoN) as the service user meets it."""
    target = f"{path} ({', '.join(device_ids)})"
    p = Path(path)
    if not p.exists():
        finding = f"{path} is missing" + (f" (a link to {os.readlink(p)})" if p.is_symlink() else "")
        kind, present = present_devices(path)
        fix = (
            f"plug the adapter in (dmesg shows it), or correct the path in the config; present: {', '.join(present)}"
            if present
            else f"plug the {kind} in (dmesg shows it): none is present"
        )
        return Row("device-file", target, "FAIL", finding, fix)
    st = p.stat()
    if not stat.S_ISCHR(st.st_mode):
        return Row(
            "device-file",
            target,
            "FAIL",
            f"not a device: {describe(st)} (written to while the adapter was missing?)",
            f"rm {p.resolve()} and plug the adapter in; check the path in the config",
        )
    problem = denied(p, user, R | W)
    if problem is None:
        return Row("device-file", target, "ok", f"{describe(st)}, read-write for {user.name}")
    finding = problem.finding
    if problem.path == p.resolve() and _group_fix(problem, user) is not None:
        finding += f" (not in group {_group_name(st.st_gid)})"
    return Row("device-file", target, "FAIL", finding, access_fix(problem, user))


def present_devices(path: str) -> tuple[str, list[str]]:
    """What kind of device ``path`` is, and the ones of that kind present (to spot a renamed adapter)."""
    if path.startswith(("/dev/video", "/dev/v4l/")):
        kind, patterns = "camera", ["dev/v4l/by-id/*", "dev/video*"]
    else:
        kind, patterns = "USB serial adapter", ["dev/serial/by-id/*", "dev/ttyUSB*", "dev/ttyACM*"]
    for pattern in patterns:
        found = sorted(str(f) for f in Path("/").glob(pattern))
        if found:
            return kind, found
    return kind, []


def port_holders(path: str) -> list[str]:
    """Other processes holding ``path`` open, as ``pid (command)``; [] if none (or not visible)."""
    real = os.path.realpath(path)
    holders = []
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with suppress(OSError):
                if os.readlink(fd) == real:
                    with suppress(OSError):
                        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        holders.append(f"pid {proc.name} ({command.strip()[:60]})")
                    break
    return holders


# ---- 3. broker ------------------------------------------------------------------------------


def check_broker(mqtt: MqttConfig, client_id: str, timeout: float) -> list[Row]:
    """TCP connect, TLS handshake and certificate, MQTT CONNECT with the configured credentials."""
    address = f"{mqtt.host}:{mqtt.port}"
    started = time.monotonic()
    try:
        sock = socket.create_connection((mqtt.host, mqtt.port), timeout=timeout)
    except socket.gaierror as exc:
        return [
            Row(
                "broker",
                f"tcp {address}",
                "FAIL",
                f"cannot resolve {mqtt.host}: {exc.strerror or exc}",
                "check uplink.mqtt.host and the gateway's DNS (/etc/resolv.conf)",
            ),
            *_skipped_broker(mqtt, address),
        ]
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return [
            Row(
                "broker",
                f"tcp {address}",
                "FAIL",
                f"cannot connect: {reason}",
                f"check that the broker runs and listens on {address} and that no firewall blocks it "
                "(uplink.mqtt.host, uplink.mqtt.port)",
            ),
            *_skipped_broker(mqtt, address),
        ]
    rows = [Row("broker", f"tcp {address}", "ok", f"connected in {(time.monotonic() - started) * 1000:.1f} ms")]
    with sock:
        if mqtt.tls.active:
            rows.append(check_tls(sock, mqtt, timeout))
            if rows[-1].verdict == "FAIL":
                return [*rows, Row("broker", f"mqtt {address}", "skip", "not tried: the TLS handshake failed")]
    rows.append(check_mqtt_connect(mqtt, client_id, timeout))
    return rows


def _skipped_broker(mqtt: MqttConfig, address: str) -> list[Row]:
    reason = "not tried: no TCP connection"
    rows = [Row("broker", f"tls {address}", "skip", reason)] if mqtt.tls.active else []
    return [*rows, Row("broker", f"mqtt {address}", "skip", reason)]


def tls_context(mqtt: MqttConfig) -> ssl.SSLContext:
    """The client context the agent's paho connection uses (verified, host name checked)."""
    tls = mqtt.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.ca_file is not None:
        context.load_verify_locations(str(tls.ca_file))
    else:
        context.load_default_certs()
    return context


def check_tls(sock: socket.socket, mqtt: MqttConfig, timeout: float) -> Row:
    """Handshake on ``sock`` as the agent would; report the server certificate's validity."""
    target = f"tls {mqtt.host}:{mqtt.port}"
    try:
        context = tls_context(mqtt)
    except (ssl.SSLError, OSError) as exc:
        return Row(
            "broker",
            target,
            "FAIL",
            f"cannot load the TLS files: {exc}",
            "check uplink.mqtt.tls.cert_file / key_file (a matching PEM pair) and ca_file",
        )
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=mqtt.host) as tls_sock:
            cert = tls_sock.getpeercert()
            version = tls_sock.version() or "TLS"
            refusal = _client_refusal(tls_sock)
    except ssl.SSLCertVerificationError as exc:
        return Row(
            "broker",
            target,
            "FAIL",
            f"certificate not accepted: {exc.verify_message}",
            _verify_fix(exc.verify_code, mqtt),
        )
    except ssl.SSLError as exc:
        refusal = str(exc.reason or exc)
        if "ALERT" in refusal:
            return _refused_client_row(target, refusal)
        return Row(
            "broker",
            target,
            "FAIL",
            f"TLS handshake failed: {refusal}",
            f"is {mqtt.port} the broker's TLS port (usually 8883)?",
        )
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Row(
            "broker",
            target,
            "FAIL",
            f"TLS handshake failed: {reason}",
            f"is {mqtt.port} the broker's TLS port (usually 8883)?",
        )
    if refusal is not None:
        return _refused_client_row(target, refusal)
    return certificate_row(target, version, mqtt.host, cert or {}, time.time())


def _client_refusal(tls_sock: ssl.SSLSocket) -> str | None:
    """The broker's TLS alert, if it refused the client after the handshake (TLS 1.3 does so late).

    A broker that accepted the client waits for CONNECT, so a short read times out.
    """
    tls_sock.settimeout(CLIENT_CERT_WAIT)
    try:
        tls_sock.recv(1)
    except TimeoutError:
        return None
    except ssl.SSLError as exc:
        return str(exc.reason or exc)
    except OSError:
        return None  # closed without a word: the MQTT row will tell
    return None


def _refused_client_row(target: str, alert: str) -> Row:
    if "CERTIFICATE_REQUIRED" in alert or "HANDSHAKE_FAILURE" in alert:
        finding = f"the broker wants a client certificate ({alert})"
        fix = "set uplink.mqtt.tls.cert_file and key_file to a certificate signed by a CA the broker trusts"
    else:
        finding = f"the broker refused the client certificate ({alert})"
        fix = "check uplink.mqtt.tls.cert_file: signed by a CA the broker trusts, not expired"
    return Row("broker", target, "FAIL", finding, fix)


def certificate_row(target: str, version: str, host: str, cert: dict[str, Any], now: float) -> Row:
    """Verdict on a verified server certificate's validity period (warn under 30 days)."""
    not_after = ssl.cert_time_to_seconds(cert["notAfter"])
    not_before = ssl.cert_time_to_seconds(cert["notBefore"])
    expires = datetime.fromtimestamp(not_after, UTC).strftime("%Y-%m-%d")
    days = (not_after - now) / 86400
    finding = f"{version}, certificate verified for {host}, expires {expires} (in {days:.0f} days)"
    if now > not_after:
        return Row("broker", target, "FAIL", f"certificate expired on {expires}", "renew the broker's certificate")
    if now < not_before:
        starts = datetime.fromtimestamp(not_before, UTC).strftime("%Y-%m-%d %H:%M")
        return Row(
            "broker",
            target,
            "FAIL",
            f"certificate not valid before {starts} UTC",
            "check the gateway's clock (see the clock row), else the broker's certificate",
        )
    if days < CERT_WARN_DAYS:
        return Row("broker", target, "warn", finding, f"renew the broker's certificate before {expires}")
    return Row("broker", target, "ok", finding)


def _verify_fix(code: int, mqtt: MqttConfig) -> str:
    if code == _X509_EXPIRED:
        return "renew the broker's certificate (or check the gateway's clock: see the clock row)"
    if code == _X509_NOT_YET_VALID:
        return "check the gateway's clock (see the clock row), else the broker's certificate"
    if code == _X509_HOSTNAME_MISMATCH:
        return f"set uplink.mqtt.host to a name the broker's certificate is issued for (not {mqtt.host})"
    if code in _X509_UNKNOWN_ISSUER:
        return "set uplink.mqtt.tls.ca_file to the CA that signed the broker's certificate"
    return "check the broker's certificate and uplink.mqtt.tls.ca_file"


def check_mqtt_connect(mqtt: MqttConfig, client_id: str, timeout: float) -> Row:
    """CONNECT with the agent's protocol, TLS and credentials; report the CONNACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    target = f"mqtt {mqtt.host}:{mqtt.port}"
    v5 = mqtt.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else True,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.connect_timeout = timeout
    who = "anonymous"
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, mqtt.password())
        source = mqtt.password_file or ("$EDGE_AGENT_MQTT_PASSWORD" if mqtt.password() else None)
        who = f"user {mqtt.username}" + (f", password from {source}" if source else ", no password")
    if mqtt.tls.active:
        mqtt.tls.apply_to(client)
    answer: list[Any] = []
    closed = False
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.append(reason)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=int(mqtt.keepalive))
        deadline = time.monotonic() + timeout
        while not answer and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                closed = True
                break
    except (OSError, ssl.SSLError) as exc:
        return Row("broker", target, "FAIL", f"CONNECT failed: {exc}", "see the tcp/tls rows above")
    finally:
        with suppress(Exception):
            client.disconnect()
            client.loop(timeout=0.1)
    if not answer:
        finding = "the broker closed the connection before CONNACK" if closed else f"no CONNACK within {timeout:g}s"
        return Row("broker", target, "FAIL", finding, "check the broker's log for why it dropped the client")
    reason = answer[0]
    if not reason.is_failure:
        return Row("broker", target, "ok", f"CONNACK {reason} (MQTT {mqtt.protocol}, {who})")
    text = str(reason)
    lowered = text.lower()
    if "password" in lowered or "authori" in lowered:
        fix = "check uplink.mqtt.username / password_file (or $EDGE_AGENT_MQTT_PASSWORD) against the broker's accounts"
    elif "identifier" in lowered:
        fix = "the broker rejects the client id: set uplink.mqtt.client_id to one it accepts"
    elif "protocol" in lowered:
        fix = "set uplink.mqtt.protocol to a version the broker speaks (3.1.1 or 5)"
    else:
        fix = "check the broker's log for why it refused the connection"
    return Row("broker", target, "FAIL", f"broker refused CONNECT: {text} ({who})", fix)


# ---- 4. clock -------------------------------------------------------------------------------


class _Timex(ctypes.Structure):
    """Linux ``struct timex`` (enough of it, with the kernel's trailing padding)."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 16),
    ]  # fmt: skip


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


def kernel_clock_sync() -> tuple[bool, str] | None:
    """The kernel's NTP status (adjtimex, read only): synchronised?, detail; None if unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        adjtimex = libc.adjtimex
    except (OSError, AttributeError):
        return None
    timex = _Timex()  # modes 0: only read
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    synced = state != _TIME_ERROR and not timex.status & _STA_UNSYNC
    detail = (
        f"kernel adjtimex: {'synchronised' if synced else 'not synchronised'}, max error {timex.maxerror / 1e6:g} s"
    )
    return synced, detail


def clock_sync_status(timeout: float) -> tuple[bool | None, str]:
    """(synchronised or None if unknown, how it was found): timedatectl, else the kernel."""
    tried = []
    timedatectl = shutil.which("timedatectl")
    if timedatectl is not None:
        try:
            done = subprocess.run(  # noqa: S603 - a fixed command
                [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            answer = done.stdout.strip()
            if done.returncode == 0 and answer in ("yes", "no"):
                return answer == "yes", f"timedatectl: NTPSynchronized={answer}"
            tried.append("timedatectl gave no answer (no systemd?)")
        except (OSError, subprocess.TimeoutExpired):
            tried.append("timedatectl did not answer")
    kernel = kernel_clock_sync()
    if kernel is not None:
        return kernel
    tried.append("adjtimex unavailable")
    return None, "; ".join(tried)


def clock_row(now: datetime, synced: bool | None, how: str) -> Row:
    """Verdict on the clock: FAIL if obviously wrong, warn if not (known to be) synchronised."""
    shown = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    enable = (
        "enable network time: timedatectl set-ntp true (systemd-timesyncd) or install chrony, "
        "and let the gateway reach an NTP server (UDP 123)"
    )
    if now.year < EARLIEST_YEAR:
        return Row(
            "clock",
            "system clock",
            "FAIL",
            f"clock says {shown}: obviously wrong ({how})",
            f"set the time (timedatectl set-time 'YYYY-MM-DD HH:MM:SS' or date -s), then {enable}",
        )
    if synced is True:
        return Row("clock", "system clock", "ok", f"{shown}, synchronised ({how})")
    if synced is False:
        return Row("clock", "system clock", "warn", f"{shown}, not synchronised ({how})", enable)
    return Row(
        "clock",
        "system clock",
        "warn",
        f"{shown}, cannot tell whether it is synchronised ({how})",
        f"check the time source by hand (chronyc tracking, ntpq -p); {enable}",
    )


def check_clock(timeout: float) -> Row:
    """Is the clock synchronised and plausible?"""
    synced, how = clock_sync_status(timeout)
    return clock_row(datetime.now(UTC), synced, how)


# ---- 5. buffer ------------------------------------------------------------------------------


def _size(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def check_buffer(config: AgentConfigBase, user: ServiceUser) -> list[Row]:
    """The buffer's folder (writable), its volume's free space, and the file itself if present."""
    path = config.buffer.path
    folder = path.parent
    rows: list[Row] = []
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        return [
            Row(
                "buffer",
                str(folder),
                "FAIL",
                f"not a folder: {describe(folder.stat())}",
                "set buffer.path to a file in a folder",
            )
        ]
    problem = denied(existing, user, W | X)
    if problem is not None:
        fix = access_fix(problem, user, home="/var/lib/edge-agent, systemd's StateDirectory=edge-agent")
        rows.append(Row("buffer", str(folder), "FAIL", problem.finding, fix))
    elif existing == folder:
        rows.append(Row("buffer", str(folder), "ok", f"folder writable by {user.name}"))
    else:
        rows.append(Row("buffer", str(folder), "ok", f"missing; {user.name} can create it in {existing}"))
    rows.append(_space_row(existing, path, config.buffer.max_bytes))
    if path.exists():
        rows.append(check_buffer_file(path, user))
    return rows


def _space_row(existing: Path, path: Path, max_bytes: int) -> Row:
    vfs = os.statvfs(existing)
    used = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return space_row(vfs.f_bavail * vfs.f_frsize, used, max_bytes, existing)


def space_row(free: int, used: int, max_bytes: int, volume: Path = Path("/")) -> Row:
    """FAIL under 16 MiB free; warn if a full buffer (``max_bytes``) would not fit in free + ``used``."""
    finding = f"{_size(free)} free, buffer bound {_size(max_bytes)}"
    if free < MIN_FREE_BYTES:
        return Row(
            "buffer",
            "free space",
            "FAIL",
            finding,
            f"free space on the volume of {volume} (journalctl --vacuum-size, old logs), "
            "or move buffer.path to a larger volume",
        )
    if free + used < max_bytes:
        return Row(
            "buffer",
            "free space",
            "warn",
            finding + ": a full buffer would not fit",
            f"lower buffer.max_bytes to {_size((free + used) * 0.8)} or free space on the volume of {volume}",
        )
    return Row("buffer", "free space", "ok", finding)


def check_buffer_file(path: Path, user: ServiceUser) -> Row:
    """Access for the service user, ``PRAGMA quick_check`` read-only, size and events buffered."""
    from agent.store.outbox import SCHEMA_VERSION

    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if file.exists():
            problem = denied(file, user, R | W)
            if problem is not None:
                return Row(
                    "buffer",
                    str(path),
                    "FAIL",
                    f"{file.name}: {problem.finding}",
                    f"chown {user.name}:{user.group_name} {path}*",
                )
    try:
        quick, version, count, oldest = read_buffer(path)
    except sqlite3.DatabaseError as exc:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"unreadable: {exc}",
            "the agent quarantines a corrupt buffer at start and salvages what it can; "
            "or stop it and move the file away",
        )
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    if quick != ["ok"]:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"quick_check: {'; '.join(quick[:2])}",
            "the agent quarantines a corrupt buffer at start and salvages what it can; "
            "or stop it and move the file away",
        )
    if version > SCHEMA_VERSION:
        return Row(
            "buffer",
            str(path),
            "FAIL",
            f"schema version {version} is newer than this agent's",
            "run the newer agent, or stop and move the file away",
        )
    events = f"{count} events buffered"
    if count and oldest is not None:
        events += f", oldest from {datetime.fromtimestamp(oldest, UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}"
    return Row("buffer", str(path), "ok", f"quick_check ok, {_size(size)}, {events}")


def read_buffer(path: Path) -> tuple[list[str], int, int, float | None]:
    """(quick_check lines, user_version, rows in outbox, oldest created) without writing anything.

    A read-only WAL connection creates ``-wal``/``-shm`` files when they are missing, and
    they would belong to whoever runs the doctor (root), locking the agent out. Without them
    the file is complete, so it is opened immutable; with them SQLite only reads; files it
    still creates are given the database's owner.
    """
    sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    existed = {p: p.exists() for p in sidecars}
    mode = "mode=ro" if any(existed.values()) else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=5)
    try:
        quick = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        count, oldest = (
            conn.execute("SELECT count(*), min(created) FROM outbox").fetchone() if "outbox" in tables else (0, None)
        )
    finally:
        conn.close()
        owner = path.stat()
        for p in sidecars:
            if not existed[p] and p.exists():
                with suppress(OSError):
                    os.chown(p, owner.st_uid, owner.st_gid)
    return quick, version, int(count), oldest


# ---- 6. models ------------------------------------------------------------------------------


def check_models(config: AgentConfigBase, base: Path) -> list[Row]:
    """Every model manifest a device references: the file's sha256 matches."""
    manifests: list[Path] = []
    for device in config.devices:
        for manifest in device.model_manifests():
            p = Path(manifest).expanduser()
            manifests.append(p if p.is_absolute() else base / p)
    if not manifests:
        return [Row("models", "-", "ok", "no models configured")]
    return [check_model_manifest(m) for m in dict.fromkeys(manifests)]


def check_model_manifest(path: Path) -> Row:
    """A manifest (JSON or YAML: ``file``, ``sha256``; ``file`` relative to the manifest's folder)."""
    import yaml

    target = str(path)
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return Row(
            "models", target, "FAIL", f"cannot read the manifest: {exc}", "check the manifest's path and content"
        )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("file"), str) or "sha256" not in manifest:
        return Row("models", target, "FAIL", "manifest needs `file` and `sha256`", "rewrite the manifest")
    expected = manifest["sha256"]
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", expected.strip()):
        return Row(
            "models",
            target,
            "FAIL",
            f"sha256 is not 64 hex digits: {expected!r}",
            "write the sha256 as a quoted string (YAML reads some unquoted digests as numbers)",
        )
    expected = expected.strip().lower()
    model = Path(manifest["file"])
    model = model if model.is_absolute() else path.parent / model
    digest = hashlib.sha256()
    try:
        with model.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        return Row(
            "models",
            target,
            "FAIL",
            f"model file {model}: {exc.strerror or exc}",
            "copy the model file next to its manifest",
        )
    actual = digest.hexdigest()
    if actual != expected:
        return Row(
            "models",
            target,
            "FAIL",
            f"{model.name}: sha256 {actual[:12]}... does not match the manifest's "
            f"{expected[:12]}... (damaged or replaced)",
            "copy the model file again from its release",
        )
    return Row("models", target, "ok", f"{model.name}: sha256 matches ({_size(model.stat().st_size)})")


# ---- 7. devices -----------------------------------------------------------------------------


class Probe(DriverContext):
    """The runtime's side of a driver under test: records what the driver reports about its polls.

    ``offline`` is set after ``offline_after`` failed polls in a row: the runtime's own rule for
    a device that does not answer (one failed poll may be a transient).
    """

    def __init__(self, device_id: str, offline_after: int = 1) -> None:
        """Nothing reported yet."""
        self.device_id = device_id
        self.offline_after = offline_after
        self.in_a_row = 0
        self.failures: list[str] = []
        self.offline = asyncio.Event()

    def poll_ok(self) -> None:
        """The device answered."""
        self.in_a_row = 0

    def poll_failed(self, reason: str) -> None:
        """A poll failed; the last reason is what the doctor reports."""
        self.failures.append(reason)
        self.in_a_row += 1
        if self.in_a_row >= self.offline_after:
            self.offline.set()


async def check_devices(config: AgentConfigBase, timeout: float) -> list[Row]:
    """Every enabled device, concurrently: start, one batch of readings, stop."""
    results = await asyncio.gather(
        *(check_device(d, timeout) for d in config.devices if d.enabled), return_exceptions=True
    )
    rows = [_broken("device", r) if isinstance(r, BaseException) else r for r in results]
    disabled = [
        Row("device", f"{d.id} ({d.driver})", "skip", "disabled (enabled: false)")
        for d in config.devices
        if not d.enabled
    ]
    return [*rows, *disabled] or [Row("device", "-", "ok", "no devices configured")]


_DEVICE_FIX = "check power, wiring or network, and the device's address and line settings in the config"


async def check_device(device: DeviceConfig, timeout: float) -> Row:
    """Start the device's driver, wait for one batch of readings (or the first failure), stop it.

    A port another process holds is still tried: the drivers lock their ports (pyserial's
    ``exclusive``), so the running agent's port fails to open rather than being disturbed;
    the holder is then named.
    """
    target = f"{device.id} ({device.driver})"
    holders: list[str] = []
    for path in device.device_paths():
        if not Path(path).exists():
            return Row("device", target, "FAIL", f"not read: {path} is missing", "see the device-file row")
        holders += [f"{path} is open in {h}" for h in await asyncio.to_thread(port_holders, path)]
    batch = await read_device(device, timeout)
    if isinstance(batch, str):
        if holders:
            return Row(
                "device",
                target,
                "FAIL",
                f"{batch}; {'; '.join(holders)}",
                "stop that process (the agent: systemctl stop edge-agent), then run the doctor again",
            )
        return Row("device", target, "FAIL", batch, _DEVICE_FIX)
    summary, bad = summarize(batch)
    if bad:
        return Row(
            "device",
            target,
            "warn",
            f"{summary}; bad: {'; '.join(bad[:3])}",
            "check the points' addresses and types against the device's manual",
        )
    return Row("device", target, "ok", summary)


async def read_device(device: DeviceConfig, timeout: float) -> list[Reading] | str:
    """One batch of the device's readings, or why there is none; ``timeout`` covers start and read."""
    probe = Probe(device.id, device.offline_after)
    try:
        driver = load_plugins()[device.driver].factory()(device, probe)
    except Exception as exc:
        return f"driver could not be created: {_text(exc)}"
    deadline = time.monotonic() + timeout
    try:
        try:
            async with asyncio.timeout(timeout):
                await driver.start()
        except TimeoutError:
            return f"start did not finish within {timeout:g}s"
        except Exception as exc:
            return f"cannot start: {_text(exc)}"
        left = max(0.0, deadline - time.monotonic())
        if type(driver).stream is not Driver.stream:  # push-style (or its own schedule): the first batch
            return await _first_batch(driver, probe, left)
        async with asyncio.timeout(left):
            return await driver.read()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:
        return _text(exc)
    finally:
        await _stop(driver)


async def _first_batch(driver: Driver, probe: Probe, timeout: float) -> list[Reading] | str:
    """The first batch a streaming driver yields, or why none came (offline, or the time ran out)."""
    stream = driver.stream()
    nxt: asyncio.Task[list[Reading]] = asyncio.ensure_future(anext(stream))
    failed = asyncio.ensure_future(probe.offline.wait())
    try:
        await asyncio.wait({nxt, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if nxt.done():
            return nxt.result()
        if probe.failures:
            count = len(probe.failures)
            return probe.failures[-1] + (f" ({count} failed polls)" if count > 1 else "")
        return f"no readings within {timeout:.1f} s"
    finally:
        for task in (nxt, failed):
            task.cancel()
        await asyncio.gather(nxt, failed, return_exceptions=True)
        close = getattr(stream, "aclose", None)  # an async generator: run its finally blocks
        if close is not None:
            with suppress(Exception):
                await close()


async def _stop(driver: Driver) -> None:
    with suppress(Exception):
        await asyncio.wait_for(driver.stop(), STOP_TIMEOUT)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def summarize(readings: list[Reading]) -> tuple[str, list[str]]:
    """One line about a batch (events, first values), and the reasons of bad-quality values."""
    parts: list[str] = []
    bad: list[str] = []
    for reading in readings:
        data = reading.data
        if reading.type == METER_READING:
            measurements = data.get("measurements") or []
            for m in measurements:
                if m.get("quality", "good") != "good":
                    bad.append(f"{m.get('point') or m.get('quantity')} {m.get('reason') or m.get('quality')}")
            shown = [
                f"{m.get('quantity')}{' ' + m['phase'] if m.get('phase') else ''}={_value(m.get('value'))}"
                f"{' ' + m['unit'] if m.get('unit') else ''}"
                for m in measurements[:3]
            ]
            more = ", ..." if len(measurements) > 3 else ""
            parts.append(f"{len(measurements)} values ({', '.join(shown)}{more})")
        elif reading.type == PARKING_OCCUPANCY:
            parts.append(f"bay {data.get('bay')} {'occupied' if data.get('occupied') else 'free'}")
        elif reading.type == CROSSWALK_PRESENCE:
            parts.append(f"area {data.get('area')}: {data.get('count')} people")
        else:
            parts.append(reading.type)
    head = f"{len(readings)} event{'s' if len(readings) != 1 else ''}"
    shown_parts = "; ".join(parts[:2]) + ("; ..." if len(parts) > 2 else "")
    return (f"{head}: {shown_parts}" if parts else f"answered, {head}"), bad


# ---- running and printing ---------------------------------------------------------------------


_NEED_CONFIG = ("files", "device-file", "broker", "buffer", "models", "device")


def _guarded(check: str, run: Callable[[], list[Row]]) -> list[Row]:
    """The check's rows, or one FAIL row if the check itself broke (a bug must not hide the others)."""
    try:
        return run()
    except Exception as exc:
        return [_broken(check, exc)]


def _broken(check: str, exc: BaseException) -> Row:
    return Row(
        check,
        "-",
        "FAIL",
        f"the check itself failed: {_text(exc)}",
        "run the doctor as root; if it persists, report it with this line",
    )


async def run_checks(config_path: Path, user: ServiceUser, timeout: float) -> list[Row]:
    """Every check, the independent ones concurrently; rows in a fixed order."""
    config, rows = check_config(config_path)
    clock = asyncio.to_thread(_guarded, "clock", lambda: [check_clock(timeout)])
    if config is None:
        skipped = [Row(check, "-", "skip", "not checked: the config is invalid") for check in _NEED_CONFIG]
        return [*rows, *skipped[:3], *await clock, *skipped[3:]]  # the order of a full run
    mqtt = mqtt_settings(config)
    # Its own client id: the agent's, if it is running, would be thrown off the broker.
    client_id = f"{mqtt.client_id or f'edge-agent-{config.gateway.id}'}-doctor"
    rows += _guarded("files", lambda: check_files(config_path, config, user))
    rows += _guarded("device-file", lambda: check_device_files(config, user))
    base = config_path.parent.absolute()
    later = await asyncio.gather(
        asyncio.to_thread(_guarded, "broker", lambda: check_broker(mqtt, client_id, timeout)),
        clock,
        asyncio.to_thread(_guarded, "buffer", lambda: check_buffer(config, user)),
        asyncio.to_thread(_guarded, "models", lambda: check_models(config, base)),
        check_devices(config, timeout),
    )
    return rows + [row for group in later for row in group]


def render(rows: Iterable[Row], width: int) -> str:
    """A table, one row per line, each fix on its own indented line below."""
    rows = list(rows)
    head = ("CHECK", "TARGET", "VERDICT", "FINDING")
    cells = [(r.check, _shorten(r.target), r.verdict, r.finding.replace("\n", "; ")) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    lines = []
    for (check, target, verdict, finding), row in zip([head, *cells], [None, *rows], strict=True):
        lines.append(f"{check:<{widths[0]}}  {target:<{widths[1]}}  {verdict:<{widths[2]}}  {finding}".rstrip())
        if row is not None and row.fix:
            lines.append(
                textwrap.fill(
                    f"fix: {row.fix}", width=max(40, width), initial_indent="    ", subsequent_indent="         "
                )
            )
    return "\n".join(lines)


def _shorten(text: str, most: int = TARGET_WIDTH) -> str:
    """Long targets (by-id paths) lose their middle in the table; --json has them whole."""
    if len(text) <= most:
        return text
    keep = most - 3
    return f"{text[: keep // 2]}...{text[-(keep - keep // 2) :]}"


def verdict_line(rows: list[Row]) -> str:
    """``all checks passed`` or ``N problems`` (and warnings)."""
    fails = sum(r.verdict == "FAIL" for r in rows)
    warns = sum(r.verdict == "warn" for r in rows)
    warnings = f"{warns} warning{'s' if warns != 1 else ''}"
    if fails:
        return f"{fails} problem{'s' if fails != 1 else ''}" + (f", {warnings}" if warns else "")
    return f"all checks passed, {warnings}" if warns else "all checks passed"


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def doctor_main(argv: list[str]) -> int:
    """``edge-agent doctor -c site.yaml [--user NAME] [--json] [--timeout S]``; 1 if anything FAILs."""
    parser = argparse.ArgumentParser(
        prog="edge-agent doctor",
        description="Check a gateway: config, device files, broker, clock, buffer disk, models, devices.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="site file")
    parser.add_argument(
        "--user",
        default=None,
        help=f"service user to check access for (default: {DEFAULT_USER} if it exists, else you)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of {check, target, verdict, finding, fix}"
    )
    parser.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, help="seconds per check (default 5)")
    args = parser.parse_args(argv)
    name = args.user or default_user()
    try:
        user = ServiceUser.lookup(name)
    except KeyError:
        print(f"edge-agent doctor: no user {name!r} (--user)", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        # Drivers log what they do; the table says it. Keep errors visible on stderr.
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    rows = asyncio.run(run_checks(args.config, user, args.timeout))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        width = shutil.get_terminal_size((100, 24)).columns
        groups = ", ".join(sorted(_group_name(g) for g in user.groups))
        print(f"edge-agent doctor: {args.config}, service user {user.name} (groups: {groups})\n")
        print(render(rows, width))
        print(f"\n{verdict_line(rows)}")
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(doctor_main(sys.argv[1:]))
