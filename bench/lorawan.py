#!/usr/bin/env python3
"""LoRaWAN benchmark: a ChirpStack MQTT integration's uplinks -> agent (driver: lorawan) -> the buffer.

Real parts, each in its own process: a Mosquitto broker on a free loopback port, a publisher
writing ChirpStack v4 ``json=true`` uplinks (QoS 1) of Nwave NPS405 status frames, and the agent
(``python -m agent run``) with N configured devices (default 10,000) sharing one connection. The
agent's own MQTT uplink points at a port nobody listens on, so every event stays in the buffer,
where it is counted and timed. Figures are printed, never asserted.

1. Warm-up: one uplink per device, as fast as the publisher goes: every device decoded once.
2. Steady: ``--rate`` uplinks/s (default 500) for ``--seconds``: accepted uplinks/s, agent CPU %
   of one core, RSS, and p50/p99 from the network server's message (its ``time``, set when the
   publisher sends it) to the buffer (the row's ``created``).
3. Burst: another uplink per device, as fast as possible: the ceiling in uplinks/s.
4. State memory, in this process: N devices' dedupe state with 64 keys each (tracemalloc).

    .venv/bin/python bench/lorawan.py                # about 100 s (10,000 devices)
    .venv/bin/python bench/lorawan.py --devices 2000 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pipeline as pl

ROOT = pl.ROOT
APP = "2d7c1f0a-4b8e-4f3a-9c1d-5e6f7a8b9c0d"


def eui(n: int) -> str:
    return f"70b3d5ff{n:08x}"


def site(folder: Path, broker: int, devices: int) -> Path:
    dead = pl.free_port()  # the agent's uplink: nobody listens, events stay in the buffer
    lines = [
        "gateway: {id: gw-bench, site: bench, health_interval: 1h}",
        f"uplink: {{mqtt: {{host: 127.0.0.1, port: {dead}, reconnect_min: 5s, reconnect_max: 30s}}}}",
        f"buffer: {{path: {folder / 'buffer.db'}, max_bytes: 2GiB}}",
        "devices:",
    ]
    # A merge key keeps 10,000 devices under the site file's 1 MiB.
    lines.insert(0, f"x-bay: &bay {{driver: lorawan, codec: nwave-nps405, application: '{APP}', network_server: "
                    f"{{type: chirpstack, broker: '127.0.0.1:{broker}', state_dir: {folder / 'state'}}}}}")  # fmt: skip
    lines += [f"  - {{<<: *bay, id: b{n}, dev_eui: {eui(n)}, bay: P{n}}}" for n in range(devices)]
    path = folder / "site.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def publisher_main(port: int, devices: int, rate: float, count: int, start_f_cnt: int) -> None:
    """``--publisher``: ``count`` uplinks round-robin over the devices at ``rate``/s (0: flat out)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ns-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    info = None
    started = time.monotonic()
    for i in range(count):
        n = i % devices
        f_cnt = start_f_cnt + i // devices
        when = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        body = (f'{{"deduplicationId":"{uuid.uuid4()}","time":"{when}","deviceInfo":{{"applicationId":"{APP}",'
                f'"deviceName":"bay-{n}","devEui":"{eui(n)}"}},"fCnt":{f_cnt},"fPort":1,'
                f'"data":"{"lQ==" if f_cnt % 2 else "lA=="}","rxInfo":[{{"gatewayId":"0016c001ff10a235",'
                f'"rssi":-97,"snr":3.5}},{{"gatewayId":"0016c001ff10a236","rssi":-104,"snr":-1.0}}]}}')  # fmt: skip
        info = client.publish(f"application/{APP}/device/{eui(n)}/event/up", body, qos=1)
        if rate > 0:
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
    if info is not None:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def publish(port: int, devices: int, rate: float, count: int, start_f_cnt: int) -> subprocess.Popen[bytes]:
    return pl._spawn([sys.executable, str(Path(__file__)), "--publisher", str(port), str(devices), str(rate),
                      str(count), str(start_f_cnt)])  # fmt: skip


def accepted(db: Path) -> int:
    counters = pl.read_counters(db)
    return counters["accepted"] if counters else 0


