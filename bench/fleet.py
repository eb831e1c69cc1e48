#!/usr/bin/env python3
"""Fleet benchmark (issue 15): as many real agent processes as fit, one Mosquitto, the fleet control channel.

Everything is real: one Mosquitto on a free loopback port, N agents (``python -m agent run -c site.yaml``, gateways
gw-001 .. gw-N, each with its own state directory and one virtual meter polled every second) with ``fleet.enabled``
and one operator key, an independent counting subscriber (persistent session, QoS 1 on ``ioc/v1/#``), and the bench
as the operator: it signs ``ping`` commands with the agent's own envelope code and sends them with one paho client.
The link is plain MQTT on loopback, no TLS: the figures leave out the TLS handshake a real fleet pays on reconnect.

Phases: memory with the channel on; command round trip (and a bare paho echo through the same broker as the
yardstick); push-config (the operator CLI pushes a second meter to every gateway: committed and applied times,
bench/fleet_push.py); broker restart (the CONNECT storm, from the broker's log); events lost over all of these;
then the same gateways with the channel off, for the memory difference. It prints figures next to their targets;
it asserts nothing and exits 0 whenever it could measure. See bench/README.md ("Fleet benchmark").

    .venv/bin/python bench/fleet.py              # 100 agents, about 3.5 minutes on 2 vCPUs
    .venv/bin/python bench/fleet.py --quick      # 20 agents, shorter phases, about 1.5 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is sys.path[0] when this file is run: pipeline.py's broker, process and buffer-file helpers are reused.
import fleet_log as fl
import fleet_push
import pipeline as pl
from fleet_echo import ECHO, ECHO_MODES, no_delay
from fleet_report import print_memory, report, summary

ROOT = pl.ROOT
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FLEET_ROOT = "fleet/v1"
CLIENT_PREFIX = "edge-agent-gw-"  # the agents' default client ids: edge-agent-{gateway}


@dataclass
class Sizes:
    agents: int
    starting: int = 3  # agents started but not yet online at most: start-up CPU must not starve the others
    settle: float = 20.0  # s after the last agent is online before memory is sampled (both sets alike)
    cpu_window: float = 10.0  # s over which the idle fleet's CPU is measured
    rounds: int = 10  # pings per gateway
    inflight: int = 4  # round trips in flight at most, overall
    echo: int = 200  # bare paho echo round trips per mode
    outage: float = 10.0  # s the broker is down
    back_timeout: float = 150.0  # s to wait for every agent to reconnect
    watch: float = 30.0  # s to keep watching connections once all are back (reconnect loops)


FULL = Sizes(agents=100)
QUICK = Sizes(agents=20, settle=10.0, cpu_window=5.0, rounds=5, echo=100, outage=6.0, watch=10.0)

_children = pl._children


def _die_with_parent() -> None:
    """Child side of every spawn: SIGTERM when the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    return pl._spawn(args, preexec_fn=_die_with_parent, **kw)


