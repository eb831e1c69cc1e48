"""A bundle over MQTT, the gateway's side: a retained offer, chunks it asks for, resumed from its own offset.

Topics (``{root}`` is ``fleet.root``; docs/fleet.md, "Update bundles"):

- ``{root}/{gw}/bundle/offer`` (operator → gateway, retained): ``{"transfer", "size", "sha256",
  "chunk", "rate", "manifest"}``; ``manifest`` is the bundle's signed ``bundle.json`` (base64),
  verified and admitted (signature, target, expiry, version, free space) before a byte is fetched.
- ``{root}/{gw}/bundle/chunk`` (operator → gateway): ``<transfer> <offset>\\n`` then at most
  ``MAX_CHUNK`` bytes. Only the chunk at the gateway's own offset is written; any other is ignored.
- ``{root}/{gw}/bundle/status`` (gateway → operator, retained): the ``bundle`` report. While
  receiving it carries ``offset`` and ``ask``, a new token each time the gateway asks the sender
  to (re)send from ``offset``: on taking the offer, on the offer arriving again (a reconnect), and
  when no chunk came for ``stall`` seconds (a lost connection, a restarted broker or sender).

The partial file (``<bundles>/transfers/<transfer>.part``) survives a restart of the agent: the
retained offer comes back and the transfer goes on from the file's size. A complete file whose
sha256 differs from the offer's is fetched again from the start; the signed manifest inside it is
what decides (agent/fleet/bundles/runner.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.fleet.bundles.manifest import MANIFEST_NAME, BundleError

if TYPE_CHECKING:
    from agent.fleet.bundles.runner import BundleRunner

log = logging.getLogger(__name__)

MAX_CHUNK = 128 * 1024 - 64  # a chunk message is at most 128 KiB, its header included
MAX_BUNDLE_BYTES = 8 * 1024**3
STALL_MIN = 3.0  # seconds without a chunk before the gateway asks again
MAX_STALL = 300.0  # unanswered asks back off to one every five minutes (the sender may be gone)
PROGRESS_BYTES = 1024 * 1024  # the status report's offset is brought up to date this often
_TRANSFER = re.compile(r"^[0-9a-f]{16,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Offer:
    """An offer's fields, checked."""

    transfer: str
    size: int
    sha256: str
    chunk: int
    rate: float
    manifest: bytes
    allow: bytes | None = None  # a signed downgrade directive (agent/fleet/bundles/downgrade.py)

    @property
    def stall(self) -> float:
        """Seconds without a chunk that mean the stream stopped (four chunks' time at the sender's rate)."""
        return max(STALL_MIN, 4 * self.chunk / self.rate)


