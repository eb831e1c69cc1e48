"""The health window after an apply: the main uplink connected, devices online before still online
(and the new ones too, if the document asks), the agent not stopping."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from agent.config.model import AgentConfigBase
from agent.fleet.desired.document import Desired, Problem

if TYPE_CHECKING:
    from agent.runtime.agent import Agent

CHECK_INTERVAL = 1.0  # seconds between looks at the agent


class Stopped(Exception):
    """The agent is stopping: the window is left unfinished (the next start rolls back)."""


def online(agent: Agent) -> frozenset[str]:
    """The devices online now."""
    return frozenset(d for d, status in agent.devices.statuses().items() if status == "online")


async def watch(
    agent: Agent, desired: Desired, old: AgentConfigBase, new: AgentConfigBase, before: frozenset[str]
) -> list[Problem]:
    """Wait out the window; what is unhealthy at its end (empty: healthy).

    Raises:
        Stopped: the agent began to stop during the window.
    """
    deadline = time.monotonic() + desired.health_window
    while time.monotonic() < deadline:
        if agent.stopping:
            raise Stopped
        await asyncio.sleep(min(CHECK_INTERVAL, max(0.0, deadline - time.monotonic())))
    if agent.stopping:
        raise Stopped
    return _problems(agent, desired, old, new, before)


def _problems(
    agent: Agent, desired: Desired, old: AgentConfigBase, new: AgentConfigBase, before: frozenset[str]
) -> list[Problem]:
    problems = []
    main = agent.uplinks.main
    if not main.uplink.status.connected:
        where = f"sections.uplink.{main.name}" if "uplink" in desired.sections else f"uplink.{main.name}"
        why = main.uplink.status.last_error or "never connected"
        problems.append(Problem(where, "unhealthy", f"uplink {main.name} not connected at the window's end ({why})"))
    statuses = agent.devices.statuses()
    known = {d.id for d in old.devices}
    where = "sections.devices" if "devices" in desired.sections else "devices"
    for index, device in enumerate(new.devices):
        if not device.enabled:
            continue
        expected = device.id in before or (desired.require_new_devices and device.id not in known)
        status = statuses.get(device.id, "not running")
        if expected and status != "online":
            was = "was online before" if device.id in before else "new in this version"
            problems.append(
                Problem(f"{where}[{index}]", "unhealthy", f"device {device.id} is {status} at the window's end ({was})")
            )
    return problems


def reason_of(problems: list[Problem]) -> str:
    """One line for the report."""
    uplink = any(p.message.startswith("uplink") for p in problems)
    devices = sum(1 for p in problems if p.message.startswith("device"))
    parts = (["uplink did not connect within the health window"] if uplink else []) + (
        [f"{devices} device(s) not online at the end of the health window"] if devices else []
    )
    return "; ".join(parts) or "unhealthy at the end of the health window"