class Broker(pl.Mosquitto):
    """pipeline.py's persistent broker, logging every accepted CONNECT to a file the bench tails.

    ``set_tcp_nodelay true``: Mosquitto's default leaves Nagle on, which delays a message written right after a
    PUBACK on the same connection by the peer's delayed ACK (~40 ms); EMQX, the city's broker, turns Nagle off.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, persistent=True)
        self.log_path = workdir / "mosquitto.log"
        logging = [
            f"log_dest file {self.log_path}",
            "connection_messages true",
            "log_timestamp true",
            "set_tcp_nodelay true",
        ]
        logging += [f"log_type {t}" for t in ("error", "warning", "notice", "information")]
        self.conf.write_text(self.conf.read_text().replace("log_dest none", "\n".join(logging)))
        self.log = fl.BrokerLog(self.log_path)

    def start(self) -> None:
        self.proc = spawn(
            [pl.mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        pl.wait_for(self._accepting, 10, "mosquitto to accept connections", 0.01)

    def _accepting(self) -> bool:
        import socket

        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode} (config {self.conf})")
        return False


# ---------------------------------------------------------------------------------------------
# the agents
# ---------------------------------------------------------------------------------------------
RECONNECT_MAX: list[str] = []  # --reconnect-max: the agents' uplink.mqtt.reconnect_max, if not the default


def site_yaml(gateway: str, port: int, state: Path, fleet: str) -> str:
    """Shipped defaults (reconnect 1 s -> 10 s, keepalive 30 s) except the broker; one meter every second."""
    cap = f", reconnect_max: {RECONNECT_MAX[0]}" if RECONNECT_MAX else ""
    return (
        f"gateway: {{id: {gateway}, site: bench}}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {port}, topic_prefix: {pl.TOPIC_PREFIX}{cap}}}\n"
        f"buffer: {{path: {state / 'buffer.db'}}}\n"
        f"{fleet}"
        "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 1s}\n"
    )


@dataclass
class Agent:
    gateway: str
    state: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    exit: int | None = None

    def start(self, port: int, fleet: str) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o700)
        config = self.state / "site.yaml"
        config.write_text(site_yaml(self.gateway, port, self.state, fleet))
        with (self.state / "agent.log").open("ab") as log:
            self.proc = spawn(
                [sys.executable, "-m", "agent", "run", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.started = time.time()

    def problems(self) -> list[str]:
        text = (self.state / "agent.log").read_text(errors="replace")
        return [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line or "CRITICAL" in line]


def stop_all(agents: list[Agent], timeout: float = 20.0) -> dict[str, int]:
    """SIGTERM to all at once; how many exited 0, non-zero, or had to be killed."""
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            with contextlib.suppress(OSError):
                a.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    outcome: Counter[str] = Counter()
    for a in agents:
        if a.proc is None:
            continue
        try:
            a.exit = a.proc.wait(max(0.1, deadline - time.monotonic()))
            outcome["exit 0" if a.exit == 0 else f"exit {a.exit}"] += 1
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.exit = a.proc.wait(5)
            outcome["killed"] += 1
    return dict(outcome)


class Operator:
    """The bench's own paho client: watches the agents' status topics and sends requests, collects replies."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.online: dict[str, float] = {}  # gateway -> when a live (not retained) `online` arrived
        self.replies: dict[str, tuple[float, str]] = {}  # request id -> (monotonic time, status)
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-operator-{os.getpid()}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_socket_open = no_delay
        self.client.reconnect_delay_set(0.05, 0.25)  # type: ignore[arg-type] # floats work
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the operator client could not subscribe")

    def _on_connect(self, c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            c.subscribe([(f"{pl.TOPIC_PREFIX}/+/status", 1), (f"{FLEET_ROOT}/+/res/#", 1), (f"{ECHO}/res/+", 1)])

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        with self.cond:
            if msg.topic.startswith(f"{pl.TOPIC_PREFIX}/") and parts[-1] == "status":
                if msg.payload == b"online" and not msg.retain:
                    self.online[parts[-2]] = time.time()
            elif msg.topic.startswith(f"{ECHO}/res/"):
                self.replies[parts[-1]] = (now, "ok")
            else:  # fleet/v1/{gw}/res/{id}/{status}
                self.replies[parts[-2]] = (now, parts[-1])
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> float:
        t0 = time.monotonic()
        self.client.publish(topic, payload, qos=1)
        return t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_fleet(agents: list[Agent], op: Operator, port: int, fleet: str, sz: Sizes) -> float:
    """Start every agent, at most ``sz.starting`` not yet online at a time; seconds until all are online."""
    t0 = time.time()
    queue = deque(agents)
    waiting: list[Agent] = []
    while queue or waiting:
        with op.cond:
            waiting = [a for a in waiting if op.online.get(a.gateway, 0.0) < a.started]
            for a in waiting:
                if time.time() - a.started > 60 or (a.proc is not None and a.proc.poll() is not None):
                    raise RuntimeError(f"{a.gateway} did not come online in 60 s; see {a.state / 'agent.log'}")
            while queue and len(waiting) < sz.starting:
                a = queue.popleft()
                a.start(port, fleet)
                waiting.append(a)
            op.cond.wait(0.1)
    return time.time() - t0


def memory(agents: list[Agent], cpu_window: float) -> dict[str, float]:
    """Mean RSS, PSS and USS of the agents (psutil, /proc/<pid>/smaps_rollup), and their CPU over a window."""
    import psutil

    procs = [psutil.Process(a.proc.pid) for a in agents if a.proc is not None]
    cpu0 = sum(pl.Proc(p.pid).cpu() for p in procs)
    time.sleep(cpu_window)
    cpu1 = sum(pl.Proc(p.pid).cpu() for p in procs)
    rss, pss, uss = [], [], []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            full = p.memory_full_info()
            rss.append(full.rss)
            pss.append(getattr(full, "pss", 0))
            uss.append(full.uss)
    n = max(1, len(rss))
    return {
        "n": len(rss),
        "rss": sum(rss) / n,
        "rss_max": max(rss, default=0),
        "pss": sum(pss) / n,
        "uss": sum(uss) / n,
        "cpu": (cpu1 - cpu0) / cpu_window * 100,
    }


# ---------------------------------------------------------------------------------------------
# phases while the fleet runs with the channel on: each takes the run and returns its figures
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    sz: Sizes
    work: Path
    broker: Broker
    op: Operator
    agents: list[Agent]
    key: Any  # Ed25519PrivateKey
    key_id: str
    results: dict[str, Any] = field(default_factory=dict)


def round_trips(op: Operator, jobs: list[tuple[str, str, str, bytes]], inflight: int, timeout: float) -> dict[str, Any]:
    """Send ``jobs`` (lane, request id, topic, payload), one at a time per lane, ``inflight`` at most overall."""
    queue = deque(jobs)
    pending: dict[str, tuple[str, float]] = {}  # request id -> (lane, sent at)
    rtts: list[float] = []
    statuses: Counter[str] = Counter()
    unanswered = 0
    while queue or pending:
        with op.cond:
            now = time.monotonic()
            for rid, (_lane, sent) in list(pending.items()):
                if rid in op.replies:
                    at, status = op.replies[rid]
                    rtts.append((at - sent) * 1000)
                    statuses[status] += 1
                    del pending[rid]
                elif now - sent > timeout:
                    unanswered += 1
                    del pending[rid]
            busy = {lane for lane, _ in pending.values()}
            skipped: list[tuple[str, str, str, bytes]] = []
            while queue and len(pending) < inflight:
                job = queue.popleft()
                if job[0] in busy:
                    skipped.append(job)
                    if len(skipped) > inflight * 4:
                        break
                    continue
                pending[job[1]] = (job[0], op.publish(job[2], job[3]))
                busy.add(job[0])
            queue.extendleft(reversed(skipped))
            if pending:
                op.cond.wait(0.05)
    rtts.sort()
    return {
        "sent": len(jobs),
        "answered": len(rtts),
        "unanswered": unanswered,
        "statuses": dict(statuses),
        "p50": pl.percentile(rtts, 50),
        "p95": pl.percentile(rtts, 95),
        "p99": pl.percentile(rtts, 99),
        "max": rtts[-1] if rtts else float("nan"),
    }


def phase_round_trip(run: Run) -> dict[str, Any]:
    """Signed pings to every gateway, ``rounds`` each; before them, a bare paho echo through the same broker."""
    from agent.fleet.envelope import COMMAND_TYPE, make_body, sign

    sz = run.sz
    figures: dict[str, Any] = {}
    for mode in ECHO_MODES:
        echo = spawn(
            [sys.executable, str(Path(__file__).with_name("fleet_echo.py")), str(run.broker.port), mode],
            stdout=subprocess.PIPE,
        )
        try:
            assert echo.stdout is not None
            echo.stdout.readline()  # "subscribed"
            jobs = [(f"e{i % sz.inflight}", f"{mode}{i}", f"{ECHO}/req/{mode}{i}", b"{}") for i in range(sz.echo)]
            figures[f"echo_{mode}"] = round_trips(run.op, jobs, 1, 10.0)  # one at a time, as one gateway sees them
        finally:
            pl._stop(echo, signal.SIGTERM, 5)
    jobs = []
    for r in range(sz.rounds):
        for a in run.agents:
            rid = f"b{r}-{a.gateway}"
            body = make_body(target=a.gateway, ttl=600, fields={"command": "ping", "id": rid, "args": {}})
            envelope = sign(COMMAND_TYPE, body, run.key, run.key_id)  # signed before timing starts
            jobs.append((a.gateway, rid, f"{FLEET_ROOT}/{a.gateway}/req/{rid}/ping", envelope))
    mosq = pl.Proc(run.broker.pid)
    m0, t0 = mosq.cpu(), time.monotonic()
    fleet = round_trips(run.op, jobs, sz.inflight, 10.0)
    elapsed = time.monotonic() - t0
    fleet["seconds"] = elapsed
    fleet["mosq_cpu"] = (mosq.cpu() - m0) / elapsed * 100 if elapsed else 0.0
    return {**figures, "ping": fleet}


def phase_push_config(run: Run) -> dict[str, Any]:
    """``fleet push-config`` of a site file with a second meter to every gateway (bench/fleet_push.py)."""
    port, gateways = run.broker.port, [a.gateway for a in run.agents]
    site = site_yaml(gateways[0], port, run.work / "push", "")
    return fleet_push.push(run.work, port, gateways, run.work / "operator.pem", run.key_id, site, FLEET_ROOT)


def phase_restart(run: Run) -> dict[str, Any]:
    """Stop the broker for ``outage`` s, start it on the same port, and read the reconnection from its log."""
    sz, broker, n = run.sz, run.broker, len(run.agents)
    run.broker.stop()
    down = time.time()
    time.sleep(sz.outage)
    broker.start()
    t0 = pl.wait_for(lambda: broker.log.started(down), 5, "the broker's `running` log line", 0.01)

    def everyone() -> bool:
        return len({cid for _, cid in broker.log.connects(CLIENT_PREFIX, t0)}) >= n

    with contextlib.suppress(RuntimeError):
        pl.wait_for(everyone, sz.back_timeout, "every agent to reconnect", 0.1)
    time.sleep(sz.watch)
    r = fl.storm(broker.log.connects(CLIENT_PREFIX, t0), t0, n)
    r["outage"] = t0 - down
    r["reasons"] = dict(broker.log.lines_matching(t0, "already connected", "Socket error", "exceeded timeout"))
    return r


# Run in this order while the channel is on; push-config goes before the restart, which disturbs the fleet, and
# every phase before the final loss count (events lost through the push are counted with the restart's).
PHASES: list[tuple[str, Callable[[Run], dict[str, Any]]]] = [
    ("round_trip", phase_round_trip),
    ("push_config", phase_push_config),
    ("restart", phase_restart),
]


def losses(agents: list[Agent], sub_log: Path) -> dict[str, int]:
    """Per (gateway, device): seqs the agent gave out, never received and no longer buffered; duplicates."""
    got: dict[tuple[str, str], set[int]] = {}
    received = 0
    for line in sub_log.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 4 or not parts[3].isdigit():
            continue
        received += 1
        got.setdefault((parts[1], parts[2]), set()).add(int(parts[3]))
    lost = undrained = 0
    for a in agents:
        seqs, left, rows = pl.read_final(a.state / "buffer.db")
        undrained += rows
        for device, last in seqs.items():
            have = got.get((a.gateway, device), set())
            lost += sum(1 for s in range(1, last + 1) if s not in have and (device, s) not in left)
    unique = sum(len(s) for s in got.values())
    return {
        "received": received,
        "unique": unique,
        "duplicates": received - unique,
        "lost": lost,
        "undrained": undrained,
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def fleet_yaml(public: str, key_id: str) -> str:
    return (
        "fleet:\n  enabled: true\n  clock: trusted\n"
        f"  keys: [{{id: {key_id}, public_key: '{public}', scopes: [read, config]}}]\n"
    )


def run(args: argparse.Namespace) -> int:
    from agent.fleet.keys import generate_key, load_private_key

    sz = QUICK if args.quick else FULL
    if args.agents:
        sz = Sizes(**{**sz.__dict__, "agents": args.agents})
    base = Path(args.workdir) if args.workdir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir=base))
    started = time.monotonic()
    info = [
        *pl.machine_info(work),
        f"agents    : {sz.agents} (gw-001 .. gw-{sz.agents:03d}), one virtual meter each, every 1 s",
    ]
    with contextlib.suppress(Exception):
        import psutil

        vm = psutil.virtual_memory()
        info.append(f"memory    : {vm.total / 2**30:.1f} GiB, {vm.available / 2**30:.1f} GiB available at start")
    info.append("link      : plain MQTT 3.1.1 on loopback, no TLS (no handshake cost on reconnect)")
    info.append(f"reconnect : reconnect_max {RECONNECT_MAX[0] if RECONNECT_MAX else '10s (shipped default)'}")
    print("\n".join(info) + "\n", flush=True)
    pem, public, key_id = generate_key()
    key_path = work / "operator.pem"
    key_path.write_bytes(pem)
    key_path.chmod(0o600)
    key = load_private_key(key_path)
    broker = Broker(work / "broker")
    results: dict[str, Any] = {}
    op: Operator | None = None
    sub: pl.Subscriber | None = None
    try:
        broker.start()
        op = Operator(broker.port)
        sub = pl.Subscriber(work, broker.port, "fleet")
        agents = [Agent(f"gw-{i:03d}", work / "on" / f"gw-{i:03d}") for i in range(1, sz.agents + 1)]
        print(f"== starting {sz.agents} agents with fleet.enabled ({sz.starting} starting at a time)", flush=True)
        results["start_on"] = start_fleet(agents, op, broker.port, fleet_yaml(public, key_id), sz)
        print(f"   all online after {results['start_on']:.1f} s; settling {sz.settle:.0f} s", flush=True)
        time.sleep(sz.settle)
        results["mem_on"] = memory(agents, sz.cpu_window)
        print_memory("on ", results["mem_on"])
        r = Run(sz, work, broker, op, agents, key, key_id, results)
        for name, phase in PHASES:
            print(f"== {name}", flush=True)
            results[name] = phase(r)
            report(name, results[name], sz.agents)
        print("== stopping the agents (SIGTERM), counting events", flush=True)
        results["stop_on"] = stop_all(agents)
        print(f"   agents after SIGTERM: {results['stop_on']}", flush=True)
        pl.wait_quiet(sub.out, 2.0, 20)
        sub.close()
        sub = None
        results["loss"] = losses(agents, work / "sub-fleet.log")
        results["loss"]["problems"] = sum(len(a.problems()) for a in agents)
        report("loss", results["loss"], sz.agents)
        results["connects"] = fl.per_client(broker.log.connects(CLIENT_PREFIX))
        report("per_client", results["connects"], sz.agents)
        off = [Agent(a.gateway, work / "off" / a.gateway) for a in agents]
        print(f"== the same {sz.agents} gateways with the channel off (fresh state, same devices)", flush=True)
        results["start_off"] = start_fleet(off, op, broker.port, "", sz)
        print(f"   all online after {results['start_off']:.1f} s; settling {sz.settle:.0f} s", flush=True)
        time.sleep(sz.settle)
        results["mem_off"] = memory(off, sz.cpu_window)
        print_memory("off", results["mem_off"])
        results["stop_off"] = stop_all(off)
        print(f"   agents after SIGTERM: {results['stop_off']}", flush=True)
    except (RuntimeError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr, flush=True)
        results["error"] = str(exc)
    finally:
        if op is not None:
            op.close()
        if sub is not None:
            sub.close()
        broker.stop()
        broker.log.close()
        pl._kill_children()
        if args.keep or "error" in results:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary(results, sz.agents, info, time.monotonic() - started)
    return 1 if "error" in results else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--agents", type=int, help=f"agent processes (default {FULL.agents}, quick {QUICK.agents})")
    parser.add_argument("--quick", action="store_true", help="20 agents, shorter phases")
    parser.add_argument("--workdir", help="where to put the agents' state and the logs (default: system temp)")
    parser.add_argument(
        "--reconnect-max",
        help="the agents' uplink.mqtt.reconnect_max (default: the shipped 10s); docs/delivery.md: a fleet that must "
        "keep every second of a reconnect under 10 %% sets it higher (20s for 200 gateways)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (agent logs, broker log, buffers)")
    args = parser.parse_args()
    if args.reconnect_max:
        RECONNECT_MAX.append(args.reconnect_max)
    pl.exit_cleanly()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
