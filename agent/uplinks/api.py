"""What an uplink is: its config model, its kind, and what the core gives it and expects back.

An uplink lives in its own folder (``agent/uplinks/<name>/`` for the shipped ones, or any
installed package) and registers an :class:`UplinkPlugin` under the ``edge_agent.uplinks``
entry point group. The core never imports one; ``uplink.<name>`` in the site file is the
plugin's :attr:`UplinkPlugin.config_model`.

Two kinds, as Telegraf's outputs and Frigate's communicators suggest:

- **durable** (:class:`DurableUplink`): consumes accepted events from an :class:`EventFeed` of
  its own (its own outbox file, cursors and accounting) and acknowledges each once the far end
  has it. One durable uplink's outage never evicts another's events.
- **live** (:class:`LiveSink`): receives every reading's latest value as it is produced (the
  OPC UA server); nothing is buffered for it.

Either kind may take commands and documents *in* from the operations centre through the
:class:`Inbound` channel in its :class:`UplinkContext` (a device write, a status request;
remote configuration arrives this way too). The core answers every request with a
:class:`Reply`; an uplink carries it back however its protocol does.

An uplink that authenticates with a client certificate may get an :class:`Identity` in its
context: the files it connects with, which the core changes while it runs (certificate
renewal, docs/fleet.md). The core *offers* new files; the uplink drains what it has in flight,
disconnects cleanly and connects with them, then *confirms* (the far end accepted the new
identity once: a CONNACK) or *refuses* (TLS handshake or CONNACK refused, with the reason) and
goes back to the current files at once. Until confirmed the current files stay in use and on
disk; the core moves files only after a confirmation and tells the uplink with
:meth:`Identity.moved`. The same object carries the renewal request out and its answer in, on
an uplink that also carries the fleet channel.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from agent.devices.api import StrictModel
from agent.observability.metrics import MAX_REASONS, normalise_reason
from agent.store.outbox import Stored
from agent.store.records import Lanes

ENTRY_POINT_GROUP = "edge_agent.uplinks"


class UplinkSettings(StrictModel):
    """Base of every uplink's config model; the hooks let the core treat them alike."""

    def active(self) -> bool:
        """Whether this uplink runs (a plugin with an ``enabled`` key answers with it)."""
        return True

    def secrets(self) -> list[str]:
        """Secret values the logs must redact (read now, as the uplink will at connect)."""
        return []

    def secret_files(self, prefix: str) -> list[tuple[str, Path]]:
        """(field path, file) of every password, users or key file, for the permission check."""
        return []

    def warnings(self, prefix: str) -> list[str]:
        """What these settings allow but should not, as ``field.path: finding; fix`` lines."""
        return []


@dataclass
class UplinkStatus:
    """What health, metrics and readiness say about one uplink; the uplink keeps it current."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    last_error: str | None = None
    since: float = 0.0
    published: int = 0
    acked: int = 0
    refused: int = 0  # events the far end answered with a failure (kept buffered)
    errors: dict[str, int] = field(default_factory=dict)  # failures by normalised reason
    # Commands the far end sent, by (kind, outcome, reason): /metrics' edge_agent_uplink_commands_total.
    commands: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def failed(self, reason: str) -> None:
        """Record one failed attempt or lost connection (counted by reason for the metrics)."""
        self.last_error = reason
        key = normalise_reason(reason)
        if key not in self.errors and len(self.errors) >= MAX_REASONS:
            key = "other"
        self.errors[key] = self.errors.get(key, 0) + 1

    def command(self, kind: str, outcome: str, reason: str = "") -> None:
        """Count one command from the far end (e.g. ``dcmd``, ``refused``, ``not_writable``).

        ``kind`` and ``outcome`` come from the uplink's own fixed set; ``reason`` is normalised and
        at most :data:`MAX_REASONS` distinct ones are kept (the rest are ``other``), so the labels stay few.
        """
        reason = normalise_reason(reason) if reason else ""
        key = (kind, outcome, reason)
        if key not in self.commands and len({r for _, _, r in self.commands}) >= MAX_REASONS:
            key = (kind, outcome, "other")
        self.commands[key] = self.commands.get(key, 0) + 1


class EventFeed(Protocol):
    """A durable uplink's own stream of accepted events, in delivery order per class."""

    @property
    def committed(self) -> asyncio.Event:
        """Set after every commit; the uplink clears it before it looks for work."""
        ...

    async def next_batch(self, cursors: dict[int, int], limit: int) -> list[Stored]:
        """Up to ``limit`` events after ``cursors`` (class -> last id taken), highest class first.

        Use a new ``cursors`` dict for each connection (session) and the same one throughout
        it: the first call with a new dict starts a session, and every event committed before
        it comes with ``backlog`` set (delivered late, after an outage or a restart).
        """
        ...

    async def ack(self, ids: Sequence[int]) -> int:
        """The far end has these events: they leave the feed's buffer (at once, or logged and
        deleted in groups). Returns how many ids were taken."""
        ...


