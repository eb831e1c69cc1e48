"""Crash and corruption end to end: the real agent process, a real Mosquitto, a real buffer file.

R5 in miniature: the agent is SIGKILLed again and again at random moments while devices
produce; nothing it accepted is lost, order within a type holds, the buffer file stays sound
and its counters balance after every kill.

R9 in miniature: the agent starts on buffer files damaged in many ways; it keeps running,
publishes new events, and either the file was sound or it was quarantined and the log says where.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import pytest

from agent.store.outbox import Outbox, Record
from tests.conftest import AgentProcess, Mosquitto, last_seqs, wait_for, write_config

PAGE = 4096  # SQLite's default page size, which the buffer keeps

METERS = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 10ms}\n"
    "  - {id: meter-2, driver: virtual, kind: meter, interval: 10ms}\n"
)
METER_IDS = ("meter-1", "meter-2")
KILLS = 12
MAX_DUPS_PER_KILL = 100  # one window (max_inflight) in flight


def wait_ready(agent: AgentProcess, gateway: str = "gw-test", timeout: float = 15) -> None:
    """Until the agent logged that it runs (its buffer is open); fail if it died first."""

    def ready() -> bool:
        assert agent.proc is not None
        assert agent.proc.poll() is None, f"agent exited with {agent.proc.returncode}:\n{agent.output()}"
        return f"agent {gateway} running" in agent.output()

    wait_for(ready, timeout, f"agent {gateway} to start")


def check_buffer(path: Path) -> dict[str, int]:
    """``PRAGMA integrity_check`` and the accounting identity, read-only, in one snapshot."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5, isolation_level=None)
    try:
        db.execute("BEGIN")
        integrity = db.execute("PRAGMA integrity_check").fetchall()
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        rows = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        db.execute("COMMIT")
    finally:
        db.close()
    assert integrity == [("ok",)], f"integrity_check of {path}: {integrity[:5]}"
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped_"))
    balance = counters["delivered"] + rows + dropped
    assert counters["accepted"] == balance, f"accounting broken: {counters}, rows in outbox {rows}"
    return {**counters, "rows": rows}


# --- R5: repeated SIGKILL -----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_r5_repeated_sigkill_loses_nothing_and_keeps_the_buffer_sound(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"\nR5 seed {seed}")
    sub = subscriber_factory(broker.port, client_id="crash-subscriber")
    config = write_config(tmp_path / "site.yaml", port=broker.port, devices=METERS)
    buffer = config.parent / "buffer.db"
    marks: list[int] = []  # events received when each kill happened
    for n in range(KILLS):
        agent = agent_factory(config)
        wait_ready(agent)
        run_for = rng.uniform(0.3, 1.5)
        time.sleep(run_for)
        assert agent.proc is not None and agent.proc.poll() is None, (
            f"kill {n + 1}: the agent exited on its own (seed {seed}):\n{agent.output()}"
        )
        agent.kill()
        marks.append(len(sub.snapshot()))
        assert "Traceback" not in agent.output(), agent.output()
        counters = check_buffer(buffer)  # before the next start, read-only
        print(f"kill {n + 1:2d} after {run_for:.2f}s: {counters}")

    killed_at = last_seqs(buffer)
    last_agent = agent_factory(config)
    wait_ready(last_agent)
    sub.wait_for_all({d: killed_at[d] for d in METER_IDS}, 20)  # the backlog of the kills drained
    last_agent.signal(signal.SIGTERM)
    assert last_agent.wait(10) == 0, last_agent.output()
    assert "Traceback" not in last_agent.output(), last_agent.output()
    check_buffer(buffer)

    last = last_seqs(buffer)
    # A graceful stop gives the uplink up to 2 s to drain, then keeps the rest buffered for the
    # next start (accepted, not lost). On a loaded machine a few rows can remain: they count.
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True)
    try:
        kept = {d: {s for (s,) in db.execute("SELECT seq FROM outbox WHERE device = ?", (d,))} for d in METER_IDS}
    finally:
        db.close()
    assert all(len(v) <= 200 for v in kept.values()), {d: len(v) for d, v in kept.items()}
    sub.wait_for_all({d: min([last[d], *[s - 1 for s in kept[d]]]) for d in METER_IDS}, 30)
    for d in METER_IDS:
        received = set(sub.seqs(d))
        lost = set(range(1, last[d] + 1)) - received - kept[d]
        assert not lost, f"{d}: lost {sorted(lost)[:20]}"
    time.sleep(0.5)  # let stragglers (duplicates) arrive before counting
    events = sub.snapshot()

    # Duplicates caused by each kill arrive after the restart that follows it.
    seen: set[tuple[str, int]] = set()
    per_kill = [0] * (KILLS + 1)
    segment = 0
    ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    for i, e in enumerate(events):
        while segment < KILLS and i >= marks[segment]:
            segment += 1
        key = (e["device"], e["seq"])
        ids[key].add(e["id"])
        if key in seen:
            per_kill[segment] += 1
        seen.add(key)
    # A seq reused for a different event would mean a reading was published before it was committed.
    reused = {k: v for k, v in ids.items() if len(v) > 1}
    assert not reused, f"one seq carried different events (seed {seed}): {list(reused.items())[:5]}"

    total_dups = 0
    for device in METER_IDS:
        report = sub.report(device)
        total_dups += report["duplicates"]
        lost = [s for s in report["lost"] if s not in kept[device]]  # kept: still buffered, not lost
        assert lost == [], (device, lost[:20], f"seed {seed}")
        assert report["inversions"] == 0, (device, report["inverted_at"], f"seed {seed}")
    produced = sum(last[d] for d in METER_IDS)
    print(
        f"R5: kills {KILLS}, events {produced} (received {len(events)}), duplicates {total_dups},"
        f" max per kill {max(per_kill)}, per kill {per_kill[1:]}"
    )
    assert produced > 1000, f"devices produced too little to exercise anything: {last}"
    assert max(per_kill) <= MAX_DUPS_PER_KILL, (per_kill, f"seed {seed}")


