"""What the watcher keeps per gateway, device and sequence epoch, and the violations it found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from agent.tools.watch.seqs import SeqSet

# Kinds of violation (each makes the exit status 1).
GAP = "gap"
CONFLICT = "duplicate-different"  # one (gateway, device, seqepoch, seq) with two contents
REORDER = "reorder"  # a lower seq after a higher one within one device and delivery class
UNSYNCED = "unsynchronised-clock"
MALFORMED = "malformed"
LATE = "late"  # only with --strict-late
SILENCE = "no-events"

MAX_KEPT = 200  # violations and malformed messages listed at most (all are counted)
DIGESTS_KEPT = 100_000  # per stream: duplicates of older seqs are counted, their content not compared


@dataclass
class Stream:
    """One device's numbering in one sequence epoch."""

    seqs: SeqSet = field(default_factory=SeqSet)
    digests: dict[int, bytes] = field(default_factory=dict)
    top: dict[str, int] = field(default_factory=dict)  # delivery class -> highest seq received

    def remember(self, seq: int, digest: bytes) -> None:
        self.digests[seq] = digest
        if len(self.digests) > DIGESTS_KEPT:
            # Dicts keep insertion order, which is mostly seq order: forget the oldest half.
            for old in list(self.digests)[: DIGESTS_KEPT // 2]:
                del self.digests[old]


@dataclass
class Device:
    """Counts of one device of one gateway (``gateway`` for the gateway's own events)."""

    events: int = 0  # distinct events (first receipts)
    duplicates: int = 0  # re-sends with equal content: at-least-once, fine
    unchecked_duplicates: int = 0  # re-sends of a seq whose content was no longer kept
    conflicts: int = 0
    reorders: int = 0
    late: int = 0
    max_late_s: float = 0.0
    unsynced: int = 0
    malformed: int = 0
    dropped_reported: int = 0  # what the gateway's health events said it dropped for this device
    epochs: dict[str, Stream] = field(default_factory=dict)  # in the order first seen


@dataclass
class Gateway:
    """One gateway: its devices and what its retained topics and health say."""

    devices: dict[str, Device] = field(default_factory=dict)
    availability: str | None = None  # the last status word
    inventories: int = 0
    clock_synchronised: bool | None = None  # as its last health or inventory said

    def device(self, name: str) -> Device:
        return self.devices.setdefault(name, Device())


@dataclass
class Violation:
    kind: str
    gateway: str
    device: str
    detail: str


@dataclass
class Findings:
    """Violations (all counted, the first MAX_KEPT listed), malformed messages and notes."""

    counts: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (topic, reason), the first MAX_KEPT
    notes: list[str] = field(default_factory=list)  # restarts and other things worth a line, not failures

    def add(self, kind: str, gateway: str, device: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.violations) < MAX_KEPT:
            self.violations.append(Violation(kind, gateway, device, detail))

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_KEPT:
            self.notes.append(text)