@runtime_checkable
class LaneFeed(EventFeed, Protocol):
    """A feed that can also hand out live events beside the backlog (the core's feeds can).

    For an uplink whose protocol lets late events follow newer ones (Sparkplug's
    ``is_historical`` metrics carry their own timestamps): live events come at once while it
    drains the backlog at its own pace. An uplink that needs one order per class (the JSON
    uplink) keeps to :meth:`EventFeed.next_batch`.
    """

    async def next_lanes(self, lanes: Lanes, limit: int, backlog_limit: int = 0) -> list[Stored]:
        """Up to ``limit`` live events, then up to ``backlog_limit`` backlog ones (``backlog`` set),
        highest class first in each; the feed advances ``lanes``. A new ``lanes`` per connection."""
        ...

    async def settled(self) -> bool:
        """Wait until every reading submitted so far is committed, so the next read sees it
        (bounded: False if readings kept coming or the disk stalled). An uplink about to state
        current values (Sparkplug's BIRTHs) reads once more after this: a live read that the
        feed serves from memory does not suspend, so nothing is accepted between it and the
        uplink's next ``await``."""
        ...


@dataclass(frozen=True)
class Command:
    """A request from the operations centre: ``name`` with ``args``, arrived through ``origin``."""

    name: str
    args: dict[str, Any]
    origin: str


@dataclass(frozen=True)
class Reply:
    """The core's answer to a :class:`Command`.

    ``status``: ``ok``; ``rejected`` (bad or unauthorised request, nothing changed);
    ``unsupported`` (no such command here); ``failed`` (accepted, but the action failed).
    """

    status: Literal["ok", "rejected", "unsupported", "failed"]
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    code: str | None = None  # why, for a machine: e.g. bad_signature, expired, replayed, not_writable

    def to_json(self) -> dict[str, Any]:
        """The reply as an uplink sends it (keys with no value left out)."""
        out: dict[str, Any] = {"status": self.status}
        if self.code is not None:
            out["code"] = self.code
        if self.error is not None:
            out["error"] = self.error
        if self.data:
            out["data"] = self.data
        return out


class Inbound(Protocol):
    """How an uplink hands the core what comes in from the operations centre."""

    async def write(self, device: str, point: str, value: Any, *, origin: str) -> None:
        """Write ``value`` to a device's point through its driver.

        Raises:
            DriverWriteError: the device is not running or refused the value (its ``reason``
                says why); the uplink maps it to its protocol's status.
        """
        ...

    async def command(self, command: Command) -> Reply:
        """Run one command (a few run at a time; never on the event path)."""
        ...

    async def request(self, name: str, request_id: str, data: bytes, *, origin: str) -> Reply:
        """A signed request from the operations centre (docs/fleet.md): checked, then run once.

        ``name`` and ``request_id`` are what the uplink's protocol carried beside the signed
        ``data``; both must agree with the signed body. Never raises: a refusal is a reply.
        """
        ...

    def refused(self, code: str, *, origin: str) -> None:
        """A request the uplink itself refused before handing it over (e.g. ``too_large``,
        ``retained``, ``busy``): counted with the core's own refusals."""
        ...

    async def document(self, kind: str, data: bytes, *, origin: str) -> None:
        """A desired-state document (``kind`` ``config``), signed, as the operations centre keeps it.

        Arrives again on every connection (it is retained); the core checks it, applies what is
        new and answers through :class:`Reports` (``reported``), never by raising. Empty ``data``:
        the operations centre withdrew its document (nothing is undone).
        """
        ...


