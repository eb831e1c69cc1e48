"""The responder's broker side: requests in on the claim and renewal topics, answers out.

Claims arrive on ``{claim_root}/{claim_cn}/{serial}/request`` and are answered on
``{claim_root}/{claim_cn}/{serial}/answer``; renewals on ``{fleet_root}/{gw}/identity/request``,
answered on ``{fleet_root}/{gw}/identity/answer``. Nowhere else: an MQTT 5 Response Topic that
names another topic is ignored (and logged); its Correlation Data is echoed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from agent.fleet.provisioning.decide import Decider, Decision, Request

log = logging.getLogger("agent.fleet.provisioning")
# How long a request over the rate limit may wait for its slot before the answer is "retry": well
# inside a gateway's answer timeout (fleet.identity.claim.answer_timeout, 30 s by default).
HOLD_SECONDS = 10.0


class Responder:
    """Subscribes, decides, answers; counts what it did."""

    def __init__(self, decider: Decider, client: Any, *, v5: bool) -> None:
        """``client``: a paho client (connected by the caller); callbacks are set here."""
        self.decider = decider
        self.client = client
        self.v5 = v5
        self.counts: dict[str, int] = {}
        self.cpu_seconds = 0.0  # spent deciding (CSR checks and signing)
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()  # when the paced decisions of the last second ended
        config = decider.config
        self.claim_filter = f"{config.claim_root}/+/+/request"
        self.renew_filter = f"{config.fleet_root}/+/identity/request"
        client.on_message = self._on_message
        client.on_connect = self._on_connect

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the responder's connection: %s", reason)
            return
        client.subscribe([(self.claim_filter, 1), (self.renew_filter, 1)])
        log.info("provisioning responder listening on %s and %s", self.claim_filter, self.renew_filter)

    def request_of(self, topic: str, payload: bytes) -> tuple[Request, str] | None:
        """The request and its answer topic, or None if the topic is not a request topic."""
        config = self.decider.config
        claim_depth = config.claim_root.count("/") + 4
        parts = topic.split("/")
        if topic.startswith(config.claim_root + "/") and len(parts) == claim_depth and parts[-1] == "request":
            who, serial = parts[-3], parts[-2]
            return Request("claim", who, serial, payload), "/".join([*parts[:-1], "answer"])
        renew_depth = config.fleet_root.count("/") + 4
        if (
            topic.startswith(config.fleet_root + "/")
            and len(parts) == renew_depth
            and parts[-2:] == ["identity", "request"]
        ):
            return Request("renewal", parts[-3], None, payload), "/".join([*parts[:-1], "answer"])
        return None

    def _on_message(self, client: Any, _userdata: Any, message: Any) -> None:
        found = self.request_of(message.topic, message.payload)
        if found is None:
            return
        with self._lock:
            delay = self.decider.bucket.reserve(HOLD_SECONDS)
        if delay:  # its turn comes within the hold: answer then, rather than "retry" now
            timer = threading.Timer(delay, self._answer, (client, message, *found, True))
            timer.daemon = True
            timer.start()
        else:
            self._answer(client, message, *found, delay is not None)

    def _answer(self, client: Any, message: Any, request: Request, answer_topic: str, paced: bool) -> None:
        started = time.process_time()
        with self._lock:
            if paced and (late := self._window_full()):
                # Timers that fired late bunch up: never more than the rate in any second.
                timer = threading.Timer(late, self._answer, (client, message, request, answer_topic, True))
                timer.daemon = True
                timer.start()
                return
            decision = self.decider.decide(request, paced=paced)
            self.cpu_seconds += time.process_time() - started
            self.counts[decision.outcome] = self.counts.get(decision.outcome, 0) + 1
            _log_decision(request, decision)  # in the lock: the log's times are the decisions' order
            if paced:
                self._recent.append(time.monotonic())
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        if response_topic and response_topic != answer_topic:
            log.warning(
                "%s from %s: Response Topic %r is outside the requester's subtree: ignored, answering on %s",
                request.kind, request.who, str(response_topic)[:120], answer_topic,
            )  # fmt: skip
        client.publish(answer_topic, json.dumps(decision.answer).encode(), qos=1, properties=self._answer_props(props))

    def _window_full(self) -> float:
        """0.0 if one more paced decision keeps every second within the rate; else the seconds until it
        would (counted by when decisions end, so a slow one cannot push two seconds' worth into one)."""
        now = time.monotonic()
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if len(self._recent) >= self.decider.bucket.rate:
            return 1.0 - (now - self._recent[0]) + 0.001
        return 0.0

    def _answer_props(self, request_props: Any) -> Any:
        correlation = getattr(request_props, "CorrelationData", None)
        if not self.v5 or correlation is None:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = bytes(correlation)
        return props


def _log_decision(request: Request, decision: Decision) -> None:
    """Every decision, one line: what, who, outcome, why (never the CSR or the certificate)."""
    level = logging.INFO if decision.outcome != "refused" else logging.WARNING
    log.log(
        level, "%s serial=%s gateway=%s from=%s outcome=%s reason=%s", request.kind, decision.serial or "-",
        decision.gateway_id or "-", request.who[:64], decision.outcome, decision.reason,
    )  # fmt: skip


def audit_every_decision() -> None:
    """Take the log's fold of repeated lines (observability/logs.py) off: decisions are an audit trail.

    A gateway folds a fault repeated every poll into one line a minute; the responder must log the
    second issuance to a serial within a minute as surely as the first.
    """
    from agent.observability.logs import RepeatFilter

    for handler in logging.getLogger().handlers:
        for found in [f for f in handler.filters if isinstance(f, RepeatFilter)]:
            handler.removeFilter(found)