def parse_offer(data: bytes) -> Offer:
    """The offer in ``data``.

    Raises:
        ValueError: naming the field.
    """
    try:
        doc = json.loads(data)
    except ValueError:
        raise ValueError("offer: not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("offer: not a JSON object")
    transfer, size, digest, chunk, rate = (doc.get(k) for k in ("transfer", "size", "sha256", "chunk", "rate"))
    if not isinstance(transfer, str) or not _TRANSFER.match(transfer):
        raise ValueError("offer.transfer: 16 to 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_BUNDLE_BYTES:
        raise ValueError(f"offer.size: an integer of 1 to {MAX_BUNDLE_BYTES} bytes")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise ValueError("offer.sha256: 64 lowercase hex digits")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1024 <= chunk <= MAX_CHUNK:
        raise ValueError(f"offer.chunk: an integer of 1024 to {MAX_CHUNK} bytes")
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not rate >= 1024:
        raise ValueError("offer.rate: bytes a second, at least 1024")
    try:
        manifest = base64.b64decode(str(doc.get("manifest")), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"offer.manifest: the base64 of the bundle's {MANIFEST_NAME}") from None
    try:
        allow = base64.b64decode(str(doc["allow"]), validate=True) if doc.get("allow") is not None else None
    except (binascii.Error, ValueError):
        raise ValueError("offer.allow: the base64 of a signed downgrade directive") from None
    return Offer(transfer, size, digest, chunk, float(rate), manifest, allow)


def chunk_message(transfer: str, offset: int, data: bytes) -> bytes:
    """A chunk as the sender publishes it."""
    return f"{transfer} {offset}\n".encode() + data


class Receiver:
    """One transfer at a time, from offer to the runner's apply."""

    def __init__(self, runner: BundleRunner) -> None:
        """Partial files live in ``<bundles>/transfers/``."""
        self._runner = runner
        self.folder = runner.root / "transfers"
        self._offer: Offer | None = None
        self._file: BinaryIO | None = None
        self.offset = 0
        self._ask = ""
        self._last = time.monotonic()
        self._reported = 0
        self._misses = 0  # asks in a row no chunk answered: the next waits twice as long (MAX_STALL at most)
        self._applying: asyncio.Task[None] | None = None
        self._waiting: bytes | None = None  # an offer that came during an apply
        self.done: dict[str, dict[str, Any]] = {}  # transfer -> its final report
        self.ignored = 0  # chunks not at our offset (a resent stream's overlap, another transfer's)

    # ---- offers ---------------------------------------------------------------------
    async def offer(self, data: bytes, origin: str) -> None:
        """The retained offer (again after every reconnect); empty: withdrawn."""
        if self._applying is not None and not self._applying.done():
            self._waiting = data
            return
        if not data:  # withdrawn: a transfer in progress is dropped with its partial file
            if self._offer is not None:
                log.info("bundle transfer %s: the offer was withdrawn at byte %d", self._offer.transfer, self.offset)
                self._close()
                (self.folder / f"{self._offer.transfer}.part").unlink(missing_ok=True)
                self._offer = None
            return
        try:
            offer = parse_offer(data)
        except ValueError as exc:
            self._runner.report({"state": "refused", "origin": origin, "code": "malformed", "reason": str(exc),
                                 "errors": [{"code": "malformed", "message": str(exc)}]})  # fmt: skip
            return
        if self._offer is not None and offer.transfer == self._offer.transfer:
            self._ask_from_offset()  # we reconnected: the sender may have lost our place
            return
        if offer.transfer in self.done:
            self._runner.report(self.done[offer.transfer])
            return
        await self._take(offer, origin)

    async def _take(self, offer: Offer, origin: str) -> None:
        extra = {"origin": origin, "transfer": offer.transfer, "size": offer.size}
        if self._runner.installed(offer.manifest):
            self.done[offer.transfer] = self._runner.report({**extra, "state": "applied", "already": True})
            return
        try:
            allowed = self._runner.allowed(offer.allow, use=False)  # used when applied
            manifest = await asyncio.to_thread(self._runner.check, offer.manifest, allowed)
            await asyncio.to_thread(self._runner.admit, manifest, offer.size, allowed)
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._close()
            for old in self.folder.glob("*.part"):  # another transfer's leftovers: superseded
                if old.name != f"{offer.transfer}.part":
                    old.unlink(missing_ok=True)
            path = self.folder / f"{offer.transfer}.part"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            self._file = os.fdopen(fd, "ab")
            self.offset = os.fstat(fd).st_size
            if self.offset > offer.size:
                self._file.truncate(0)
                self.offset = 0
        except BundleError as exc:
            problems = exc.problems
            self.done[offer.transfer] = self._runner.report({**extra, "state": "refused", "code": exc.code,
                "reason": problems[0], "errors": [{"code": exc.code, "message": p} for p in problems]})  # fmt: skip
            log.warning("bundle offer %s refused: %s: %s", offer.transfer, exc.code, "; ".join(problems))
            return
        except OSError as exc:
            self.done[offer.transfer] = self._runner.report({**extra, "state": "refused", "code": "io",
                                                             "reason": str(exc)})  # fmt: skip
            return
        self._offer = offer
        log.info("bundle transfer %s: %d bytes, from byte %d", offer.transfer, offer.size, self.offset)
        if self.offset == offer.size:
            self._complete()
        else:
            self._ask_from_offset()

    def _ask_from_offset(self) -> None:
        offer = self._offer
        if offer is None:
            return
        self._ask = secrets.token_hex(4)
        self._last = time.monotonic()
        self._misses += 1
        self._progress()

    def _progress(self) -> None:
        offer = self._offer
        assert offer is not None
        self._reported = self.offset
        self._runner.report({"state": "receiving", "origin": "mqtt", "transfer": offer.transfer, "size": offer.size,
                             "offset": self.offset, "ask": self._ask})  # fmt: skip

    # ---- chunks ---------------------------------------------------------------------
    async def chunk(self, data: bytes, origin: str) -> None:
        """One chunk; written only if it is the one at our offset (never awaits: chunks stay in order)."""
        offer, file = self._offer, self._file
        head, _, body = data.partition(b"\n")
        fields = head.split(b" ")
        if offer is None or file is None or len(fields) != 2 or fields[0].decode("ascii", "replace") != offer.transfer:
            self.ignored += 1
            return
        try:
            offset = int(fields[1])
        except ValueError:
            offset = -1
        if offset != self.offset or not body or len(body) > offer.chunk or offset + len(body) > offer.size:
            self.ignored += 1
            return
        try:
            file.write(body)
        except OSError as exc:  # a full disk: the transfer stops here, reported; the buffer is not touched
            self._abandon(offer, "no_space" if exc.errno == 28 else "io", f"transfers/{offer.transfer}.part: {exc}")
            return
        self.offset += len(body)
        self._last = time.monotonic()
        self._misses = 0
        if self.offset == offer.size:
            self._complete()
        elif self.offset - self._reported >= PROGRESS_BYTES:
            self._progress()

    def _complete(self) -> None:
        self._applying = asyncio.get_running_loop().create_task(self._apply(), name="bundle-transfer-apply")

    async def _apply(self) -> None:
        offer = self._offer
        assert offer is not None
        path = self.folder / f"{offer.transfer}.part"
        try:
            self._close(sync=True)
            digest = await asyncio.to_thread(_sha256, path)
            if digest != offer.sha256:
                log.warning("bundle transfer %s: the file's sha256 is not the offer's; fetched again", offer.transfer)
                path.unlink(missing_ok=True)
                self._offer = None
                await self._take(offer, "mqtt")
                return
            extra = {"transfer": offer.transfer, "size": offer.size}
            self.done[offer.transfer] = await self._runner.apply(path, origin="mqtt", extra=extra, allow=offer.allow)
            path.unlink(missing_ok=True)
            self._offer = None
        finally:
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                asyncio.get_running_loop().create_task(self.offer(waiting, "mqtt"), name="bundle-offer")

    def _abandon(self, offer: Offer, code: str, message: str) -> None:
        self._close()
        (self.folder / f"{offer.transfer}.part").unlink(missing_ok=True)
        self._offer = None
        self.done[offer.transfer] = self._runner.report({"state": "refused", "origin": "mqtt",
            "transfer": offer.transfer, "code": code, "reason": message,
            "errors": [{"code": code, "message": message}]})  # fmt: skip

    def _close(self, *, sync: bool = False) -> None:
        if self._file is not None:
            if sync:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    # ---- the watchdog ---------------------------------------------------------------
    async def watch(self) -> None:
        """Ask again whenever the stream stalls (until cancelled)."""
        while True:
            await asyncio.sleep(1.0)
            offer = self._offer
            busy = self._applying is not None and not self._applying.done()
            wait = min(MAX_STALL, offer.stall * 2 ** max(0, self._misses - 1)) if offer is not None else 0.0
            if offer is not None and not busy and time.monotonic() - self._last > wait:
                log.info("bundle transfer %s: nothing for %.0f s at byte %d; asking again", offer.transfer,
                         wait, self.offset)  # fmt: skip
                self._ask_from_offset()


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
