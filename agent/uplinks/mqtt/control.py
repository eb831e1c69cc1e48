"""The fleet control channel on the uplink's own connection (docs/fleet.md).

Requests arrive on ``{root}/{gateway}/req/{id}/{command}`` (MQTT 3.1.1 carries the ids in
topics, as Eclipse Hono does); the core checks each signed request and answers; the reply goes
to ``{root}/{gateway}/res/{id}/{status}``, always inside this gateway's own subtree. With MQTT 5
a request may name its own Response Topic (used only inside that subtree) and Correlation Data
(echoed, with the status as a user property); replies expire after a minute. The
desired-state document arrives, retained, on ``{root}/{gateway}/desired``; the core's reports
(``reported`` there too, ``inventory`` beside the events) go out retained on every connection
and on each change. Nothing here waits on the event path: each request is a task of its own,
and everything this channel sends is paced to 50 messages and 256 KiB a second (half of AWS IoT
Core's per-connection limits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.uplinks.api import Identity, Inbound, Reply, Reports

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024  # bigger requests are refused unread
MAX_REPLY_BYTES = 128 * 1024
REPLIES_PER_SECOND = 50
REPLY_BYTES_PER_SECOND = 256 * 1024
PENDING_MAX = 64  # requests being handled at once; more are refused as busy
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
REPLY_EXPIRY = 60  # s (MQTT 5 Message Expiry): an answer nobody took within a minute is stale
FOREIGN_LOG_INTERVAL = 60.0  # s between log lines about refused response topics

# publish(topic, payload, retain, properties): MQTT 5 PUBLISH properties by paho's names, or None.
Publish = Callable[[str, bytes, bool, "dict[str, Any] | None"], bool]


@dataclass(frozen=True)
class ReplyTo:
    """Where and how one request is answered: its MQTT 5 response topic and correlation data, if any."""

    topic: str | None = None  # inside this gateway's reply subtree, or None: the default topic
    correlation: bytes | None = None


class Pace:
    """A token bucket for messages and bytes: ``wait(n)`` returns once both allow ``n`` bytes."""

    def __init__(self, messages: float, octets: float) -> None:
        """Rates per second; a burst of one second's worth is allowed."""
        self._rates = (messages, octets)
        self._tokens = [messages, octets]
        self._at = time.monotonic()

    async def wait(self, size: int) -> None:
        """Take one message of ``size`` bytes, sleeping until the rates allow it."""
        while True:
            now = time.monotonic()
            for i, rate in enumerate(self._rates):
                self._tokens[i] = min(rate, self._tokens[i] + (now - self._at) * rate)
            self._at = now
            need = (1.0, float(min(size, self._rates[1])))
            short = max((need[i] - self._tokens[i]) / self._rates[i] for i in (0, 1))
            if short <= 0:
                self._tokens[0] -= need[0]
                self._tokens[1] -= need[1]
                return
            await asyncio.sleep(short)


