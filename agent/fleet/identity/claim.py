"""The gateway's claim: a certificate for its own key, asked for with the claim credential.

One blocking loop (the agent starts nothing else until it returns): connect with the claim
certificate, subscribe to ``{root}/{claim_cn}/{serial}/answer``, then publish a request with a
CSR for a fresh pending key and a 128-bit nonce to ``.../request``. With MQTT 5 the request also
carries the answer topic as Response Topic and the nonce as Correlation Data. Answers with
another nonce (or correlation data) are not ours and are ignored.

- ``issued``: checked (verify.py); kept, promoted, done. Refused by the gateway: logged,
  counted, and asked again after ``retry_interval`` +-20 %.
- ``retry``: asked again after ``retry_after`` +-20 % (the responder's rate limit).
- ``refused``: an operator must act (unknown serial, already provisioned): asked again after
  ``retry_after``, never sooner than 60 s.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent import __version__
from agent.fleet.identity.files import Identity, IdentityFiles
from agent.fleet.identity.keystore import CsrFields, KeyStore
from agent.fleet.identity.verify import AnswerRefused, check_chain, load_roots

log = logging.getLogger(__name__)

REFUSED_MIN_WAIT = 60.0  # an unknown or already provisioned serial: no tighter loop than this
JITTER = 0.2


@dataclass(frozen=True)
class ClaimSettings:
    """Where and as whom to claim."""

    host: str
    port: int
    broker_ca: Path | None
    cert_file: Path
    key_file: Path
    v5: bool
    serial: str
    hardware_model: str
    root: str
    ca_file: Path
    answer_timeout: float
    retry_interval: float
    gateway_id: str | None  # the id a re-provisioning gateway already has


def claim_name(cert_file: Path) -> str:
    """The claim certificate's CN: the broker's user name for it, and a level of the claim topics.

    Raises:
        ValueError: naming the file when it has no usable CN.
    """
    try:
        cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except (OSError, ValueError, IndexError) as exc:
        raise ValueError(f"fleet.identity.claim.cert_file {cert_file}: not a PEM certificate ({exc})") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    if not name or any(c in name for c in "/+# "):
        raise ValueError(f"fleet.identity.claim.cert_file {cert_file}: its CN {name!r} cannot be a topic level")
    return name


def jittered(seconds: float) -> float:
    """``seconds`` +-20 %."""
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


def wait_after(status: str, retry_after: Any, retry_interval: float) -> float:
    """Seconds to wait after an answer that was not an accepted certificate."""
    after = float(retry_after) if isinstance(retry_after, int | float) and retry_after > 0 else retry_interval
    if status == "refused":
        return max(REFUSED_MIN_WAIT, after)
    return jittered(min(after, 3600.0))


class Claimer:
    """Runs the claim until a certificate is accepted or :meth:`stop` is called."""

    def __init__(self, settings: ClaimSettings, store: KeyStore, files: IdentityFiles) -> None:
        """Nothing happens until :meth:`run`."""
        self.settings = settings
        self.store = store
        self.files = files
        self.claim_cn = claim_name(settings.cert_file)
        base = f"{settings.root}/{self.claim_cn}/{settings.serial}"
        self.request_topic, self.answer_topic = f"{base}/request", f"{base}/answer"
        self.answers: queue.Queue[tuple[bytes, bytes | None]] = queue.Queue()
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self.attempts = 0
        self.refused_answers = 0  # issued answers this gateway did not accept

    def stop(self) -> None:
        """Give up (the agent is stopping); :meth:`run` returns None."""
        self._stop.set()

    def run(self) -> Identity | None:
        """Claim until done; the identity written, or None if stopped."""
        client = self._client()
        client.connect_async(self.settings.host, self.settings.port, keepalive=30)
        client.loop_start()
        try:
            while not self._stop.is_set():
                if not self.subscribed.wait(1.0):
                    continue
                wait = self._attempt(client)
                if wait is None:
                    return self.files.identity()
                log.info("claim: asking again in %.0f s", wait)
                self._stop.wait(wait)
            return None
        finally:
            client.disconnect()
            client.loop_stop()

    def _attempt(self, client: Any) -> float | None:
        """One request and its answer: None when a certificate was accepted, else the seconds to wait."""
        s = self.settings
        self.attempts += 1
        self.store.generate()
        nonce = secrets.token_hex(16)
        fields = CsrFields(s.serial, s.hardware_model, __version__, nonce, s.gateway_id or s.serial)
        request: dict[str, Any] = {
            "serial": s.serial, "hardware_model": s.hardware_model, "agent_version": __version__, "nonce": nonce,
            "csr": self.store.csr("pending", fields).decode(),
        }  # fmt: skip
        if s.gateway_id:
            request["gateway_id"] = s.gateway_id
        while not self.answers.empty():
            self.answers.get_nowait()  # answers to earlier attempts
        client.publish(self.request_topic, json.dumps(request).encode(), qos=1, properties=self._props(nonce))
        log.info("claim: request %d sent for serial %s as %s", self.attempts, s.serial, self.claim_cn)
        answer = self._answer(nonce)
        if answer is None:
            log.warning("claim: no answer within %.0f s", s.answer_timeout)
            return jittered(s.retry_interval)
        status = answer.get("status")
        if status == "issued":
            try:
                self._accept(answer)
            except AnswerRefused as exc:
                self.refused_answers += 1
                log.error("claim: answer refused: %s", exc)
                return jittered(s.retry_interval)
            return None
        reason = str(answer.get("reason", ""))[:200]
        log.warning("claim: responder answered %s: %s", str(status)[:20], reason)
        return wait_after(str(status), answer.get("retry_after"), s.retry_interval)

    def _answer(self, nonce: str) -> dict[str, Any] | None:
        """Our answer (by nonce, and by correlation data when there is any), or None after the timeout."""
        deadline = time.monotonic() + self.settings.answer_timeout
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                payload, correlation = self.answers.get(timeout=min(1.0, left))
            except queue.Empty:
                continue
            if correlation is not None and correlation != bytes.fromhex(nonce):
                continue
            try:
                doc = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(doc, dict) and doc.get("nonce") == nonce:
                return doc
        return None

    def _accept(self, answer: dict[str, Any]) -> None:
        """Check the issued answer, then keep it: cert.next.pem, identity.json, then promote.

        Raises:
            AnswerRefused: naming the field that is wrong.
        """
        gateway_id, chain = answer.get("gateway_id"), answer.get("certificate_chain")
        if not isinstance(gateway_id, str) or not gateway_id:
            raise AnswerRefused("gateway_id: missing")
        if self.settings.gateway_id and gateway_id != self.settings.gateway_id:
            raise AnswerRefused(f"gateway_id: {gateway_id[:64]!r}, but this gateway is {self.settings.gateway_id!r}")
        if not isinstance(chain, str):
            raise AnswerRefused("certificate_chain: missing")
        leaf = check_chain(chain, load_roots(self.settings.ca_file), self.store.public_key("pending"), gateway_id)
        brokers = answer.get("brokers")
        groups = answer.get("groups")
        version = answer.get("config_version")
        identity = Identity(
            gateway_id=gateway_id,
            serial=self.settings.serial,
            not_after=leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
            brokers=[b for b in brokers if isinstance(b, dict)] if isinstance(brokers, list) else [],
            config_version=version if isinstance(version, int) else None,
            groups=[g for g in groups if isinstance(g, str)] if isinstance(groups, list) else [],
            issued_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )
        self.files.write_cert_next(chain.encode())
        self.files.write_identity(identity)
        self.store.promote()
        self.files.promote_cert()
        log.info("claim: provisioned as %s, certificate valid until %s", gateway_id, identity.not_after)

    # ---- MQTT ---------------------------------------------------------------------------
    def _client(self) -> Any:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        s = self.settings
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"claim-{s.serial}",
            protocol=MQTTProtocolVersion.MQTTv5 if s.v5 else MQTTProtocolVersion.MQTTv311,
        )
        client.tls_set(
            ca_certs=str(s.broker_ca) if s.broker_ca else None, certfile=str(s.cert_file), keyfile=str(s.key_file)
        )
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_disconnect = lambda *_: self.subscribed.clear()
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("claim: broker refused the claim credential's connection: %s", reason)
            return
        client.subscribe(self.answer_topic, qos=1)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        correlation = getattr(getattr(message, "properties", None), "CorrelationData", None)
        self.answers.put((bytes(message.payload), bytes(correlation) if correlation is not None else None))

    def _props(self, nonce: str) -> Any:
        if not self.settings.v5:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.answer_topic
        props.CorrelationData = bytes.fromhex(nonce)
        return props
