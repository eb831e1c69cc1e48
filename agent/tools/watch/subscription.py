"""The watcher's MQTT session: persistent, so a reconnect (or a restart with ``--client-id``) misses nothing.

MQTT 3.1.1: clean session off. MQTT 5: clean start off and a session expiry. QoS 1, and paho
acknowledges a message only after the callback that checked it returned.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import threading
from collections.abc import Callable
from typing import Any

from agent.tools.broker_args import apply_login
from agent.tools.watch.options import GENERATED_SESSION_S, UsageError

OnMessage = Callable[[str, bytes, bool], None]  # topic, payload, retained
_SUBSCRIBE_WAIT_S = 10.0


class SessionError(Exception):
    """The broker cannot be reached or refused us (exit status 1)."""


class Session:
    """A connected, subscribed client whose network loop runs in paho's thread."""

    def __init__(self, args: argparse.Namespace, topic: str, on_message: OnMessage) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.topic = topic
        self.persistent = args.client_id is not None
        self.client_id = args.client_id or f"edge-agent-watch-{secrets.token_hex(6)}"
        self._v5 = args.protocol == "5"
        self._expiry = args.session_expiry if self.persistent else GENERATED_SESSION_S
        self._on_message = on_message
        self._subscribed = threading.Event()
        self._refused = ""
        self.resumed: bool | None = None  # whether the broker still had our session
        kwargs: dict[str, Any] = {} if self._v5 else {"clean_session": False}
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            **kwargs,
        )
        self.client.on_connect = self._connected
        self.client.on_subscribe = self._suback
        self.client.on_message = self._message
        self.client.reconnect_delay_set(1, 10)
        _credentials(self.client, args)

    def open(self, host: str, port: int) -> None:
        """Connect and subscribe; raises :class:`SessionError` if that does not happen within 10 s."""
        properties = None
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._expiry
        try:
            if self._v5:
                self.client.connect(host, port, keepalive=30, clean_start=False, properties=properties)
            else:
                self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise SessionError(f"cannot reach the broker {host}:{port}: {exc}") from exc
        self.client.loop_start()
        if not self._subscribed.wait(_SUBSCRIBE_WAIT_S):
            self.client.loop_stop()
            why = self._refused or "no answer"
            raise SessionError(f"the broker {host}:{port} did not let us subscribe to {self.topic}: {why}")

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def close(self) -> None:
        """Disconnect; a generated id first unsubscribes, so its leftover session queues nothing."""
        if not self.persistent:
            done = threading.Event()
            self.client.on_unsubscribe = lambda *_: done.set()
            self.client.unsubscribe(self.topic)
            done.wait(2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def _connected(self, client: Any, _userdata: Any, flags: Any, reason: Any, _properties: Any) -> None:
        if reason.is_failure:
            self._refused = f"connection refused: {reason}"
            print(f"watch: {self._refused}", file=sys.stderr)
            return
        self.resumed = bool(flags.session_present)
        # Subscribing again on a resumed session changes nothing but re-sends the retained topics.
        client.subscribe(self.topic, qos=1)

    def _suback(self, _client: Any, _userdata: Any, _mid: int, reasons: Any, _properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._refused = f"subscription refused: {', '.join(str(r) for r in reasons)}"
            return
        if not self._subscribed.is_set():
            state = "resumed" if self.resumed else "new"
            print(f"watch: subscribed to {self.topic} as {self.client_id} ({state} session)", file=sys.stderr)
        self._subscribed.set()

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._on_message(message.topic, bytes(message.payload), bool(message.retain))


def _credentials(client: Any, args: argparse.Namespace) -> None:
    try:
        apply_login(client, args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
