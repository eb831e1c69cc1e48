"""MQTT 5 request/response for ``edge-agent fleet cmd --protocol 5`` (docs/fleet.md, "MQTT 5").

A request carries a Response Topic inside the gateway's own reply subtree (the only place a
gateway answers), Correlation Data the answer must echo, and a Message Expiry equal to the
signed command's validity: a broker never delivers it after the gateway would refuse it as
expired anyway. With MQTT 3.1.1 none of this exists and the ids in the topics do the matching.
"""

from __future__ import annotations

import argparse
import math
import secrets
from collections.abc import Callable
from typing import Any

OnMessage = Callable[[Any, Any, Any], None]


class Exchange:
    """One request's MQTT 5 properties, and which incoming messages may be its answer."""

    def __init__(self, args: argparse.Namespace, base: str, request_id: str) -> None:
        """``base``: ``{root}/{gateway}``; ``args.ttl``: seconds the signed command stays valid."""
        self.v5 = args.protocol == "5"
        self.correlation = secrets.token_bytes(16)
        # Under res/{id}/: the CLI's subscription to res/{id}/+ already covers it.
        self.response_topic = f"{base}/res/{request_id}/reply"
        self.expiry = max(1, math.ceil(args.ttl))
        self.foreign = 0  # answers on our topics carrying another request's correlation data

    @property
    def properties(self) -> Any:
        """The PUBLISH properties of the request (None with MQTT 3.1.1)."""
        if not self.v5:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.response_topic
        props.CorrelationData = self.correlation
        props.MessageExpiryInterval = self.expiry
        return props

    def ours(self, message: Any) -> bool:
        """Whether ``message`` may be the answer: with MQTT 5, correlation data, if present, must be ours.

        An answer without any (a gateway connected with MQTT 3.1.1, where the broker drops the
        properties) is matched by the request id in its topic, as with 3.1.1.
        """
        correlation = getattr(getattr(message, "properties", None), "CorrelationData", None)
        if not self.v5 or correlation is None or bytes(correlation) == self.correlation:
            return True
        self.foreign += 1
        return False

    def replies_only(self, on_message: OnMessage) -> OnMessage:
        """``on_message`` that sees only messages :meth:`ours` accepts."""

        def handler(client: Any, userdata: Any, message: Any) -> None:
            if self.ours(message):
                on_message(client, userdata, message)

        return handler
