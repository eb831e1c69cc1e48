"""Renewal in the running agent: the uplink's identity holder, the renewer, and what they report."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.config.model import AgentConfigBase
from agent.contract.events import GATEWAY_CERT_EXPIRING, GATEWAY_STREAM, Reading
from agent.fleet.identity.files import CERT, KEY, identity_dir
from agent.fleet.identity.files import IdentityFiles as Folder
from agent.fleet.identity.renewal import RenewalFailed, Renewer, Who
from agent.fleet.identity.renewal_files import Chains
from agent.fleet.identity.renewal_link import identity_exchange, identity_swap
from agent.fleet.identity.startup import key_store
from agent.fleet.identity.verify import AnswerRefused, load_roots
from agent.uplinks.api import Identity, IdentityFiles

log = logging.getLogger(__name__)


def identity_holder(config: AgentConfigBase) -> Identity | None:
    """The MQTT uplink's identity (``fleet.identity``): the identity folder's current pair (a
    promotion a crash interrupted was finished before, by the start-up's ``recover``)."""
    if config.fleet.identity is None:
        return None
    folder = identity_dir(config.buffer.path)
    return Identity(IdentityFiles(folder / CERT, folder / KEY), config.fleet.root)


def build_renewer(
    config: Callable[[], AgentConfigBase],
    identity: Identity,
    emit: Callable[[str, Reading], None],
    changed: Callable[[], None] = lambda: None,
) -> Renewer:
    """The renewer of a running agent: its requests and swaps go through ``identity``; ``changed``
    after each attempt (the inventory looks again)."""
    first = config()
    folder = identity.current.cert_file.parent
    files = Folder(folder)
    try:
        known = files.identity()
    except ValueError:
        known = None  # the start-up refused a damaged file already; renew under the config's id
    claim = first.fleet.identity.claim if first.fleet.identity is not None else None
    gateway = known.gateway_id if known is not None else first.gateway.id
    who = Who(gateway, known.serial if known is not None else gateway, claim.read_model() if claim else "unknown")
    chains = Chains(files)

    def settings() -> Any:
        identity_config = config().fleet.identity
        if identity_config is None:
            raise RuntimeError("fleet.identity is gone: renewal needs a restart to stop")
        return identity_config

    def roots() -> list[x509.Certificate]:
        ca_file: Path = settings().ca_file
        try:
            return load_roots(ca_file)
        except AnswerRefused as exc:
            raise RenewalFailed(str(exc)) from exc

    def promoted(leaf: x509.Certificate) -> None:
        identity.moved(IdentityFiles(folder / CERT, folder / KEY))
        chains.record(leaf)

    def expiring(data: dict[str, Any]) -> None:
        log.warning("the client certificate expires in %d day(s) (%s)", data["days_left"], data["not_after"])
        emit(GATEWAY_STREAM, Reading(GATEWAY_CERT_EXPIRING, data))

    return Renewer(
        who,
        lambda: settings().renew,
        keys=key_store(first, folder),
        chains=chains,
        current=lambda: identity.current,
        roots=roots,
        exchange=identity_exchange(identity),
        swap=identity_swap(identity),
        promoted=promoted,
        on_expiring=expiring,
        clock=lambda: datetime.now(UTC),
        sleep=asyncio.sleep,
        changed=changed,
    )


def seconds_left(renewer: Renewer | None) -> float | None:
    """Seconds until the client certificate expires (negative once expired); None: not known."""
    if renewer is None or renewer.state.not_after is None:
        return None
    return (renewer.state.not_after - datetime.now(UTC)).total_seconds()


def renewal_facts(renewer: Renewer) -> dict[str, Any]:
    """The inventory's ``certificate.renewal``."""
    s = renewer.state

    def at(moment: datetime | None) -> str | None:
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment is not None else None

    return {
        "renew_at": at(s.renew_at),
        "next_attempt": at(s.next_attempt),
        "last_error": s.last_error,
        "renewals": s.renewals,
    }
