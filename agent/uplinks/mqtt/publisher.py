"""Buffered rows to MQTT messages: one per event on its own topic, or CloudEvents JSON batches."""

from __future__ import annotations

import paho.mqtt.client as paho

from agent.contract.compact import compact_topic, compress
from agent.contract.events import batch_topic, mark_backlog, topic_for
from agent.store.outbox import Stored
from agent.uplinks.mqtt.acks import Acks
from agent.uplinks.mqtt.config import MqttConfig
from agent.uplinks.mqtt.errors import ConnectionLost
from agent.uplinks.mqtt.window import Window


def wire_payloads(rows: list[Stored]) -> list[bytes]:
    """Each row's event as it goes on the wire: as stored, plus ``"backlog":true`` if the feed
    handed it out from the backlog (a property of this delivery, so never stored).

    The first step from stored rows to messages: anything that re-encodes payloads (batching,
    compaction) starts from these.
    """
    return [mark_backlog(row.payload) if row.backlog else row.payload for row in rows]


class Publisher:
    """Hands rows to paho as messages and enters each in the window (or, at QoS 0, as delivered)."""

    def __init__(self, config: MqttConfig, gateway: str, window: Window, acks: Acks) -> None:
        """Topics are built from ``config.topic_prefix`` and ``gateway``."""
        self.config = config
        self.gateway = gateway
        self._window = window
        self._acks = acks
        self._topics: dict[tuple[str, str], str] = {}
        self._batch_topic = batch_topic(config.topic_prefix, gateway)
        self._compact_topic = compact_topic(config.topic_prefix, gateway)

    def each(self, client: paho.Client, rows: list[Stored]) -> int:
        """One MQTT message per event, on the event's own topic; returns the messages sent."""
        for row, payload in zip(rows, wire_payloads(rows), strict=True):
            key = (row.device, row.type)
            topic = self._topics.get(key)
            if topic is None:
                topic = self._topics[key] = topic_for(self.config.topic_prefix, self.gateway, row.device, row.type)
            self._send(client, topic, payload, [row.id])
        return len(rows)

    def batches(self, client: paho.Client, rows: list[Stored], max_events: int, max_bytes: int) -> int:
        """CloudEvents JSON batch format: a JSON array of events per message, on the batch topic.

        Returns the messages sent.
        """
        messages = 0
        start = 0
        payloads = wire_payloads(rows)
        while start < len(rows):
            end, size = start, 2
            while (
                end < len(rows) and end - start < max_events and (end == start or size + len(payloads[end]) < max_bytes)
            ):
                size += len(payloads[end]) + 1
                end += 1
            chunk = rows[start:end]
            payload = b"[" + b",".join(payloads[start:end]) + b"]"
            self._send(client, self._batch_topic, payload, [r.id for r in chunk])
            messages += 1
            start = end
        return messages

    def _wire(self, topic: str, payload: bytes) -> tuple[str, bytes]:
        """The message as it goes on the wire: compressed on the compact topic when ``compact`` is on.

        The last step before publishing, so the compressed JSON is exactly what would have been sent.
        """
        compact = self.config.compact
        if not compact.enabled:
            return topic, payload
        return self._compact_topic, compress(payload, compact.level)

    def _send(self, client: paho.Client, topic: str, payload: bytes, ids: list[int]) -> None:
        topic, payload = self._wire(topic, payload)
        info = client.publish(topic, payload, qos=self.config.qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish failed: {paho.error_string(info.rc)}")
        if self.config.qos == 0:
            self._acks.delivered(ids)  # at-most-once: written is as good as it gets
        else:
            self._window.add(info.mid, ids)
