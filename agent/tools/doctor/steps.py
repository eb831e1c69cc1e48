"""An MQTT uplink checked step by step, as the agent meets it: DNS, TCP, TLS, CONNACK, a test publish.

The technician page's "Check uplink" reaches it through the uplink plugin seam (the MQTT
plugin's ``checker``). Blocking, with a timeout per step: the page runs it in a worker thread. Each step has its time
and, when it fails, the cause and the fix in words (the doctor's words where it has them:
agent/tools/doctor). After a failed step the later ones are skipped, saying why.

The test message goes to ``{prefix}/{gateway}/test`` (QoS 1, not retained): a topic no consumer
subscribes to (docs/events.md, "Topics"), inside the gateway's own part of the broker.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from agent.tools.doctor.broker import check_client, connack_fix, loop_until
from agent.tools.doctor.tls import check_tls
from agent.uplinks.mqtt.config import PLAIN_PORT, TLS_PORT, MqttConfig

Status = Literal["ok", "warn", "fail", "skip"]
MAX_ADDRESSES = 2  # addresses tried for TCP: bounds the check's time on a name with many


@dataclass(frozen=True)
class Step:
    """One step's outcome."""

    name: str
    status: Status
    ms: float | None
    detail: str
    cause: str | None = None
    fix: str | None = None


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def check_topic(mqtt: MqttConfig, gateway: str) -> str:
    """Where the check's test message goes."""
    return f"{mqtt.topic_prefix}/{gateway}/test"


def check_uplink(mqtt: MqttConfig, gateway: str, timeout: float) -> dict[str, Any]:
    """Every step of one MQTT uplink: ``{"target", "ok", "steps": [...]}``."""
    steps = _steps(mqtt, gateway, timeout)
    return {
        "target": f"{mqtt.host}:{mqtt.port}",
        "ok": all(s.status in ("ok", "warn", "skip") for s in steps) and steps[-1].status != "skip",
        "steps": [asdict(s) for s in steps],
    }


def _steps(mqtt: MqttConfig, gateway: str, timeout: float) -> list[Step]:
    later = ["TCP", "TLS", "CONNACK", "publish"]
    resolved = _dns(mqtt.host, mqtt.port, timeout)
    if isinstance(resolved, Step):
        return [resolved, *_skipped(later, "no address for the broker")]
    dns = Step("DNS", "ok", resolved[1], resolved[2])
    connected = _tcp(resolved[0], mqtt, timeout)
    if isinstance(connected, Step):
        return [dns, connected, *_skipped(later[1:], "no TCP connection")]
    sock, tcp = connected
    with sock:
        if mqtt.tls.active:
            started = time.monotonic()
            row = check_tls(sock, mqtt, timeout)
            status: Status = "fail" if row.verdict == "FAIL" else "warn" if row.verdict == "warn" else "ok"
            if status == "fail":
                tls = Step("TLS", "fail", _ms(started), "handshake failed", row.finding, row.fix)
                return [dns, tcp, tls, *_skipped(later[2:], "the TLS handshake failed")]
            tls = Step("TLS", status, _ms(started), row.finding, None, row.fix)
        else:
            tls = Step("TLS", "skip", None, "off for this uplink: plain MQTT (uplink.mqtt.tls)")
    return [dns, tcp, tls, *_session(mqtt, gateway, timeout)]


def _skipped(names: list[str], why: str) -> list[Step]:
    return [Step(n, "skip", None, f"not tried: {why}") for n in names]


