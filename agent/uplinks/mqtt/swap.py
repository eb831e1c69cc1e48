"""Changing the client certificate while the uplink runs (the :class:`~agent.uplinks.api.Identity` seam).

The core offers new files; the uplink stops publishing, waits for the PUBACKs in flight (so the
new connection sends nothing twice unless a PUBACK never came), disconnects cleanly (no last
will: the status topic never says ``offline``) and connects with the new files. A CONNACK
confirms them; a TLS or CONNACK refusal sends the uplink straight back to the old files, which
were never touched, and the core hears why. A broker that cannot be reached at all says nothing
about the certificate: the offer stays and the next attempt tries it again.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from typing import Any

from agent.uplinks.api import Identity, IdentityFiles
from agent.uplinks.mqtt.config import MqttConfig
from agent.uplinks.mqtt.errors import ConnectionLost, Resend

log = logging.getLogger(__name__)

SWAP_DRAIN = 5.0  # seconds to wait for the PUBACKs in flight before reconnecting with new files


class SwapNow(Resend):
    """The uplink ends the connection itself to connect with the client certificate it was offered."""


class Swap:
    """The uplink's side of an identity change: which files each attempt uses, and the outcome."""

    def __init__(self, identity: Identity | None) -> None:
        """``identity``: the core's holder, or None (the uplink's own tls settings, never changed)."""
        self.identity = identity
        self._trying: IdentityFiles | None = None  # offered files the current attempt connects with

    def apply_tls(self, client: Any, config: MqttConfig) -> None:
        """Set the client's TLS with the identity's files (or the settings' own, without one)."""
        identity = self.identity
        if identity is None:
            if config.tls.active:
                config.tls.apply_to(client)
            return
        files = identity.files()
        self._trying = identity.pending
        tls = config.tls.model_copy(update={"cert_file": files.cert_file, "key_file": files.key_file})
        try:
            tls.apply_to(client)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConnectionLost(f"cannot load the client certificate {files.cert_file}: {exc}") from exc

    def due(self) -> bool:
        """New files were offered since this connection was made: drain and reconnect."""
        return self.identity is not None and self.identity.pending not in (None, self._trying)

    def drained(self, missing: int) -> SwapNow:
        """What ends the connection once drained (``missing``: PUBACKs that did not come, sent again)."""
        extra = f"; {missing} message(s) without PUBACK are sent again" if missing else ""
        return SwapNow(f"reconnecting with the new client certificate{extra}")

    def connected(self) -> None:
        """A CONNACK accepted this attempt: offered files are now the identity's current ones."""
        identity, trying, self._trying = self.identity, self._trying, None
        if identity is not None and trying is not None and identity.pending is trying:
            identity.confirm()
            log.info("uplink: the new client certificate %s was accepted by the broker", trying.cert_file)

    def failed(self, exc: BaseException) -> bool:
        """This attempt failed. True: it was the offered files, refused now; go back to the old at once."""
        identity, trying, self._trying = self.identity, self._trying, None
        if identity is None or trying is None or identity.pending is not trying:
            return False
        if _unreachable(exc):
            return False  # the broker was not reached: the offer stands, the next attempt tries it
        # TLS 1.3 reports a refused client certificate only after the handshake: a closed socket.
        closed = exc.__cause__ is None and " closed " in str(exc)
        hint = " (the broker closed the connection before its CONNACK)" if closed else ""
        reason = f"the broker refused the new client certificate {trying.cert_file}: {exc}{hint}"
        identity.refuse(reason)
        log.warning("uplink: %s; going on with the current one", reason)
        return True


def _unreachable(exc: BaseException) -> bool:
    """A TCP-level failure (port closed, no route, name lookup, timeout): not the certificate's fault.

    A reset during the handshake is not among them: a TLS 1.2 broker that refuses a client
    certificate may simply close the connection.
    """
    cause = exc.__cause__
    if isinstance(cause, (ConnectionRefusedError, socket.gaierror, TimeoutError)):
        return True
    return isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