# --- R9: corrupted buffer files at start --------------------------------------------------------

VARIANTS = 20
WAVE = 5  # agents started at once (distinct gateways and buffers, one broker)
BUILT_ROWS = 3000
ACKED_ROWS = 800  # deleted after building: their pages go to the free list
NEW_EVENTS = 5


def build_buffer(path: Path, device: str, gateway: str) -> None:
    """A real buffer of BUILT_ROWS meter readings of ``device`` (ids ``built-*``), some delivered."""
    with Outbox(path, 1 << 30, synchronous="OFF") as box:
        for start in range(0, BUILT_ROWS, 500):
            records = []
            for seq in range(start + 1, start + 501):
                event = {
                    "specversion": "1.0",
                    "id": f"built-{device}-{seq}",
                    "type": "city.meter.reading",
                    "device": device,
                    "gateway": gateway,
                    "seq": seq,
                    "data": {"power_kw": seq % 97, "pad": "x" * (seq % 200)},
                }
                records.append(
                    Record(
                        device,
                        "city.meter.reading",
                        0,
                        seq,
                        f"ioc/v1/{gateway}/{device}/reading",
                        json.dumps(event).encode(),
                        1_700_000_000.0 + seq,
                    )
                )
            box.append(records)
        box.ack(list(range(1, ACKED_ROWS + 1)))


