"""Running every check and printing the report: ``edge-agent doctor``'s command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from agent.tools.doctor.access import DEFAULT_USER, ServiceUser, default_user, group_name
from agent.tools.doctor.broker import check_broker
from agent.tools.doctor.buffer import check_buffer
from agent.tools.doctor.clock import check_clock
from agent.tools.doctor.config_checks import check_config, check_files
from agent.tools.doctor.device_files import check_device_files
from agent.tools.doctor.devices import check_devices
from agent.tools.doctor.models import check_models
from agent.tools.doctor.remote_config import check_remote_config
from agent.tools.doctor.report import Row, broken, render, verdict_line
from agent.tools.doctor.running import check_running_agent
from agent.uplinks.mqtt.config import mqtt_settings

DEFAULT_TIMEOUT = 5.0

_NEED_CONFIG = ("files", "device-file", "broker", "buffer", "models", "device")


def _guarded(check: str, run: Callable[[], list[Row]]) -> list[Row]:
    """The check's rows, or one FAIL row if the check itself broke (a bug must not hide the others)."""
    try:
        return run()
    except Exception as exc:
        return [broken(check, exc)]


async def run_checks(config_path: Path, user: ServiceUser, timeout: float) -> list[Row]:
    """Every check, the independent ones concurrently; rows in a fixed order."""
    config, rows = check_config(config_path)
    clock = asyncio.to_thread(_guarded, "clock", lambda: [check_clock(timeout)])
    if config is None:
        skipped = [Row(check, "-", "skip", "not checked: the config is invalid") for check in _NEED_CONFIG]
        return [*rows, *skipped[:3], *await clock, *skipped[3:]]  # the order of a full run
    mqtt = mqtt_settings(config)
    # Its own client id: the agent's, if it is running, would be thrown off the broker.
    client_id = f"{mqtt.client_id or f'edge-agent-{config.gateway.id}'}-doctor"
    rows += _guarded("files", lambda: check_files(config_path, config, user))
    rows += _guarded("device-file", lambda: check_device_files(config, user))
    rows += _guarded("remote-config", lambda: check_remote_config(config, config_path))
    base = config_path.parent.absolute()
    later = await asyncio.gather(
        asyncio.to_thread(_guarded, "broker", lambda: check_broker(mqtt, client_id, timeout)),
        clock,
        asyncio.to_thread(_guarded, "buffer", lambda: check_buffer(config, user)),
        asyncio.to_thread(_guarded, "models", lambda: check_models(config, base)),
        check_devices(config, timeout),
        asyncio.to_thread(_guarded, "agent", lambda: check_running_agent(config, timeout)),
    )
    return rows + [row for group in later for row in group]


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def doctor_main(argv: list[str]) -> int:
    """``edge-agent doctor -c site.yaml [--user NAME] [--json] [--timeout S]``; 1 if anything FAILs."""
    parser = argparse.ArgumentParser(
        prog="edge-agent doctor",
        description="Check a gateway: config, device files, broker, clock, buffer disk, models, devices, and "
        "the running agent's own verdict (with observability.listen).",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="site file")
    parser.add_argument(
        "--user",
        default=None,
        help=f"service user to check access for (default: {DEFAULT_USER} if it exists, else you)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of {check, target, verdict, finding, fix}"
    )
    parser.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, help="seconds per check (default 5)")
    args = parser.parse_args(argv)
    name = args.user or default_user()
    try:
        user = ServiceUser.lookup(name)
    except KeyError:
        print(f"edge-agent doctor: no user {name!r} (--user)", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        # Drivers log what they do; the table says it. Keep errors visible on stderr.
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    rows = asyncio.run(run_checks(args.config, user, args.timeout))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        width = shutil.get_terminal_size((100, 24)).columns
        groups = ", ".join(sorted(group_name(g) for g in user.groups))
        print(f"edge-agent doctor: {args.config}, service user {user.name} (groups: {groups})\n")
        print(render(rows, width))
        print(f"\n{verdict_line(rows)}")
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0
