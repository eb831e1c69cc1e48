"""``doctor`` from inside the running agent: its rows as JSON, from live state, within a deadline.

``edge-agent doctor`` (agent/tools/doctor) checks a gateway from outside: it opens its own
broker connection, probes devices and reads the buffer file. Inside the agent the live state
already answers most of that, so these rows read it instead (the core may not import the
tools, and a second broker session or a device probe from inside the agent would compete
with the agent's own): the site file (running and on disk), the clock, the buffer and its
disk, each durable uplink's connection, the devices' status and the agent's own stall and
readiness verdicts. Each row is ``{check, target, status, detail, fix}``, status ``ok``,
``warn`` or ``fail``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.model import AgentConfigBase, config_warnings, load_config
from agent.errors import ConfigError
from agent.observability.clock import kernel_clock_sync
from agent.observability.metrics import disk_space

if TYPE_CHECKING:
    from agent.runtime.agent import Agent

DEADLINE = 5.0  # seconds for every check together; a check still running then is a fail row
MIN_FREE_BYTES = 16 * 1024 * 1024  # as edge-agent doctor: below this the buffer cannot work
NEARLY_FULL = 0.8  # of buffer.max_bytes
EARLIEST_YEAR = 2024  # a clock before this is certainly wrong
DEVICE_ROWS = 50  # devices not online listed one per row at most; the rest are counted
Row = dict[str, Any]


def row(check: str, target: str, status: str, detail: str, fix: str | None = None) -> Row:
    """One finding; ``fix`` only where something is not ok."""
    out: Row = {"check": check, "target": target, "status": status, "detail": detail}
    if fix is not None:
        out["fix"] = fix
    return out


async def doctor_rows(agent: Agent, deadline: float = DEADLINE) -> list[Row]:
    """Every check, concurrently, in a fixed order; a check that breaks or overruns is a fail row."""
    checks: list[tuple[str, Callable[[], Awaitable[list[Row]]]]] = [
        ("config", lambda: asyncio.to_thread(config_rows, agent.config, agent.config_path)),
        ("clock", lambda: asyncio.to_thread(clock_rows)),
        ("buffer", lambda: buffer_rows(agent)),
        ("uplink", lambda: _call(lambda: uplink_rows(agent))),
        ("devices", lambda: _call(lambda: device_rows(agent.devices.statuses(), agent.devices.reasons()))),
        ("agent", lambda: _call(lambda: agent_rows(agent))),
    ]
    tasks = [asyncio.ensure_future(run()) for _, run in checks]
    await asyncio.wait(tasks, timeout=deadline)
    rows: list[Row] = []
    for (name, _), task in zip(checks, tasks, strict=True):
        if not task.done():
            task.cancel()  # a thread behind it finishes on its own; its answer is dropped
            rows.append(
                row(name, "-", "fail", f"did not finish within {deadline:g} s", "run edge-agent doctor on the gateway")
            )
        elif task.exception() is not None:
            exc = task.exception()
            rows.append(row(name, "-", "fail", f"the check itself failed: {type(exc).__name__}: {exc}"))
        else:
            rows += task.result()
    return rows


async def _call(check: Callable[[], list[Row]]) -> list[Row]:
    """A check that only reads attributes: on the loop, inside the task (so its failure is a row)."""
    return check()


def config_rows(config: AgentConfigBase, path: Path | None) -> list[Row]:
    """The running config, its warnings, and whether the file on disk still matches it."""
    enabled = sum(d.enabled for d in config.devices)
    rows = [
        row(
            "config", "running", "ok", f"gateway {config.gateway.id}, {len(config.devices)} devices ({enabled} enabled)"
        )
    ]
    for warning in config_warnings(config):
        field, _, text = warning.partition(": ")
        problem, _, fix = text.rpartition("; ")
        rows.append(row("config", field, "warn", problem or text, fix if problem else None))
    if path is None:
        return rows
    try:
        on_disk = load_config(path)
    except ConfigError as exc:
        first = exc.problems[0] if exc.problems else "invalid"
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        rows.append(
            row(
                "config",
                str(path),
                "warn",
                f"the file on disk is invalid: {first}{more}; a reload would be "
                "refused (the agent keeps the running config)",
                f"correct it: edge-agent validate -c {path}",
            )
        )
        return rows
    if on_disk != config:
        rows.append(
            row(
                "config",
                str(path),
                "warn",
                "the file on disk differs from the running config",
                "apply it: systemctl reload edge-agent (SIGHUP)",
            )
        )
    else:
        rows.append(row("config", str(path), "ok", "the file on disk is the running config"))
    return rows


def clock_rows(now: datetime | None = None) -> list[Row]:
    """Plausible, and synchronised as the kernel sees it (NTP)."""
    now = now or datetime.now(UTC)
    shown = now.strftime("%Y-%m-%d %H:%M:%S UTC")
    enable = "enable network time (timedatectl set-ntp true, or chrony) and let the gateway reach an NTP server"
    if now.year < EARLIEST_YEAR:
        return [
            row("clock", "system clock", "fail", f"clock says {shown}: obviously wrong", f"set the time, then {enable}")
        ]
    synced = kernel_clock_sync()
    if synced is None:
        return [
            row(
                "clock",
                "system clock",
                "warn",
                f"{shown}; the kernel does not say whether it is synchronised",
                f"check the time source by hand (chronyc tracking); {enable}",
            )
        ]
    if not synced[0]:
        return [row("clock", "system clock", "warn", f"{shown}, not synchronised ({synced[1]})", enable)]
    return [row("clock", "system clock", "ok", f"{shown}, synchronised ({synced[1]})")]


async def buffer_rows(agent: Agent) -> list[Row]:
    """Each feed's fill and last commit (the status model's figures), and the buffer volume's room."""
    rows: list[Row] = []
    stats = await agent.status.refresh()
    for name, feed in agent.store.feeds.items():
        figures = stats[name]
        fill = f"{figures.rows} events, {_size(figures.bytes)} of {_size(figures.max_bytes)}"
        if figures.oldest_created:
            fill += f", oldest {time.time() - figures.oldest_created:.0f} s old"
        if not feed.last_commit_ok:
            rows.append(
                row(
                    "buffer",
                    name,
                    "fail",
                    f"the last commit failed: {feed.last_commit_error}",
                    "free space on the buffer's volume; see the agent's log",
                )
            )
        elif figures.max_bytes and figures.bytes > NEARLY_FULL * figures.max_bytes:
            rows.append(
                row(
                    "buffer",
                    name,
                    "warn",
                    f"{fill}: nearly full, the oldest events will be dropped",
                    "get the uplink delivering (uplink rows), or raise buffer.max_bytes",
                )
            )
        else:
            rows.append(row("buffer", name, "ok", fill))
    folder = agent.config.buffer.path.parent
    free, _total = await asyncio.to_thread(disk_space, folder)
    if free is None:
        rows.append(row("disk", str(folder), "warn", "cannot read the free space of the buffer's volume"))
    elif free < MIN_FREE_BYTES:
        rows.append(
            row("disk", str(folder), "fail", f"{_size(free)} free", "free space (journalctl --vacuum-size, old logs)")
        )
    else:
        rows.append(row("disk", str(folder), "ok", f"{_size(free)} free"))
    return rows


