"""The Identity seam on its own: what the core and the uplink see of an offer, and the MQTT
side's rules (which failures refuse the new certificate, what the fleet channel carries)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.uplinks.api import Identity, IdentityFiles, Reply
from agent.uplinks.mqtt.control import ControlChannel
from agent.uplinks.mqtt.errors import ConnectionLost
from agent.uplinks.mqtt.swap import Swap

OLD = IdentityFiles(Path("cert.pem"), Path("key.pem"))
NEW = IdentityFiles(Path("cert.next.pem"), Path("key.next.pem"))


def _lost(cause: BaseException | None) -> ConnectionLost:
    try:
        raise ConnectionLost(f"cannot connect to 127.0.0.1:8883: {cause}") from cause
    except ConnectionLost as exc:
        return exc


def test_an_offer_is_confirmed_or_refused_and_the_current_files_change_only_on_confirmation() -> None:
    async def run() -> None:
        identity = Identity(OLD)
        first = identity.offer(NEW)
        assert identity.files() == NEW and identity.current == OLD
        identity.refuse("certificate unknown")
        assert await first == "certificate unknown" and identity.files() == OLD and identity.pending is None
        second = identity.offer(NEW)
        third = identity.offer(IdentityFiles(Path("c3"), Path("k3")))
        assert await second == "replaced by a newer offer"
        identity.confirm()
        assert await third is None and identity.current.cert_file == Path("c3")
        identity.moved(OLD)  # renamed into place: same contents, no reconnect
        assert identity.files() == OLD

    asyncio.run(run())


def test_the_uplink_refuses_a_certificate_the_broker_turned_down_but_not_an_unreachable_broker() -> None:
    async def run() -> None:
        identity = Identity(OLD)
        swap = Swap(identity)
        outcome = identity.offer(NEW)
        assert swap.due()
        swap._trying = identity.pending  # what apply_tls records for the attempt
        assert not swap.failed(_lost(ConnectionRefusedError(111, "Connection refused")))
        assert identity.pending == NEW and not outcome.done()  # the offer stands
        swap._trying = identity.pending
        assert not swap.due()  # this attempt already uses the offered files
        assert swap.failed(_lost(ssl.SSLError(1, "tlsv13 alert certificate required")))
        assert identity.pending is None and "certificate required" in str(await outcome)
        outcome = identity.offer(NEW)
        swap._trying = identity.pending
        assert swap.failed(ConnectionLost("connection to 127.0.0.1:8883 closed (Unspecified error)"))  # no CONNACK
        assert "closed the connection before its CONNACK" in str(await outcome)
        outcome = identity.offer(NEW)
        swap._trying = identity.pending
        swap.connected()
        assert await outcome is None and identity.current == NEW

    asyncio.run(run())


class _Inbound:
    async def request(self, *_: Any, **__: Any) -> Reply:
        raise AssertionError("no request may reach the core on a renewal-only channel")

    def refused(self, *_: Any, **__: Any) -> None:
        raise AssertionError("nothing to refuse")


def test_without_the_fleet_channel_only_the_renewal_topics_are_carried() -> None:
    async def run() -> None:
        sent: list[tuple[str, bytes, bool]] = []

        def publish(topic: str, payload: bytes, retain: bool, _props: Any) -> bool:
            sent.append((topic, payload, retain))
            return True

        identity = Identity(OLD, "fleet/v1")
        channel = ControlChannel("fleet/v1", "gw-7", _Inbound(), publish, identity=identity, commands=False)  # type: ignore[arg-type]
        assert channel.subscriptions == [("fleet/v1/gw-7/identity/answer", 1)]
        channel.connected()
        answers = identity.ask(b'{"nonce":"n1"}')
        for _ in range(3):
            await asyncio.sleep(0)
        assert sent == [("fleet/v1/gw-7/identity/request", b'{"nonce":"n1"}', False)]  # never retained
        message = SimpleNamespace(topic="fleet/v1/gw-7/identity/answer", payload=b'{"nonce":"n1"}', retain=False)
        channel.on_message(None, None, message)
        assert answers.get_nowait() == b'{"nonce":"n1"}'
        channel.on_message(None, None, SimpleNamespace(topic="fleet/v1/gw-7/req/1/ping", payload=b"{}", retain=False))
        assert channel.ignored == 1
        retained = SimpleNamespace(topic="fleet/v1/gw-7/identity/answer", payload=b"{}", retain=True)
        channel.on_message(None, None, retained)  # a stale retained answer is never taken
        assert answers.empty()
        channel.connection_ended()
        channel.connected()  # a new connection: the request, not yet answered, goes out again
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(sent) == 2
        await channel.close()

    asyncio.run(run())
