"""Reconnect behaviour with the production keepalive (30 s) against a real Mosquitto.

* lost PUBACKs (R10): a missing PUBACK must not stall delivery while the agent waits out a
  keepalive; its messages are sent again over a new connection within seconds;
* half-open links (R11): a dead link is noticed within one keepalive, busy or idle, and
  delivery comes back after the heal;
* broker outages: delivery resumes within the reconnect cap of the broker's return, and the
  waits a fleet would see (the agent's own Backoff) spread the fleet's reconnects.

Agents publish through :class:`tests.mqtt_proxy.MqttProxy`; the counting subscriber, which also
notes when each message arrives, talks to the broker directly.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from agent.uplinks.mqtt.uplink import ANSWER_FLOOR, HOLD_MIN, TICK, Backoff
from tests.conftest import Mosquitto, Subscriber, last_seqs, wait_for, write_config
from tests.mqtt_proxy import MqttProxy
from tests.uplinks.mqtt.test_faults import _max_outbox_id, _outbox_rows, _stop_and_check_delivery

KEEPALIVE = 30.0  # the default
IDLE_KEEPALIVE = 10.0
# The defaults (agent/config/model.py), spelled out so a change of default shows in these tests.
RECONNECT = "reconnect_min: 1s, reconnect_max: 10s"
CAP = 10.0


@pytest.fixture
def proxy(broker: Mosquitto) -> Any:
    p = MqttProxy(broker.port).start()
    yield p
    p.stop()


class TimedSubscriber(Subscriber):
    """The counting subscriber, also noting when each event arrived (monotonic seconds)."""

    def __init__(self, port: int, **kw: Any) -> None:
        self.arrivals: list[tuple[float, str, int]] = []  # (when, device, seq)
        super().__init__(port, **kw)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        before = len(self.events)
        super()._on_message(client, userdata, msg)
        with self.lock:
            self.arrivals += [(now, e["device"], e["seq"]) for e in self.events[before:]]

    def arrivals_between(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [t for t, _, _ in self.arrivals if start <= t <= end]


@pytest.fixture
def timed_subscriber() -> Any:
    made: list[TimedSubscriber] = []

    def make(port: int, client_id: str) -> TimedSubscriber:
        s = TimedSubscriber(port, client_id=client_id)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _config(tmp_path: Path, port: int, devices: str, mqtt: str = "", health: str = "60s") -> Path:
    """write_config with the production MQTT settings (keepalive 30 s...) plus ``mqtt``."""
    path = write_config(tmp_path / "site.yaml", port=port, devices=devices, health=health)
    tail = f", {mqtt}}}" if mqtt else "}"
    text = path.read_text().replace(", keepalive: 5s, reconnect_min: 200ms, reconnect_max: 1s}", tail)
    assert "keepalive" not in text or "keepalive" in mqtt
    path.write_text(text)
    return path


def _gaps(times: list[float], start: float, end: float) -> list[float]:
    """Gaps between consecutive arrivals in [start, end], the open ends included."""
    points = [start, *times, end]
    return [b - a for a, b in itertools.pairwise(points)]


# ---- R10: lost PUBACKs with the default keepalive -----------------------------------------------
FAST_DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 5ms}\n"
    "  - {id: meter-2, driver: virtual, kind: meter, interval: 5ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 50ms}\n"
    "  - {id: cross-n, driver: virtual, kind: crosswalk, interval: 50ms}\n"
)
FAST = ("meter-1", "meter-2", "bay-a1", "cross-n")
FAULT_SECONDS = 22.0  # the old agent filled its window in ~7 s here, then stalled ~50 s


@pytest.mark.timeout(90)
def test_lost_pubacks_never_stall_delivery_for_long(
    tmp_path: Path, broker: Mosquitto, proxy: MqttProxy, timed_subscriber, agent_factory
) -> None:
    sub = timed_subscriber(broker.port, "reconnect-sub-r10")
    config = _config(tmp_path, proxy.port, FAST_DEVICES)  # every MQTT setting at its default
    buffer = tmp_path / "buffer.db"
    proxy.drop_pubacks(0.05, seed=12)
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 50, 20, "first events through the proxy")
    start = time.monotonic()
    time.sleep(FAULT_SECONDS)
    end = time.monotonic()
    gaps = _gaps(sub.arrivals_between(start, end), start, end)
    faults = proxy.stats()
    reconnects = agent.output().count("PUBACK(s) missing")
    print(
        f"\nlost PUBACKs, keepalive {KEEPALIVE:.0f}s: longest gap between deliveries {max(gaps):.2f}s over "
        f"{FAULT_SECONDS:.0f}s; {faults.pubacks_dropped}/{faults.pubacks_seen} PUBACKs dropped; "
        f"{reconnects} reconnects to resend, {faults.connections} connections"
    )
    assert faults.pubacks_dropped >= 100, faults  # the faults really happened
    assert max(gaps) < 10.0, f"delivery stalled {max(gaps):.1f}s with lost PUBACKs (keepalive {KEEPALIVE:.0f}s)"

    # Heal: what the last connection still misses is sent again within seconds, no reset needed.
    proxy.heal()
    healed_at_id = _max_outbox_id(buffer)
    wait_for(lambda: _outbox_rows(buffer, healed_at_id) == 0, 15, "every row committed before the heal delivered")
    reports = _stop_and_check_delivery(agent, sub, buffer, FAST)
    total = sum(r["max"] for r in reports.values())
    dups = sum(r["duplicates"] for r in reports.values())
    print(f"  {total} events, {dups} duplicates (ratio {dups / total:.3f})")
    for device, r in reports.items():
        assert r["inversions"] == 0, (device, r["inverted_at"])
    # Each lost PUBACK costs one duplicate, plus what was in flight at the few cuts (none here:
    # the agent lets the PUBACKs in flight arrive before it reconnects).
    assert dups <= 1.5 * proxy.stats().pubacks_dropped + 100, (dups, proxy.stats())


# ---- R11: half-open links with keepalive 30 s -----------------------------------------------
SLOW_DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n"
    "  - {id: bay-a1, driver: virtual, kind: parking, interval: 50ms}\n"
)


@pytest.mark.timeout(90)
def test_half_open_busy_link_is_noticed_within_seconds(
    tmp_path: Path, broker: Mosquitto, proxy: MqttProxy, timed_subscriber, agent_factory
) -> None:
    sub = timed_subscriber(broker.port, "reconnect-sub-busy")
    config = _config(tmp_path, proxy.port, SLOW_DEVICES, RECONNECT)  # keepalive 30 s
    buffer = tmp_path / "buffer.db"
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 50, 20, "first events through the proxy")

    proxy.blackhole(True)
    t0 = time.monotonic()
    try:
        wait_for(lambda: "uplink lost" in agent.output(), 1.5 * KEEPALIVE + 2, "the agent to notice the dead link")
        detected = time.monotonic() - t0
    except AssertionError:
        detected = float("inf")
    print(f"\nhalf-open, busy, keepalive {KEEPALIVE:.0f}s: detected after {detected:.2f}s")
    assert detected <= 1.5 * KEEPALIVE, f"R11: a dead link took {detected:.1f}s to notice (> 45 s)"
    # A PUBACK is due all the time on a busy link: the answer timeout, not the keepalive, bounds it.
    assert detected <= ANSWER_FLOOR + 2 * TICK + 1, detected

    # The proxy still holds what the dead connection sent; the heal lets it through, so only a
    # new connection (and the rows it delivers) shows recovery.
    connects = agent.output().count("uplink connected")
    proxy.blackhole(False)
    healed = time.monotonic()
    healed_at_id = _max_outbox_id(buffer)
    wait_for(lambda: agent.output().count("uplink connected") > connects, 40, "a new connection after the heal")
    wait_for(lambda: _outbox_rows(buffer, healed_at_id) == 0, 40, "the rows of the outage delivered")
    recovery = time.monotonic() - healed
    print(f"  connected and caught up {recovery:.2f}s after the heal")
    assert recovery <= 35, recovery  # R11
    reports = _stop_and_check_delivery(agent, sub, buffer, ("meter-1", "bay-a1"))
    assert all(r["inversions"] == 0 for r in reports.values()), reports


@pytest.mark.timeout(90)
def test_half_open_idle_link_is_noticed_within_one_keepalive(
    tmp_path: Path, broker: Mosquitto, proxy: MqttProxy, timed_subscriber, agent_factory
) -> None:
    sub = timed_subscriber(broker.port, "reconnect-sub-idle")
    idle = "  - {id: bay-a1, driver: virtual, kind: parking, interval: 1h}\n"
    # A third of the default keepalive (the bounds scale with it) keeps this test short; the busy
    # link's test above runs with the default 30 s.
    config = _config(tmp_path, proxy.port, idle, f"{RECONNECT}, keepalive: {IDLE_KEEPALIVE:.0f}s", health="1h")
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("gateway")) >= 1, 20, "the first health event")  # then nothing for an hour
    time.sleep(0.5)
    proxy.blackhole(True)
    t0 = time.monotonic()
    try:
        wait_for(lambda: "uplink lost" in agent.output(), 1.5 * IDLE_KEEPALIVE + 2, "the agent to notice the dead link")
        detected = time.monotonic() - t0
    except AssertionError:
        detected = float("inf")
    pings = [round(p - t0, 1) for p in proxy.stats().pingreqs_at if p > t0]
    print(f"\nhalf-open, idle, keepalive {IDLE_KEEPALIVE:.0f}s: detected after {detected:.2f}s; PINGREQs at {pings} s")
    assert detected <= 1.5 * IDLE_KEEPALIVE, f"R11: a dead idle link took {detected:.1f}s (> 1.5 keepalives)"
    # Ping after half a keepalive of silence, then at most half a keepalive for the answer.
    assert detected <= IDLE_KEEPALIVE + 2 * TICK, detected

    connects = agent.output().count("uplink connected")
    proxy.blackhole(False)
    healed = time.monotonic()
    wait_for(lambda: agent.output().count("uplink connected") > connects, 40, "a new connection after the heal")
    recovery = time.monotonic() - healed
    print(f"  connected again {recovery:.2f}s after the heal")
    assert recovery <= CAP + 1, recovery


# ---- broker outages: how soon delivery resumes ---------------------------------------------------
# With the cap at 10 s a cycle takes 10 s or more (one attempt per cap while connections do not
# hold); the test keeps the same ratio with a 5 s cap: delivery resumes within one cap.
OUTAGE_CAP = 5.0
OUTAGES = (1.0, 6.5, 2.0)  # seconds; the second outlasts an attempt, which then fails


@pytest.mark.timeout(120)
def test_delivery_resumes_within_the_cap_after_broker_outages(
    tmp_path: Path, broker: Mosquitto, proxy: MqttProxy, timed_subscriber, agent_factory
) -> None:
    sub = timed_subscriber(broker.port, "reconnect-sub-outage")
    devices = "  - {id: meter-1, driver: virtual, kind: meter, interval: 20ms}\n"
    config = _config(tmp_path, proxy.port, devices, f"reconnect_min: 1s, reconnect_max: {OUTAGE_CAP:.0f}s")
    buffer = tmp_path / "buffer.db"
    agent = agent_factory(config)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 20, 20, "first events")
    resumes: list[float] = []
    for outage in OUTAGES:
        time.sleep(1.0)  # live, but far from holding (HOLD_MIN)
        broker.stop()
        # Readings up to here may have reached the broker before it stopped (and reach the
        # subscriber from its persisted queue after the restart); later ones only go through
        # a new connection: they are the live events.
        newest = last_seqs(buffer)["meter-1"]
        time.sleep(outage)
        broker.start()
        back = time.monotonic()

        def live(newest: int = newest, back: float = back) -> float | None:
            with sub.lock:
                return next((t for t, d, q in sub.arrivals if d == "meter-1" and q > newest and t >= back), None)

        arrived = wait_for(live, OUTAGE_CAP + 5, "the first event after the broker's return")
        resumes.append(arrived - back)
    connects = proxy.stats().connects_at
    spacing = [b - a for a, b in itertools.pairwise(connects)]
    print(
        f"\noutages {OUTAGES} s, cap {OUTAGE_CAP:.0f}s: delivery resumed {[round(r, 2) for r in resumes]} s after "
        f"the broker's return (median {statistics.median(resumes):.2f}s); attempts "
        f"{[round(s, 2) for s in spacing]} s apart"
    )
    assert max(resumes) <= OUTAGE_CAP, resumes
    # No reset on a mere CONNACK: none of these connections held, so attempts stay one cap apart
    # (and so never more than once a second).
    assert min(spacing) >= OUTAGE_CAP - 0.1, spacing
    assert agent.proc is not None and agent.proc.poll() is None, agent.output()[-3000:]


# ---- a fleet's reconnects, from the agent's own Backoff --------------------------------------------
def _fleet(n: int, outage: float, cap: float = CAP, seed: int = 7) -> tuple[list[float], float]:
    """N agents lose a held connection at t=0; the broker is back at ``outage``.

    Runs the real Backoff; returns each agent's reconnect time and the shortest time any agent
    left between two of its attempts.
    """
    rng = random.Random(seed)
    back, closest = [], float("inf")
    for _ in range(n):
        b = Backoff(1.0, cap, max(HOLD_MIN, cap), random.Random(rng.random()))
        b.attempt(-100.0)
        b.connected(-100.0)
        t = b.next_wait(0.0)
        while t < outage:  # refused: the broker is still away
            b.attempt(t)
            wait = b.next_wait(t)
            closest = min(closest, wait)
            t += wait
        back.append(t)
    return back, closest


def _busiest_second(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize(("outage", "max_share"), [(0.5, 0.125), (3.0, 0.125), (30.0, 0.125)])
def test_a_fleet_comes_back_spread_over_the_cap(outage: float, max_share: float) -> None:
    """A broker restart (0.5 s) and a 30 s outage, for 2,000 agents with the default cap.

    Expected: N/cap per second in both cases (10 %, plus chance: 2,000 random phases make the
    busiest second about 12 %), never more than one attempt per second per agent, every agent
    back within one cap and half of them within half of it.
    """
    n = 2000
    back, closest = _fleet(n, outage)
    delays = [t - outage for t in back]
    share = _busiest_second(back) / n
    print(
        f"\nfleet of {n}, outage {outage}s, cap {CAP:.0f}s: busiest second {share:.1%} of the fleet; back "
        f"median {statistics.median(delays):.2f}s, max {max(delays):.2f}s after the broker; "
        f"closest attempts of one agent {closest:.2f}s apart"
    )
    assert share <= max_share
    assert max(delays) <= CAP
    assert statistics.median(delays) <= CAP / 2 * 1.05
    assert closest >= 1.0


def test_backoff_resets_only_after_a_connection_held() -> None:
    rng = random.Random(3)
    b = Backoff(1.0, CAP, HOLD_MIN, rng)
    b.attempt(0.0)
    b.connected(0.5)
    assert b.next_wait(3.0) == pytest.approx(CAP - 3.0)  # dropped 3 s after the attempt: next one a cap after it
    b.attempt(10.0)
    assert b.next_wait(10.1) == pytest.approx(CAP - 0.1)  # refused: a cap after the last attempt
    b.attempt(20.0)
    b.connected(20.0)
    assert b.next_wait(21.0, resend=True) == 0.0  # our own resend: at once (last attempt 1 s ago)
    b.attempt(21.0)
    b.connected(21.0)
    held = [b.next_wait(50.0)]  # held 30 s: a new random phase
    for _ in range(200):
        b.attempt(0.0)
        b.connected(0.0)
        held.append(b.next_wait(60.0))
    assert min(held) < CAP / 4
    assert max(held) <= CAP
    b.attempt(100.0)
    b.connected(100.0)
    assert b.next_wait(100.2, resend=True) == pytest.approx(0.8)  # at most one attempt per reconnect_min


# ---- duplicates per crash during a fast drain ---------------------------------------------------
BURST_DEVICES = (
    "  - {id: meter-1, driver: virtual, kind: meter, interval: 10ms, burst: 10}\n"
    "  - {id: meter-2, driver: virtual, kind: meter, interval: 10ms, burst: 10}\n"
)
KILLS = 6
WINDOW = 100  # max_inflight's default


@pytest.mark.timeout(90)
def test_a_kill_during_a_fast_drain_resends_at_most_one_window(
    tmp_path: Path, broker: Mosquitto, timed_subscriber, agent_factory
) -> None:
    """SIGKILL while a backlog drains at full speed (2,000 readings/s produced on top).

    What a kill sends again: the messages in flight and those acknowledged but not yet deleted
    from the buffer. The window counts both, so at most max_inflight per kill, however fast the
    drain (it was every PUBACK of the last 100 ms: hundreds at this rate).
    """
    rng = random.Random(int(time.time()))
    sub = timed_subscriber(broker.port, "reconnect-sub-kill")
    config = _config(tmp_path, broker.port, BURST_DEVICES, "reconnect_min: 200ms, reconnect_max: 1s")
    buffer = tmp_path / "buffer.db"
    broker.stop()
    agent = agent_factory(config)
    time.sleep(3)  # a backlog of ~6,000 readings
    broker.start()
    marks: list[int] = []
    for _ in range(KILLS):
        start = len(sub.snapshot())
        wait_for(lambda start=start: len(sub.snapshot()) > start + 200, 20, "the drain to run")
        time.sleep(rng.uniform(0.1, 0.6))
        agent.kill()
        marks.append(len(sub.snapshot()))
        agent = agent_factory(config)
    wait_for(lambda: len(sub.snapshot()) > marks[-1] + 200, 20, "delivery after the last restart")
    killed_at = last_seqs(buffer)
    sub.wait_for_all({d: killed_at[d] for d in ("meter-1", "meter-2")}, 30)
    agent.kill()
    time.sleep(0.5)  # stragglers
    events = sub.snapshot()
    seen: set[tuple[str, int]] = set()
    per_kill = [0] * (KILLS + 1)
    segment = 0
    for i, e in enumerate(events):
        while segment < KILLS and i >= marks[segment]:
            segment += 1
        key = (e["device"], e["seq"])
        if key in seen:
            per_kill[segment] += 1
        seen.add(key)
    drained = sum(killed_at.values())
    print(f"\nkills during a fast drain ({drained} readings): duplicates per kill {per_kill[1:]}")
    for device in ("meter-1", "meter-2"):
        report = sub.report(device)
        assert report["lost"] == [] or max(report["lost"]) > killed_at[device], (device, report["lost"][:10])
        assert report["inversions"] == 0, (device, report["inverted_at"])
    assert max(per_kill[1:]) <= WINDOW, per_kill