def _dns(host: str, port: int, timeout: float) -> tuple[list[Any], float, str] | Step:
    started = time.monotonic()
    # getaddrinfo has no timeout of its own: it waits in a thread of its own, abandoned if slow.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ui-dns")
    try:
        found = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout)
    except FutureTimeout:
        return Step(
            "DNS",
            "fail",
            _ms(started),
            "no answer",
            f"the name server did not answer within {timeout:g} s",
            "check the gateway's DNS server (/etc/resolv.conf, or the DHCP lease) and its network",
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        return Step(
            "DNS",
            "fail",
            _ms(started),
            "no address",
            f"cannot resolve {host}: {reason}",
            "check uplink.mqtt.host (its spelling) and the gateway's DNS server (/etc/resolv.conf)",
        )
    finally:
        pool.shutdown(wait=False)
    addresses = sorted({str(info[4][0]) for info in found})
    literal = addresses == [host]
    detail = f"{host} is an address: no lookup" if literal else f"{host} is {', '.join(addresses)}"
    return found, _ms(started), detail


def _tcp(found: list[Any], mqtt: MqttConfig, timeout: float) -> tuple[socket.socket, Step] | Step:
    started = time.monotonic()
    reasons: list[str] = []
    for family, kind, proto, _name, address in found[:MAX_ADDRESSES]:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            reasons.append(f"{address[0]} port {address[1]}: {why}")
            continue
        return sock, Step("TCP", "ok", _ms(started), f"connected to {address[0]} port {address[1]}")
    where = f"{mqtt.host}:{mqtt.port}"
    expected = TLS_PORT if mqtt.tls.active else PLAIN_PORT
    if all("refused" in r for r in reasons):
        fix = (
            f"start the broker or point uplink.mqtt.port at the port it listens on "
            f"(usually {expected} for {'TLS' if mqtt.tls.active else 'plain MQTT'})"
        )
    else:
        fix = f"check that the broker at {where} is up and that no firewall between it and the gateway drops the port"
    return Step("TCP", "fail", _ms(started), "no connection", "; ".join(reasons), fix)


def _session(mqtt: MqttConfig, gateway: str, timeout: float) -> list[Step]:
    """CONNACK with the agent's protocol, TLS and credentials, then a QoS 1 publish and its PUBACK."""
    client_id = f"{mqtt.client_id or f'edge-agent-{gateway}'}-ui-check"  # never the agent's own session
    client = check_client(mqtt, client_id, timeout)
    who = f"user {mqtt.username}" if mqtt.username is not None else "anonymous"
    answers: list[Any] = []
    acks: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    client.on_publish = lambda _c, _u, _mid, reason, _p: acks.append(reason)
    try:
        return _exchange(client, mqtt, gateway, timeout, who, answers, acks)
    finally:
        with suppress(Exception):
            client.disconnect()
            client.loop(timeout=0.1)


def _exchange(
    client: Any, mqtt: MqttConfig, gateway: str, timeout: float, who: str, answers: list[Any], acks: list[Any]
) -> list[Step]:
    started = time.monotonic()
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=int(mqtt.keepalive))
        open_ = loop_until(client, answers, started + timeout)
    except OSError as exc:  # ssl.SSLError is one
        return [
            Step("CONNACK", "fail", _ms(started), "no session", f"CONNECT failed: {exc}", "see the TCP and TLS steps"),
            *_skipped(["publish"], "no MQTT session"),
        ]
    if not answers:
        cause = f"no CONNACK within {timeout:g} s" if open_ else "the broker closed the connection before CONNACK"
        return [
            Step(
                "CONNACK",
                "fail",
                _ms(started),
                "no answer",
                cause,
                "check the broker's log for why it dropped the client",
            ),
            *_skipped(["publish"], "no MQTT session"),
        ]
    reason = answers[0]
    if reason.is_failure:
        step = Step(
            "CONNACK",
            "fail",
            _ms(started),
            f"refused ({who})",
            f"the broker refused CONNECT: {reason}",
            connack_fix(str(reason)),
        )
        return [step, *_skipped(["publish"], "the broker refused the session")]
    connack = Step("CONNACK", "ok", _ms(started), f"{reason} (MQTT {mqtt.protocol}, {who})")
    return [connack, _publish(client, mqtt, gateway, timeout, acks)]


def _publish(client: Any, mqtt: MqttConfig, gateway: str, timeout: float, acks: list[Any]) -> Step:
    topic = check_topic(mqtt, gateway)
    payload = json.dumps({"check": "uplink", "gateway": gateway, "time": datetime.now(UTC).isoformat()})
    started = time.monotonic()
    client.publish(topic, payload, qos=1)
    open_ = loop_until(client, acks, started + timeout)
    acl = (
        f"let this gateway publish under {mqtt.topic_prefix}/{gateway}/ in the broker's access list "
        "(its log says what it refused)"
    )
    if not acks:
        cause = f"no PUBACK within {timeout:g} s" if open_ else "the broker closed the connection on the test message"
        return Step("publish", "fail", _ms(started), topic, cause, acl)
    reason = acks[0]
    if getattr(reason, "is_failure", False):
        return Step("publish", "fail", _ms(started), topic, f"the broker refused the message: {reason}", acl)
    return Step("publish", "ok", _ms(started), f"PUBACK for QoS 1 on {topic}")
