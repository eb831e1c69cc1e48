"""The broker as the agent meets it: TCP connect, then TLS (see :mod:`.tls`), then MQTT CONNECT.

The doctor connects under its own client id, so a running agent's session is not taken over.
"""

from __future__ import annotations

import socket
import ssl
import time
from contextlib import suppress
from typing import Any

from agent.tools.doctor.report import Row
from agent.tools.doctor.tls import check_tls
from agent.uplinks.mqtt.config import MqttConfig


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


def check_client(mqtt: MqttConfig, client_id: str, timeout: float) -> Any:
    """A paho client that connects as the agent would (protocol, TLS, credentials), once, for a check."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    v5 = mqtt.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else True,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.connect_timeout = timeout
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, mqtt.password())
    if mqtt.tls.active:
        mqtt.tls.apply_to(client)
    return client


def check_mqtt_connect(mqtt: MqttConfig, client_id: str, timeout: float) -> Row:
    """CONNECT with the agent's protocol, TLS and credentials; report the CONNACK."""

    target = f"mqtt {mqtt.host}:{mqtt.port}"
    client = check_client(mqtt, client_id, timeout)
    who = "anonymous"
    if mqtt.username is not None:
        source = mqtt.password_file or ("$EDGE_AGENT_MQTT_PASSWORD" if mqtt.password() else None)
        who = f"user {mqtt.username}" + (f", password from {source}" if source else ", no password")
    answer: list[Any] = []
    closed = False
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.append(reason)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=int(mqtt.keepalive))
        closed = not loop_until(client, answer, time.monotonic() + timeout)
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
    return Row("broker", target, "FAIL", f"broker refused CONNECT: {text} ({who})", connack_fix(text))


def loop_until(client: Any, found: list[Any], deadline: float) -> bool:
    """Run paho's loop until ``found`` has an entry or ``deadline``; False if the broker closed the connection."""
    import paho.mqtt.client as paho

    while not found and time.monotonic() < deadline:
        if client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
            return False
    return True


def connack_fix(reason: str) -> str:
    """What to change for a CONNACK that refused the connection (its reason in paho's words)."""
    lowered = reason.lower()
    if "password" in lowered or "authori" in lowered:
        return "check uplink.mqtt.username / password_file (or $EDGE_AGENT_MQTT_PASSWORD) against the broker's accounts"
    if "identifier" in lowered:
        return "the broker rejects the client id: set uplink.mqtt.client_id to one it accepts"
    if "protocol" in lowered:
        return "set uplink.mqtt.protocol to a version the broker speaks (3.1.1 or 5)"
    return "check the broker's log for why it refused the connection"
