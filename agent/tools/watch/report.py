"""The live summary line (stderr, every few seconds) and the final report (text or JSON)."""

from __future__ import annotations

from typing import Any

from agent.tools.watch.checks import Checker
from agent.tools.watch.seqs import ranges_text
from agent.tools.watch.state import MALFORMED, Device

_GATEWAYS_SHOWN = 5  # per-gateway counts on the live line


def summary_line(checker: Checker, elapsed: float, rate: float) -> str:
    """``watch 12s: 245 events (48.9/s) gw-a 200, gw-b 45; violations 0, malformed 0, late 0, open gaps 0``."""
    per = sorted(((sum(d.events for d in g.devices.values()), n) for n, g in checker.gateways.items()), reverse=True)
    shown = ", ".join(f"{name} {count}" for count, name in per[:_GATEWAYS_SHOWN])
    if len(per) > _GATEWAYS_SHOWN:
        shown += f", +{len(per) - _GATEWAYS_SHOWN} more"
    late = sum(d.late for g in checker.gateways.values() for d in g.devices.values())
    found = checker.findings.counts
    violations = sum(found.values()) - found[MALFORMED]
    return (
        f"watch {elapsed:.0f}s: {checker.events} events ({rate:.1f}/s){' ' + shown if shown else ''};"
        f" violations {violations}, malformed {found[MALFORMED]}, late {late}, open gaps {checker.open_gaps()}"
    )


def _device_json(device: Device) -> dict[str, Any]:
    epochs = []
    for epoch, stream in device.epochs.items():
        holes = stream.seqs.holes()
        epochs.append({
            "seqepoch": epoch,
            "first_seq": stream.seqs.first,
            "last_seq": stream.seqs.last,
            "gaps": [[a, b] for a, b in holes],
            "missing": stream.seqs.missing(),
        })  # fmt: skip
    return {
        "events": device.events,
        "duplicates": device.duplicates,
        "duplicates_unchecked": device.unchecked_duplicates,
        "duplicates_different": device.conflicts,
        "reorders": device.reorders,
        "late": device.late,
        "max_late_s": round(device.max_late_s, 3),
        "unsynchronised": device.unsynced,
        "malformed": device.malformed,
        "dropped_reported": device.dropped_reported,
        "epochs": epochs,
    }


def report_json(checker: Checker, seconds: float) -> dict[str, Any]:
    """Everything the final report says, as one JSON document."""
    found = checker.findings
    return {
        "ok": not found.counts,
        "seconds": round(seconds, 3),
        "messages": checker.messages,
        "events": checker.events,
        "unknown_topics": checker.unknown_topics,
        "violation_counts": dict(sorted(found.counts.items())),
        "violations": [vars(v) for v in found.violations],
        "malformed": [{"topic": t, "reason": r} for t, r in found.malformed],
        "notes": found.notes,
        "gateways": {
            name: {
                "availability": g.availability,
                "inventories": g.inventories,
                "clock_synchronised": g.clock_synchronised,
                "devices": {d: _device_json(dev) for d, dev in sorted(g.devices.items())},
            }
            for name, g in sorted(checker.gateways.items())
        },
    }


def report_text(checker: Checker, seconds: float) -> str:
    """The final report for a person: one block per gateway, a line per device, then what failed."""
    doc = report_json(checker, seconds)
    lines = [f"watched {seconds:.1f} s: {doc['messages']} messages, {doc['events']} events"]
    if doc["unknown_topics"]:
        lines[0] += f", {doc['unknown_topics']} on topics outside the contract (ignored)"
    for name, gateway in doc["gateways"].items():
        clock = {True: "synchronised", False: "NOT synchronised", None: "unknown"}[gateway["clock_synchronised"]]
        lines.append(
            f"gateway {name}: availability {gateway['availability'] or '-'}, inventories {gateway['inventories']},"
            f" clock (as it reports) {clock}"
        )
        for device, d in gateway["devices"].items():
            seqs = "; ".join(
                f"{e['seqepoch'] or '(no epoch)'} {e['first_seq']}-{e['last_seq']}"
                + (f" gaps {ranges_text([tuple(g) for g in e['gaps']])}" if e["gaps"] else "")
                for e in d["epochs"]
            )
            lines.append(
                f"  {device}: events {d['events']}, duplicates {d['duplicates']}"
                f" (different {d['duplicates_different']}), reorders {d['reorders']},"
                f" late {d['late']} (max {d['max_late_s']:.1f} s), unsynchronised {d['unsynchronised']},"
                f" malformed {d['malformed']}" + (f", seqs {seqs}" if seqs else "")
            )
    for note in doc["notes"]:
        lines.append(f"note: {note}")
    for bad in doc["malformed"]:
        lines.append(f"malformed: {bad['topic']}: {bad['reason']}")
    for v in doc["violations"]:
        where = "/".join(filter(None, [v["gateway"], v["device"]]))
        lines.append(f"violation {v['kind']}: {where + ': ' if where else ''}{v['detail']}")
    counts = doc["violation_counts"]
    listed = len(doc["violations"]) + len(doc["malformed"])
    if sum(counts.values()) > listed:
        lines.append(f"(only the first of each list shown: {sum(counts.values())} in all)")
    verdict = "; ".join(f"{k} {n}" for k, n in counts.items())
    lines.append(f"FAIL: {verdict}" if counts else "OK: no violation")
    return "\n".join(lines)