def sequences_page(path: Path) -> int:
    """0-based index of the page holding the (small) ``sequences`` table of a sound file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sequences'").fetchone()[0]) - 1
    finally:
        db.close()


def damage(path: Path, variant: int, rng: random.Random) -> tuple[str, bool]:
    """Damage the closed file as variant ``variant`` says.

    Returns a description and whether the schema page and the ``sequences`` page are still
    intact, that is, whether the device's last seq is still readable from the file.
    """
    seq_page = sequences_page(path)
    size = path.stat().st_size
    pages = size // PAGE
    kind = ["zero-fill", "truncate", "truncate", "truncate", "header", "header", "tail", "tail", "tail"]
    mode = kind[variant] if variant < len(kind) else "random"
    if mode == "zero-fill":
        path.write_bytes(bytes(size))
        return mode, False
    if mode == "truncate":
        cut = rng.randrange(size // 5, size * 4 // 5)
        with path.open("r+b") as f:
            f.truncate(cut)
        return f"truncate at {cut} of {size}", cut >= (seq_page + 1) * PAGE
    count = rng.randint(1, 3)
    if mode == "header":
        chosen = [0, *rng.sample(range(1, pages), count - 1)]
    elif mode == "tail":
        chosen = list(range(pages - count, pages))
    else:
        chosen = rng.sample(range(1, pages), count)
    with path.open("r+b") as f:
        for page in chosen:
            f.seek(page * PAGE)
            f.write(rng.randbytes(PAGE))
    return f"{mode} pages {sorted(chosen)} of {pages}", not {0, seq_page} & set(chosen)


@pytest.mark.timeout(90)
def test_r9_agent_starts_on_corrupted_buffers(
    tmp_path: Path, broker: Mosquitto, subscriber_factory, agent_factory
) -> None:
    sub = subscriber_factory(broker.port, client_id="corruption-subscriber")
    outcome: dict[str, int] = {"quarantined": 0, "passed": 0}
    failures: list[str] = []

    def received(device: str, *, built: bool) -> list[int]:
        return [
            e["seq"] for e in sub.snapshot() if e["device"] == device and str(e["id"]).startswith("built-") == built
        ]

    for wave_start in range(0, VARIANTS, WAVE):
        running: list[tuple[str, str, bool, Path, AgentProcess, float]] = []
        for v in range(wave_start, min(wave_start + WAVE, VARIANTS)):
            rng = random.Random(9000 + v)
            gateway, device = f"gw-r9-{v:02d}", f"m-{v:02d}"
            folder = tmp_path / f"v{v:02d}"
            folder.mkdir()
            buffer = folder / "buffer.db"
            build_buffer(buffer, device, gateway)
            how, seqs_intact = damage(buffer, v, rng)
            config = write_config(
                folder / "site.yaml",
                port=broker.port,
                devices=f"  - {{id: {device}, driver: virtual, kind: meter, interval: 50ms}}\n",
            )
            config.write_text(config.read_text().replace("gw-test", gateway))
            name = f"variant {v} ({how})"
            running.append((name, device, seqs_intact, buffer, agent_factory(config), time.monotonic()))

        # The whole wave runs side by side: alive after 3 s, new events within 10 s, then SIGTERM.
        for name, _, _, _, agent, started in running:
            time.sleep(max(0.0, started + 3 - time.monotonic()))
            assert agent.proc is not None
            if agent.proc.poll() is not None:
                failures.append(f"{name}: agent exited with {agent.proc.returncode}:\n{agent.output()[-2000:]}")
        for name, device, _, _, agent, started in running:
            assert agent.proc is not None
            if agent.proc.poll() is not None:
                continue
            try:
                wait_for(
                    lambda d=device: len(received(d, built=False)) >= NEW_EVENTS,
                    max(0.1, started + 10 - time.monotonic()),
                    "new events",
                )
            except AssertionError:
                failures.append(f"{name}: fewer than {NEW_EVENTS} new events within 10 s:\n{agent.output()[-2000:]}")
        for *_, agent, _ in running:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.signal(signal.SIGTERM)

        for name, device, seqs_intact, buffer, agent, _ in running:
            code = agent.wait(10)
            log = agent.output()
            if code != 0:
                failures.append(f"{name}: exit code {code}:\n{log[-2000:]}")
            if "Traceback" in log:
                failures.append(f"{name}: traceback in the log:\n{log[-3000:]}")
            quarantined = [
                p for p in buffer.parent.glob("buffer.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
            ]
            if quarantined:
                outcome["quarantined"] += 1
                unnamed = [p for p in quarantined if str(p) not in log]
                if unnamed:
                    failures.append(f"{name}: quarantined {unnamed} but the log does not name it:\n{log[-2000:]}")
            else:
                outcome["passed"] += 1
                if "corrupt" in log:
                    failures.append(f"{name}: log speaks of corruption but no quarantined file:\n{log[-2000:]}")
            try:
                check_buffer(buffer)  # the file the agent ran on: the original that passed, or the fresh one
            except AssertionError as exc:
                failures.append(f"{name}: {'quarantined' if quarantined else 'passed'}, but {exc}")
            backlog, fresh = received(device, built=True), received(device, built=False)
            # The numbering never goes back below a seq the salvaged backlog delivered.
            if backlog and fresh and min(fresh) <= max(backlog):
                failures.append(f"{name}: new seq {min(fresh)} reuses the delivered backlog (up to {max(backlog)})")
            # (device, seq) is the idempotency key: while the page holding the last seq is intact,
            # numbering must go on from it (docs/delivery.md section 7: "the sequence numbers first").
            if seqs_intact and fresh and min(fresh) <= BUILT_ROWS:
                failures.append(
                    f"{name}: the sequences page was intact (last seq {BUILT_ROWS}) but numbering restarted"
                    f" at {min(fresh)}: (device, seq) keys of already delivered events are reused."
                    f" Log:\n{log[-1500:]}"
                )
            print(
                f"{name}: {'quarantined' if quarantined else 'passed'}, backlog delivered {len(set(backlog))},"
                f" new events {len(fresh)} from seq {min(fresh, default=None)}"
            )
    print(f"R9: {VARIANTS} variants, quarantined {outcome['quarantined']}, passed {outcome['passed']}")
    assert not failures, "\n\n".join(failures)