def uplink_rows(agent: Agent) -> list[Row]:
    """Each durable uplink: connected, or down with its last error."""
    rows = []
    for name, runner in agent.uplinks.durable.items():
        status = runner.uplink.status
        if status.connected:
            rows.append(
                row("uplink", name, "ok", f"connected ({status.connects} connects, {status.published} published)")
            )
        else:
            rows.append(
                row(
                    "uplink",
                    name,
                    "fail",
                    f"down: {status.last_error or 'not connected yet'}",
                    "check the broker's address, credentials and the network; edge-agent doctor -c on the "
                    "gateway tests the connection step by step",
                )
            )
    return rows


def device_rows(statuses: dict[str, str], reasons: dict[str, str | None]) -> list[Row]:
    """One summary row, and one row per device not online (at most ``DEVICE_ROWS``)."""
    online = sum(s == "online" for s in statuses.values())
    summary = f"{online} of {len(statuses)} running devices online"
    rows = [row("devices", "all", "ok" if online == len(statuses) else "warn", summary)]
    others = sorted(d for d, s in statuses.items() if s != "online")
    for device in others[:DEVICE_ROWS]:
        state = statuses[device]
        reason = reasons.get(device)
        detail = state + (f": {reason}" if reason else "")
        status = "warn" if state == "starting" else "fail"
        rows.append(row("devices", device, status, detail, f"check the device and its wiring; restart device={device}"))
    if len(others) > DEVICE_ROWS:
        rows.append(row("devices", "more", "fail", f"{len(others) - DEVICE_ROWS} more devices not online"))
    return rows


def agent_rows(agent: Agent) -> list[Row]:
    """The agent's own verdicts: stalls (/healthz) and readiness (/readyz)."""
    live, details = agent.liveness.liveness()
    if not live:
        stalls = "; ".join(f"{part}: {why}" for part, why in details["stalls"].items())
        return [row("agent", "liveness", "fail", f"stuck: {stalls}", "systemctl restart edge-agent; report the log")]
    ready, why = agent.liveness.readiness()
    if not ready:
        failing = ", ".join(name for name, ok in why["checks"].items() if not ok)
        return [row("agent", "readiness", "warn", f"not ready: {failing}", "see the buffer and uplink rows")]
    return [row("agent", "liveness", "ok", f"running, nothing stuck, up {details['uptime_s']} s")]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
