"""Renewal's two conversations, over the :class:`~agent.uplinks.api.Identity` seam: the request
and its answer on the fleet channel, and the uplink's swap to the new files."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from agent.fleet.identity.renewal import Exchange, Swap
from agent.uplinks.api import Identity, IdentityFiles

log = logging.getLogger(__name__)


def identity_exchange(identity: Identity) -> Exchange:
    """Publish the request (the uplink does, on each connection until answered); wait for our answer."""

    async def exchange(body: bytes, nonce: str, timeout: float) -> dict[str, Any] | None:
        answers = identity.ask(body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    raw = await asyncio.wait_for(answers.get(), left)
                except TimeoutError:
                    return None
                try:
                    doc = json.loads(raw)
                except ValueError:
                    log.warning("renewal: an answer that is not JSON was ignored (%d bytes)", len(raw))
                    continue
                if isinstance(doc, dict) and doc.get("nonce") == nonce:
                    return doc
                log.info("renewal: an answer to another request (nonce) was ignored")
            return None
        finally:
            identity.ask(None)

    return exchange


def identity_swap(identity: Identity) -> Swap:
    """Offer the files to the uplink; None once it connected with them, else why not."""

    async def swap(files: IdentityFiles, timeout: float) -> str | None:
        outcome = identity.offer(files)
        try:
            return await asyncio.wait_for(asyncio.shield(outcome), timeout)
        except TimeoutError:
            identity.withdraw(f"the uplink did not connect with it within {timeout:g} s")
            return outcome.result()

    return swap
