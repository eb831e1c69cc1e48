"""MQTT 5 request/response on a real Mosquitto with a real agent connected with protocol 5:
``edge-agent fleet cmd --protocol 5`` sends Response Topic, Correlation Data and Message Expiry;
the gateway echoes the correlation data with a ``status`` user property, answers on the response
topic only inside its own subtree, and lets its replies expire. A raw paho v5 client sees it all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.envelope import COMMAND_TYPE, make_body, sign
from agent.fleet.keys import generate_key, load_private_key
from agent.tools.fleet.mqtt5 import Exchange
from tests.conftest import ROOT, AgentProcess, Mosquitto, wait_for


class V5:
    """A raw MQTT 5 client that records every message with its properties."""

    def __init__(self, port: int, *filters: str) -> None:
        self.seen: list[tuple[str, bytes, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"v5-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        props = message.properties
        found = {name: getattr(props, name) for name in ("ResponseTopic", "CorrelationData", "MessageExpiryInterval",
                                                         "UserProperty") if hasattr(props, name)}  # fmt: skip
        with self._lock:
            self.seen.append((message.topic, bytes(message.payload), found))

    def on(self, prefix: str) -> list[tuple[str, bytes, dict[str, Any]]]:
        with self._lock:
            return [m for m in self.seen if m[0].startswith(prefix)]

    def request(self, request_id: str, payload: bytes, **properties: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for name, value in properties.items():
            setattr(props, name, value)
        self.client.publish(f"fleet/v1/gw-test/req/{request_id}/ping", payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def gateway(tmp_path: Path, broker: Mosquitto, agent_factory: Any) -> dict[str, Any]:
    pem, public, key_id = generate_key()
    key = tmp_path / "ops.pem"
    key.write_bytes(pem)
    key.chmod(0o600)
    site = tmp_path / "site.yaml"
    site.write_text(
        "gateway: {id: gw-test, site: lab}\n"
        f"uplink:\n  mqtt: {{host: 127.0.0.1, port: {broker.port}, protocol: '5', keepalive: 5s,"
        " reconnect_min: 200ms, reconnect_max: 1s}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\n"
        "fleet:\n  enabled: true\n  clock: trusted\n"
        f"  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read]}}]\n"
        "devices:\n  - {id: meter-1, driver: virtual, kind: meter, interval: 100ms}\n"
    )
    agent: AgentProcess = agent_factory(site)
    wait_for(lambda: "uplink connected" in agent.output(), 20, "the agent to connect")
    return {"key": key, "key_id": key_id, "port": broker.port, "agent": agent}


def _cli(g: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "cmd", "gw-test", "ping", "--key", str(g["key"]),
         "--key-id", g["key_id"], "--port", str(g["port"]), "--json", "--timeout", "10", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip


def test_the_cli_and_the_gateway_speak_mqtt5_request_response(gateway: dict[str, Any]) -> None:
    watch = V5(gateway["port"], "fleet/v1/gw-test/#")
    try:
        done = _cli(gateway, "--protocol", "5", "--ttl", "30")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert json.loads(done.stdout)["data"]["gateway"] == "gw-test"
        [(topic, _, request)] = wait_for(lambda: watch.on("fleet/v1/gw-test/req/"), 5, "the request")
        request_id = topic.split("/")[4]
        assert request["ResponseTopic"] == f"fleet/v1/gw-test/res/{request_id}/reply"
        assert len(request["CorrelationData"]) == 16
        assert 25 <= request["MessageExpiryInterval"] <= 30  # the broker passes on what is left of it
        [(topic, body, reply)] = wait_for(lambda: watch.on("fleet/v1/gw-test/res/"), 5, "the reply")
        assert topic == request["ResponseTopic"]
        assert reply["CorrelationData"] == request["CorrelationData"]
        assert reply["UserProperty"] == [("status", "ok")]
        assert 55 <= reply["MessageExpiryInterval"] <= 60
        assert json.loads(body)["status"] == "ok"

        # An MQTT 3.1.1 operator still gets its answer from a gateway on MQTT 5: ids in topics.
        done = _cli(gateway)
        assert done.returncode == 0, (done.stdout, done.stderr)
    finally:
        watch.close()


def test_a_response_topic_outside_the_gateways_subtree_is_never_used(gateway: dict[str, Any]) -> None:
    key = load_private_key(gateway["key"])

    def signed(request_id: str) -> bytes:
        body = make_body(target="gw-test", ttl=60, fields={"command": "ping", "id": request_id, "args": {}})
        return sign(COMMAND_TYPE, body, key, gateway["key_id"])

    watch = V5(gateway["port"], "#")
    try:
        foreign = {
            "f1": "fleet/v1/gw-other/res/f1/ok",  # another gateway's replies
            "f2": "ioc/v1/gw-test/meter-1/reading",  # the events: a reply must never pass as one
            "f3": "fleet/v1/gw-test/res/#",  # a wildcard: publishing to it would end the connection
            "f4": "fleet/v1/gw-test/resx/f4",  # a look-alike of the subtree
            "f5": "fleet/v1/gw-test/res/",  # the subtree's root itself, no level below it
        }
        for request_id, response_topic in foreign.items():
            correlation = b"c-" + request_id.encode()
            watch.request(request_id, signed(request_id), ResponseTopic=response_topic, CorrelationData=correlation)
        inside = "fleet/v1/gw-test/res/mine/1"
        watch.request("i1", signed("i1"), ResponseTopic=inside, CorrelationData=b"c-i1")
        watch.request("n1", signed("n1"))  # no properties at all: the default topic
        wait_for(lambda: len(watch.on("fleet/v1/gw-test/res/")) == 7, 10, "seven replies")
        replies = {topic: props for topic, _, props in watch.on("fleet/v1/gw-test/res/")}
        for request_id in foreign:
            props = replies[f"fleet/v1/gw-test/res/{request_id}/ok"]
            assert props["CorrelationData"] == b"c-" + request_id.encode()
            assert props["UserProperty"] == [("status", "ok")]
        assert replies[inside]["CorrelationData"] == b"c-i1"
        assert "CorrelationData" not in replies["fleet/v1/gw-test/res/n1/ok"]
        assert replies["fleet/v1/gw-test/res/n1/ok"]["UserProperty"] == [("status", "ok")]
        assert watch.on("fleet/v1/gw-other/") == []
        assert not [m for m in watch.on("ioc/v1/gw-test/meter-1/") if b'"status":"ok"' in m[1]]
    finally:
        watch.close()
    output = gateway["agent"].output()
    assert "outside fleet/v1/gw-test/res/" in output and "Traceback" not in output
    assert output.count("answered on the default topic") == 1  # one line a minute, however many


def test_the_cli_takes_only_its_own_correlation_data() -> None:
    """What ``fleet cmd --protocol 5`` accepts as its answer, on real paho messages."""
    import argparse

    exchange = Exchange(argparse.Namespace(protocol="5", ttl=59.2), "fleet/v1/gw-1", "abc")
    assert exchange.expiry == 60 and exchange.properties.ResponseTopic == "fleet/v1/gw-1/res/abc/reply"

    def message(correlation: bytes | None) -> paho.MQTTMessage:
        m = paho.MQTTMessage(topic=b"fleet/v1/gw-1/res/abc/reply")
        m.properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            m.properties.CorrelationData = correlation
        return m

    taken: list[Any] = []
    handler = exchange.replies_only(lambda _c, _u, m: taken.append(m))
    handler(None, None, message(b"somebody else's"))
    assert taken == [] and exchange.foreign == 1
    handler(None, None, message(exchange.correlation))
    handler(None, None, message(None))  # a gateway on MQTT 3.1.1: matched by the id in the topic
    assert len(taken) == 2
    plain = Exchange(argparse.Namespace(protocol="3.1.1", ttl=60), "fleet/v1/gw-1", "abc")
    assert plain.properties is None and plain.ours(message(b"anything"))