class Reports:
    """Documents the core keeps for the operations centre: name -> JSON body (e.g. ``reported``,
    ``inventory``).

    An uplink that carries the fleet channel publishes each one, retained, on every connection
    and again whenever the core puts a new body. Only the newest body of a name matters: an
    uplink that was away publishes what is current, not the history.
    """

    def __init__(self) -> None:
        """Empty; the core puts, uplinks read."""
        self._bodies: dict[str, bytes] = {}
        self._version = 0
        self._changed: asyncio.Event | None = None

    @property
    def version(self) -> int:
        """Grows by one with each put."""
        return self._version

    def put(self, name: str, body: bytes) -> None:
        """Make ``body`` the current document called ``name`` (on the event loop)."""
        if self._bodies.get(name) == body:
            return
        self._bodies[name] = body
        self._version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def current(self) -> dict[str, bytes]:
        """Every document, as it is now."""
        return dict(self._bodies)

    async def changed(self, since: int) -> int:
        """Wait until the version passes ``since``; returns the new version."""
        while self._version <= since:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        return self._version


@dataclass(frozen=True)
class IdentityFiles:
    """A client certificate chain (leaf first) and its private key, as files ``ssl`` loads."""

    cert_file: Path
    key_file: Path


class Identity:
    """The client identity an uplink connects with, which the core may replace while it runs.

    Core side: :meth:`offer` new files and await the outcome; :meth:`moved` after renaming
    confirmed files into place; :meth:`ask` to send a renewal request. Uplink side: connect with
    :meth:`files`; when :attr:`pending` is set, drain, reconnect with it and call :meth:`confirm`
    or :meth:`refuse`; publish :attr:`request` and hand answers to :meth:`answered`.
    """

    def __init__(self, current: IdentityFiles, root: str = "fleet/v1") -> None:
        """The files in use now; ``root``: the topic root renewal requests go under (fleet.root)."""
        self.current = current
        self.root = root
        self.pending: IdentityFiles | None = None
        self._outcome: asyncio.Future[str | None] | None = None
        self.request: bytes | None = None  # a renewal request to publish (each connection, until answered)
        self.request_version = 0
        self._answers: asyncio.Queue[bytes] | None = None
        self._asked: asyncio.Event | None = None

    def files(self) -> IdentityFiles:
        """What to connect with now: the offered files while a swap is being tried, else the current."""
        return self.pending or self.current

    def offer(self, files: IdentityFiles) -> asyncio.Future[str | None]:
        """Ask the uplink to connect with ``files``; the future ends with None (confirmed) or a reason."""
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result("replaced by a newer offer")
        self.pending = files
        self._outcome = asyncio.get_running_loop().create_future()
        return self._outcome

    def withdraw(self, reason: str) -> None:
        """Core: give up an offer not taken up yet (e.g. it timed out); the current files stay."""
        self.refuse(reason)

    def confirm(self) -> None:
        """Uplink: the offered files connected once; they are now the current ones."""
        if self.pending is not None:
            self.current, self.pending = self.pending, None
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(None)

    def refuse(self, reason: str) -> None:
        """Uplink: the offered files were refused (``reason``); it goes on with the current ones."""
        self.pending = None
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(reason)

    def moved(self, files: IdentityFiles) -> None:
        """Core: the current identity's files now live here (same contents; no reconnect)."""
        self.current = files

    def ask(self, body: bytes | None) -> asyncio.Queue[bytes]:
        """Core: publish ``body`` as the renewal request (None: withdraw it); answers arrive on the queue."""
        self.request = body
        self.request_version += 1
        self._answers = asyncio.Queue(maxsize=16)
        if self._asked is not None:
            self._asked.set()
            self._asked = None
        return self._answers

    async def asked(self, since: int) -> int:
        """Uplink: wait until :attr:`request_version` passes ``since``; returns the new version."""
        while self.request_version <= since:
            if self._asked is None:
                self._asked = asyncio.Event()
            await self._asked.wait()
        return self.request_version

    def answered(self, body: bytes) -> None:
        """Uplink: an answer to a renewal request arrived (extra ones beyond the queue are dropped)."""
        if self._answers is not None and not self._answers.full():
            self._answers.put_nowait(body)