class ControlChannel:
    """Requests in, replies out, on one gateway's control topics."""

    def __init__(
        self,
        root: str,
        gateway: str,
        inbound: Inbound,
        publish: Publish,
        *,
        reports: Reports | None = None,
        topic_prefix: str = "ioc/v1",
        v5: bool = False,
        identity: Identity | None = None,
        commands: bool = True,
    ) -> None:
        """``publish(topic, payload, retain, properties)`` sends on the current connection (False: not
        connected); ``v5``: the connection is MQTT 5, so requests may carry response properties;
        ``identity``: renewal requests go out and answers come in here (docs/fleet.md);
        ``commands``: False carries renewal alone (no requests, no desired document)."""
        self.requests = f"{root}/{gateway}/req/+/+"
        self.desired = f"{root}/{gateway}/desired"
        self._replies = f"{root}/{gateway}/res"
        self._identity = identity
        self._commands = commands
        self.identity_answer = f"{root}/{gateway}/identity/answer"
        self._identity_request = f"{root}/{gateway}/identity/request"
        # Where each report goes: the inventory is an event for the operations centre too.
        self._report_topics = {
            "reported": f"{root}/{gateway}/reported",
            "inventory": f"{topic_prefix}/{gateway}/inventory",
        }
        # Update bundles (agent/fleet/bundles/transfer.py): a retained offer and chunks in, a status out.
        self.bundle_topics = {f"{root}/{gateway}/bundle/offer": "bundle_offer",
                              f"{root}/{gateway}/bundle/chunk": "bundle_chunk"}  # fmt: skip
        self._report_topics["bundle"] = f"{root}/{gateway}/bundle/status"
        self._bundle_tasks: set[asyncio.Task[None]] = set()
        self._inbound = inbound
        self._publish = publish
        self._reports = reports
        self._pace = Pace(REPLIES_PER_SECOND, REPLY_BYTES_PER_SECOND)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None
        self._asker: asyncio.Task[None] | None = None
        self._document: bytes | None = None  # the newest desired document not handed over yet
        self._documents: asyncio.Task[None] | None = None
        self.ignored = 0
        self._v5 = v5
        self.foreign_response_topics = 0  # MQTT 5 response topics outside our subtree, not used
        self._foreign_logged = -FOREIGN_LOG_INTERVAL

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        """What to subscribe to on every (clean) connection."""
        renewal = [(self.identity_answer, 1)] if self._identity is not None else []
        bundles = [(topic, 1) for topic in self.bundle_topics]
        return [*([(self.requests, 1), (self.desired, 1), *bundles] if self._commands else []), *renewal]

    def connected(self) -> None:
        """A new connection: publish every report again (the broker may have lost them), then each change."""
        self.connection_ended()
        loop = asyncio.get_running_loop()
        if self._reports is not None:
            self._reporter = loop.create_task(self._report(self._reports), name="fleet-reports")
        if self._identity is not None:
            self._asker = loop.create_task(self._ask(self._identity), name="fleet-renewal-request")

    def connection_ended(self) -> None:
        """Stop publishing reports until the next connection."""
        for task in (self._reporter, self._asker):
            if task is not None:
                task.cancel()
        self._reporter = self._asker = None

    async def _ask(self, identity: Identity) -> None:
        """The renewal request, once per connection and again when the core makes a new one
        (not retained: a request must not be answered again after it was answered)."""
        done = 0  # the request version handled on this connection
        while True:
            version, body = identity.request_version, identity.request
            if version != done:
                done = version
                if body is not None:
                    await self._pace.wait(len(body))
                    if not self._publish(self._identity_request, body, False, None):
                        return
            await identity.asked(done)

    async def _report(self, reports: Reports) -> None:
        sent: dict[str, bytes] = {}
        while True:
            version = reports.version
            for name, body in reports.current().items():
                topic = self._report_topics.get(name)
                if topic is None or sent.get(name) == body:
                    continue
                await self._pace.wait(len(body))
                if not self._publish(topic, body, True, None):
                    return  # the connection is going: the next one publishes everything again
                sent[name] = body
            await reports.changed(version)

    def on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        """paho's callback (on the event loop): take the request or document, answer later."""
        if message.topic == self.identity_answer:
            if self._identity is not None and not message.retain and len(message.payload) <= MAX_REQUEST_BYTES:
                self._identity.answered(bytes(message.payload))
            return
        if not self._commands:
            self.ignored += 1  # renewal only: nothing else was subscribed to
            return
        if message.topic == self.desired:
            self._take_document(bytes(message.payload))
            return
        kind = self.bundle_topics.get(message.topic)
        if kind is not None:  # in arrival order: each handler's first step runs before the next task's
            task = asyncio.get_running_loop().create_task(self._inbound.document(kind, bytes(message.payload),
                                                                                 origin="mqtt"))  # fmt: skip
            self._bundle_tasks.add(task)
            task.add_done_callback(self._bundle_tasks.discard)
            return
        parts = message.topic.split("/")
        request_id, name = parts[-2], parts[-1]
        if len(parts) < 4 or parts[-3] != "req" or not _ID.match(request_id):
            self.ignored += 1  # no id to answer to, inside our subtree: nothing to do
            return
        to = self._reply_to(message) if self._v5 else ReplyTo()
        if message.retain:
            # A retained request would run again on every reconnect: never act on one.
            self._spawn(request_id, to, Reply("rejected", code="retained", error="requests must not be retained"))
            return
        if not _NAME.match(name):
            self._spawn(request_id, to, Reply("unsupported", code="unknown_command", error="not a command name"))
            return
        if len(message.payload) > MAX_REQUEST_BYTES:
            error = f"{len(message.payload)} bytes; requests are at most {MAX_REQUEST_BYTES}"
            self._spawn(request_id, to, Reply("rejected", code="too_large", error=error))
            return
        if len(self._tasks) >= PENDING_MAX:
            self._spawn(request_id, to, Reply("rejected", code="busy", error="too many requests in progress"))
            return
        task = asyncio.get_running_loop().create_task(
            self._handle(request_id, to, name, bytes(message.payload)), name=f"fleet-{request_id}"
        )
        self._keep(task)

    def _reply_to(self, message: Any) -> ReplyTo:
        """The request's MQTT 5 Response Topic and Correlation Data.

        A response topic is the sender's input: one outside ``{root}/{gateway}/res/`` (another
        gateway's subtree, the events, a wildcard) is never published to; the answer goes to the
        default topic instead and the refusal is counted.
        """
        properties = getattr(message, "properties", None)
        topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        if topic is not None and not self._own_reply_topic(topic):
            self.foreign_response_topics += 1
            now = time.monotonic()
            if now - self._foreign_logged >= FOREIGN_LOG_INTERVAL:
                self._foreign_logged = now
                log.warning(
                    "fleet: a request asked to be answered on %.80r, outside %s/; answered on the default topic"
                    " (%d so far)",
                    topic,
                    self._replies,
                    self.foreign_response_topics,
                )
            topic = None
        return ReplyTo(topic, bytes(correlation) if correlation is not None else None)

    def _own_reply_topic(self, topic: Any) -> bool:
        prefix = f"{self._replies}/"
        return (
            isinstance(topic, str)
            and topic.startswith(prefix)
            and len(topic) > len(prefix)
            and not any(c in topic for c in "+#\x00")
            and len(topic.encode()) <= 65535
        )

    def _take_document(self, data: bytes) -> None:
        # One document at a time, in order; a newer one waiting replaces an older one that has
        # not been handed over (only the newest desired state matters).
        self._document = data
        if self._documents is None or self._documents.done():
            self._documents = asyncio.get_running_loop().create_task(self._hand_over(), name="fleet-desired")

    async def _hand_over(self) -> None:
        while self._document is not None:
            data, self._document = self._document, None
            try:
                await self._inbound.document("config", data, origin="mqtt")
            except Exception:  # the core reports refusals itself; this is a bug, kept off the uplink
                log.exception("the desired document could not be handed over")

    def _spawn(self, request_id: str, to: ReplyTo, reply: Reply) -> None:
        """Answer a request refused here, before the core saw it (the core still counts it)."""
        if reply.code is not None:
            self._inbound.refused(reply.code, origin="mqtt")
        self._keep(asyncio.get_running_loop().create_task(self._reply(request_id, to, reply)))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, request_id: str, to: ReplyTo, name: str, payload: bytes) -> None:
        try:
            reply = await self._inbound.request(name, request_id, payload, origin="mqtt")
        except Exception as exc:  # the core answers refusals itself; this is a bug, still answered
            log.exception("fleet request %s (%s) failed", request_id, name)
            reply = Reply("failed", code="internal", error=f"{type(exc).__name__}: {exc}")
        await self._reply(request_id, to, reply)

    async def _reply(self, request_id: str, to: ReplyTo, reply: Reply) -> None:
        body = json.dumps(reply.to_json(), separators=(",", ":"), default=str).encode()
        if len(body) > MAX_REPLY_BYTES:
            error = f"the answer is {len(body)} bytes; replies are at most {MAX_REPLY_BYTES}"
            reply = Reply("failed", code="reply_too_large", error=error)
            body = json.dumps(reply.to_json(), separators=(",", ":")).encode()
        await self._pace.wait(len(body))
        properties: dict[str, Any] | None = None
        if self._v5:
            properties = {"UserProperty": [("status", reply.status)], "MessageExpiryInterval": REPLY_EXPIRY}
            if to.correlation is not None:
                properties["CorrelationData"] = to.correlation
        topic = to.topic or f"{self._replies}/{request_id}/{reply.status}"
        if not self._publish(topic, body, False, properties):
            log.info("fleet reply to %s dropped: not connected (the operator's command times out)", request_id)

    async def close(self) -> None:
        """Cancel requests in progress (at shutdown); a document being applied finishes on its own."""
        self.connection_ended()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
