"""Technician commands: ``edge-agent scan lorawan`` and ``edge-agent simulate lorawan``."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from drivers.lorawan.config import LorawanConfig
from drivers.lorawan.connection import Connection, Unknown
from drivers.lorawan.simulator import DEFAULT_APPLICATION, Scenario, ledger_json, parse_devices, publish


def scan_main(argv: list[str]) -> int:
    """List the DevEUIs the network server reports that no device in the config claims."""
    parser = argparse.ArgumentParser(prog="edge-agent scan lorawan", description=scan_main.__doc__)
    parser.add_argument("-c", "--config", type=Path, required=True, help="site file (its lorawan devices' servers)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to listen (default 60)")
    args = parser.parse_args(argv)
    from agent.config.model import load_config
    from agent.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("error: the config does not load:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return 2
    devices = [d for d in config.devices if isinstance(d, LorawanConfig)]
    if not devices:
        print(f"error: {args.config} has no lorawan device (scan listens on their network servers)", file=sys.stderr)
        return 2
    try:
        found = asyncio.run(_listen(devices, args.seconds))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not found:
        print(f"no unconfigured DevEUI heard in {args.seconds:g} s", file=sys.stderr)
        return 0
    from drivers.lorawan.codecs import guess_codec

    print(f"{'DEVEUI':<16}  {'NAME':<24}  {'LAST SEEN (UTC)':<19}  {'UPLINKS':>7}  CODEC (guessed)")
    for entry in sorted(found, key=lambda e: e.dev_eui):
        guess = guess_codec(entry.profile or entry.name or "") or "?"
        seen = entry.last_seen.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{entry.dev_eui:<16}  {(entry.name or '-')[:24]:<24}  {seen:<19}  {entry.uplinks:>7}  {guess}")
    return 0


async def _listen(devices: list[LorawanConfig], seconds: float) -> list[Unknown]:
    configured = {d.dev_eui for d in devices}
    connections: dict[str, Connection] = {}
    for d in devices:
        key = d.connection_key()
        if key not in connections:
            # Its own client id and a clean session: the agent's session (and its queued uplinks) stays untouched.
            connections[key] = Connection(d.network_server, d.application, f"edge-agent-scan-{secrets.token_hex(4)}",
                                          key, grace=0.0)  # fmt: skip
            connections[key].persistent = False
    try:
        for connection in connections.values():
            await connection.open()
        await asyncio.sleep(seconds)
    finally:
        for connection in connections.values():
            connection.close()
    return [u for c in connections.values() for u in c.unknown.values() if u.dev_eui not in configured]


def simulate_main(argv: list[str]) -> int:
    """Publish what a network server's MQTT integration would, for a fleet of made-up devices; print a ledger."""
    parser = argparse.ArgumentParser(prog="edge-agent simulate lorawan", description=simulate_main.__doc__)
    parser.add_argument("--ns", choices=("chirpstack", "tts"), required=True, help="which network server to imitate")
    parser.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker")
    parser.add_argument("--devices", required=True, help="codec:count,..., e.g. nwave-nps405:20,bosch-tps110:5")
    parser.add_argument("--application", help="application id (chirpstack: a UUID; tts: app@tenant)")
    parser.add_argument("--uplinks", type=int, default=10, help="uplinks per device (default 10)")
    parser.add_argument("--gateways", type=int, default=3, help="most gateways hearing one uplink (default 3)")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second; 0: as fast as possible")
    parser.add_argument("--seed", type=int, default=1, help="same seed and round: the same messages again")
    parser.add_argument("--round", type=int, default=0, help="later rounds carry on the frame counters")
    parser.add_argument("--join", action="store_true", help="join first (always in round 0): f_cnt restarts")
    parser.add_argument("--clean", action="store_true", help="no faults: no duplicates, gaps, bad payloads, strays")
    parser.add_argument("--ledger", type=Path, help="also write the ledger (JSON) to this file")
    parser.add_argument("--print-config", action="store_true", help="print the devices as site-file YAML and exit")
    args = parser.parse_args(argv)
    try:
        devices = parse_devices(args.devices)
        host, _, port = args.broker.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--broker: {args.broker!r}: give HOST:PORT")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    application = args.application or DEFAULT_APPLICATION[args.ns]
    scenario = Scenario(args.ns, application, devices, uplinks=args.uplinks, gateways=args.gateways, seed=args.seed,
                        round_=args.round, join=args.join or args.round == 0, faults=not args.clean)  # fmt: skip
    if args.print_config:
        print(_site_devices(scenario, args.broker))
        return 0
    started = datetime.now(UTC)
    try:
        publish(scenario, host, int(port), args.rate)
    except OSError as exc:
        print(f"error: cannot publish to {args.broker}: {exc}", file=sys.stderr)
        return 1
    ledger = ledger_json(scenario)
    ledger["started"] = started.isoformat()
    text = json.dumps(ledger, indent=1)
    if args.ledger:
        args.ledger.write_text(text)
    print(text)
    return 0


def _site_devices(scenario: Scenario, broker: str) -> str:
    lines = ["devices:"]
    for sent in scenario.ledger:
        lines.append(f"  - {{id: {sent.id}, driver: lorawan, dev_eui: '{sent.dev_eui}', codec: {sent.codec}, "
                     f"application: '{scenario.application}', network_server: {{type: {scenario.server}, "
                     f"broker: '{broker}'}}" + (f", bay: bay-{sent.id}" if sent.codec != "milesight-em300-th" else "")
                     + "}")  # fmt: skip
    return "\n".join(lines)