def latencies(db: Path, since: float) -> list[float]:
    """Milliseconds from each occupancy event's ``time`` (the server's message) to its row's ``created``."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT payload, created FROM outbox WHERE type = 'city.parking.occupancy' AND created >= ?",
                           (since,)).fetchall()  # fmt: skip
    finally:
        con.close()
    out = []
    for payload, created in rows:
        sent = datetime.fromisoformat(json.loads(payload)["time"].replace("Z", "+00:00")).timestamp()
        out.append((created - sent) * 1000)
    return out


def quiet(db: Path, seconds: float = 0.5) -> None:
    """Wait until the buffer has taken nothing new for ``seconds``."""
    last, since = accepted(db), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.05)
        if (now := accepted(db)) != last:
            last, since = now, time.monotonic()


def phase(db: Path, agent: pl.Proc, target: int, run: Callable[[], subprocess.Popen[bytes]], what: str,
          timeout: float) -> dict[str, float]:  # fmt: skip
    """Figures from the first event of the phase in the buffer to the last (the publisher's start-up left out)."""
    before = accepted(db)
    publisher = run()
    pl.wait_for(lambda: accepted(db) > before, timeout, f"{what}: the first event", 0.005)
    cpu0, t0, wall0 = agent.cpu(), time.monotonic(), time.time() - 0.01
    pl.wait_for(lambda: accepted(db) - before >= target, timeout, what, 0.02)
    seconds, cpu, got = time.monotonic() - t0, agent.cpu() - cpu0, accepted(db) - before
    publisher.wait(30)
    quiet(db)  # nothing of this phase may count in the next
    lat = sorted(latencies(db, wall0))
    return {"uplinks": got, "seconds": seconds, "rate": got / seconds, "cpu": 100 * cpu / seconds,
            "rss": pl.mb(agent.rss()), "p50": statistics.median(lat) if lat else float("nan"),
            "p99": lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")}  # fmt: skip


def cpu_per_uplink(devices: int, count: int = 20_000) -> float:
    """Microseconds of CPU (process time: unaffected by other load) per uplink, in this process: the
    driver's whole path for one uplink, MQTT payload to buffered-event bytes (parse, dedupe, decode,
    the occupancy event, the CloudEvent)."""
    sys.path.insert(0, str(ROOT))
    from agent.contract.events import make_event
    from drivers.lorawan.codecs import get_codec
    from drivers.lorawan.config import LorawanConfig
    from drivers.lorawan.logic import DeviceLogic
    from drivers.lorawan.messages import Uplink, parse
    from drivers.lorawan.state import DeviceState

    logics = []
    for n in range(min(devices, 1000)):
        doc = {"id": f"bay-{n}", "driver": "lorawan", "dev_eui": eui(n), "bay": f"P-{n}", "codec": "nwave-nps405",
               "application": APP, "network_server": {"type": "chirpstack", "broker": "127.0.0.1"}}  # fmt: skip
        config = LorawanConfig.model_validate(doc)
        logics.append(DeviceLogic(config, get_codec("nwave-nps405"), DeviceState()))
    topic = f"application/{APP}/device/{eui(0)}/event/up"
    bodies: list[bytes] = []
    for i in range(count):
        when = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        device = eui(i % len(logics))
        f_cnt = i // len(logics) + 1
        text = (f'{{"deduplicationId":"{uuid.uuid4()}","time":"{when}","deviceInfo":{{"devEui":"{device}"}},'
                f'"fCnt":{f_cnt},"fPort":1,"data":"lQ==","rxInfo":[{{"rssi":-97,"snr":3.5}}]}}')  # fmt: skip
        bodies.append(text.encode())
    for logic in logics:  # the first uplink of each also makes its first health event: not measured
        logic.uplink(
            Uplink(logic.config.dev_eui, "warm", 0, 1, b"\x95", datetime.now(UTC), None, None, 0, None, None), 0.0
        )
    now = datetime.now(UTC)
    started = time.process_time()
    for i, body in enumerate(bodies):
        up = parse("chirpstack", topic, body)
        assert isinstance(up, Uplink)
        for reading in logics[i % len(logics)].uplink(up, 1.0) or []:
            make_event(gateway="gw", device="bay", seq=i + 1, reading=reading, now=now)
    return (time.process_time() - started) / count * 1e6


def state_memory(devices: int) -> float:
    """MB held by ``devices`` devices' dedupe state, each with 64 ChirpStack keys (tracemalloc)."""
    sys.path.insert(0, str(ROOT))
    from drivers.lorawan.state import KEEP_KEYS, DeviceState

    tracemalloc.start()
    states = []
    for _ in range(devices):
        state = DeviceState(f_cnt=123456, occupied=True, since="2026-12-07T08:00:00.123456+00:00", battery_class="ok")
        for _ in range(KEEP_KEYS):
            state.remember(str(uuid.uuid4()))
        states.append(state)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return pl.mb(size)


def driver_memory(devices: int) -> tuple[float, float]:
    """KB per device held by the driver beyond its dedupe state (LorawanDriver with its inbox, DeviceLogic
    after an uplink: health figures), and by its config (the agent's pydantic model), tracemalloc."""
    sys.path.insert(0, str(ROOT))
    from drivers.lorawan.codecs import get_codec
    from drivers.lorawan.config import LorawanConfig
    from drivers.lorawan.driver import LorawanDriver
    from drivers.lorawan.logic import DeviceLogic
    from drivers.lorawan.messages import Uplink
    from drivers.lorawan.state import DeviceState

    codec = get_codec("nwave-nps405")
    tracemalloc.start()
    configs = [LorawanConfig.model_validate({"id": f"b{n}", "driver": "lorawan", "dev_eui": eui(n), "bay": f"P{n}",
                                             "codec": "nwave-nps405", "application": APP,
                                             "network_server": {"type": "chirpstack", "broker": "127.0.0.1"}})
               for n in range(devices)]  # fmt: skip
    with_configs = tracemalloc.get_traced_memory()[0]
    kept = []
    for config in configs:
        logic = DeviceLogic(config, codec, DeviceState())
        up = Uplink(config.dev_eui, "k", 1, 1, b"\x95", datetime.now(UTC), -97.0, 3.5, 2, None, None, dr=5)
        logic.uplink(up, 0.0)
        kept.append((LorawanDriver(config, None), logic))  # type: ignore[arg-type]
    size = tracemalloc.get_traced_memory()[0] - with_configs
    tracemalloc.stop()
    return size / devices / 1e3, with_configs / devices / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0, help="steady phase: uplinks per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="steady phase: how long")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--profile", action="store_true", help="run the agent under cProfile (agent.prof, kept)")
    parser.add_argument("--publisher", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publisher:
        port, devices, rate, count, start = args.publisher
        publisher_main(int(port), int(devices), float(rate), int(count), int(start))
        return 0
    pl.exit_cleanly()
    folder = Path(tempfile.mkdtemp(prefix="bench-lorawan-"))
    broker = pl.Mosquitto(folder / "broker")
    broker.start()
    config = site(folder, broker.port, args.devices)
    log = (folder / "agent.log").open("wb")
    started = time.monotonic()
    profile = ["-m", "cProfile", "-o", str(folder / "agent.prof")] if args.profile else []
    proc = pl._spawn([sys.executable, *profile, "-m", "agent", "run", "-c", str(config)], cwd=ROOT, stdout=log,
                     stderr=log)  # fmt: skip
    agent = pl.Proc(proc.pid)
    pl.wait_for(lambda: b"connected as" in (folder / "agent.log").read_bytes(), 120, "the agent's NS connection")
    time.sleep(1.0)  # the device tasks claim their DevEUIs
    print(
        f"agent up with {args.devices} devices in {time.monotonic() - started:.1f} s, RSS {pl.mb(agent.rss()):.0f} MB"
    )
    db = folder / "buffer.db"
    n = args.devices
    # Each device's first uplink also makes its first city.device.health and its status online: 3 events.
    warm = phase(db, agent, 3 * n, lambda: publish(broker.port, n, 0, n, 1), "warm-up", 300)
    count = int(args.rate * args.seconds)
    steady = phase(db, agent, count, lambda: publish(broker.port, n, args.rate, count, 2), "steady", 300)
    burst = phase(db, agent, n, lambda: publish(broker.port, n, 0, n, 2 + count // n + 1), "burst", 300)
    rss_after = pl.mb(agent.rss())
    pl._stop(proc)
    broker.stop()
    print(
        f"{'phase':<8} {'uplinks':>8} {'s':>6} {'events/s':>9} {'CPU %':>6} {'RSS MB':>7} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for name, r in (("warm-up", warm), ("steady", steady), ("burst", burst)):
        print(f"{name:<8} {r['uplinks']:>8.0f} {r['seconds']:>6.1f} {r['rate']:>9.0f} {r['cpu']:>6.0f} "
              f"{r['rss']:>7.0f} {r['p50']:>7.1f} {r['p99']:>7.1f}")  # fmt: skip
    print("(warm-up: 3 events per uplink: occupancy, the first health, status online; steady and burst: 1)")
    print(f"agent RSS after the run: {rss_after:.0f} MB")
    micro = cpu_per_uplink(n)
    print(
        f"driver path per uplink (in-process CPU): {micro:.0f} us, i.e. {1e6 / micro:,.0f} uplinks/s per core "
        f"(500/s: {500 * micro / 1e4:.1f} % of a core)"
    )
    print(f"dedupe state of {n} devices with 64 keys each: {state_memory(n):.1f} MB (tracemalloc)")
    driver_kb, config_kb = driver_memory(n)
    print(
        f"per device: the driver's objects {driver_kb:.2f} KB (+ dedupe keys, 0.7 KB at 64), its config model "
        f"{config_kb:.2f} KB (tracemalloc)"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"work directory: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
