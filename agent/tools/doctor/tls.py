"""The broker's TLS: the handshake the agent would make, and the server certificate's validity."""

from __future__ import annotations

import socket
import ssl
import time
from datetime import UTC, datetime
from typing import Any

from agent.tools.doctor.report import Row
from agent.uplinks.mqtt.config import MqttConfig

CERT_WARN_DAYS = 30
CLIENT_CERT_WAIT = 0.5  # s a TLS 1.3 broker has to refuse a client certificate after the handshake

# X509 verification codes (OpenSSL) that deserve their own fix.
_X509_NOT_YET_VALID = 9
_X509_EXPIRED = 10
_X509_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)
_X509_HOSTNAME_MISMATCH = 62


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