@dataclass(frozen=True)
class UplinkContext:
    """What the core gives an uplink when it creates one."""

    name: str
    title: str  # how logs name it ("OPC UA"): writes and commands from it are logged as its
    gateway: str
    inbound: Inbound
    state_dir: Path  # where the uplink may keep small state files (beside the buffer, 0700)
    control_root: str | None = None  # topic root of the fleet control channel, if it is on
    reports: Reports | None = None  # what the fleet channel publishes, retained, when it is on
    # The uplink's status, kept by the core across the instances a reload replaces, so its
    # counters never go back: a durable uplink reports through this one object.
    status: UplinkStatus = field(default_factory=UplinkStatus)
    # The client certificate and key to connect with, when the core manages them (fleet
    # identity); an uplink given one uses it instead of its own certificate settings.
    identity: Identity | None = None


class DurableUplink(Protocol):
    """Delivers every accepted event at least once, from its own feed."""

    status: UplinkStatus

    async def run(self, feed: EventFeed) -> None:
        """Deliver forever: connect, send, acknowledge into ``feed``, reconnect. Cancelled to stop."""
        ...

    async def goodbye(self) -> None:
        """Before a clean stop: say so to the far end (e.g. a retained ``offline``); bounded by the caller."""
        ...

    def quiet_allowance(self) -> float:
        """Seconds the uplink may go without progress on a live link before it counts as stalled."""
        ...


class LiveSink(Protocol):
    """Receives each reading's latest value as it is produced (nothing is buffered for it)."""

    async def start(self) -> None:
        """Start serving. Raise ``OSError`` or ``ValueError`` if it cannot; the rest keeps running."""
        ...

    def update(self, device: str, event_type: str, data: dict[str, Any], time: datetime) -> None:
        """A new reading (on the event loop's hot path: must not block or await)."""
        ...

    async def stop(self) -> None:
        """Stop serving; must not raise."""
        ...

    def describe(self) -> str:
        """One line for the log once started (address, certificate thumbprint)."""
        ...


UplinkFactory = Callable[[Any, UplinkContext], "DurableUplink | LiveSink"]


@dataclass(frozen=True)
class UplinkPlugin:
    """The entry point object an uplink package exposes (kept light: no heavy imports).

    Attributes:
        name: the key under ``uplink:`` in the site file.
        config_model: pydantic model of that key.
        kind: ``durable`` or ``live``.
        factory: ``"module:function"`` building the uplink from its settings and context;
            imported only when the uplink runs (so a plugin's declaration stays light).
        summary: one line for the generated config reference (docs/configuration.md).
        title: how logs name the uplink (default: its name).
        default_on: an absent key means the model's defaults rather than "not configured".
        owns_buffer_file: a durable uplink whose outbox is ``buffer.path`` itself (the main
            buffer file, its counters and sequence epoch); others get ``<stem>.<name><suffix>``.
        checker: ``"module:function"`` checking the connection step by step (the technician
            page's "Check uplink"): ``(settings, gateway_id, timeout) -> {"target", "ok",
            "steps"}``, blocking; imported at the first check. "": the uplink has none.
    """

    name: str
    config_model: type[UplinkSettings]
    kind: Literal["durable", "live"]
    factory: str
    summary: str = ""
    title: str = ""
    default_on: bool = False
    owns_buffer_file: bool = False
    checker: str = ""

    def check(self, settings: UplinkSettings, gateway: str, timeout: float) -> dict[str, Any] | None:
        """The connection's steps (blocking: run it in a thread); None if the plugin has no checker."""
        if not self.checker:
            return None
        module, _, name = self.checker.partition(":")
        result: dict[str, Any] = getattr(importlib.import_module(module), name)(settings, gateway, timeout)
        return result

    def build(self, settings: UplinkSettings, context: UplinkContext) -> DurableUplink | LiveSink:
        """Import the implementation (first use only) and build one instance."""
        module, _, name = self.factory.partition(":")
        create: UplinkFactory = getattr(importlib.import_module(module), name)
        return create(settings, context)
