"""``edge-agent``: the command line a technician and a fleet's tooling use."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from agent.config.model import AgentConfigBase

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
EXIT_USAGE = 2
_CORE_COMMANDS = {"validate", "run", "schema", "drivers", "demo", "doctor", "fleet", "bundle", "ingest", "watch", "ui"}


def _setup_logging(verbose: bool) -> None:
    """Text on a terminal, JSON lines on the journal or with EDGE_AGENT_LOG_FORMAT=json (see observability/logs.py)."""
    from agent.observability.logs import setup_logging

    setup_logging(verbose, stream=sys.stderr)


def _load(path: Path, refusal: str = "") -> AgentConfigBase | None:
    """The validated config, or None after printing every problem to stderr."""
    from agent.config.model import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {refusal}{len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _cmd_validate(args: argparse.Namespace) -> int:
    from agent.config.model import config_warnings

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    warnings = config_warnings(config)
    print(f"ok: {args.config} (gateway {config.gateway.id}, {len(config.devices)} devices)", end="")
    print(f", {len(warnings)} warning(s):" if warnings else "")
    for warning in warnings:
        print(f"  warning: {warning}")
    _print_remote(config, args.config)
    print(f"next: edge-agent run -c {args.config}   (or, installed: sudo systemctl restart edge-agent)")
    return 0


def _print_remote(config: AgentConfigBase, path: Path) -> None:
    """With the fleet channel on: each section's origin and version (the state directory's remote config)."""
    if not config.fleet.enabled:
        return
    from agent.fleet.desired.inspect import inspect

    view = inspect(config, path)
    if view is None:
        return
    if view.unreadable is not None:
        print(f"remote config: {view.unreadable} (run as the service user or root to see it)")
        return
    if view.version == 0:
        print("remote config: none applied; every section is the local file's")
    else:
        effective = f", {view.devices} devices" if view.devices is not None else ""
        print(f"remote config: version {view.version} ({view.hash}) from {view.folder}{effective}")
    for line in view.origins():
        print(f"  {line}")
    if view.pending is not None:
        print(
            f"  warning: version {view.pending} was being applied when the agent stopped: the next start rolls it back"
        )
    for problem in view.problems:
        print(
            f"  warning: the remote config no longer validates over this file (the agent would run it alone): {problem}"
        )


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.events is None:
        from agent.config.model import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    from agent.contract import schema_files

    try:
        shown = schema_files.load_all() if args.events == "" else schema_files.load(args.events)
    except schema_files.UnknownSchema as exc:
        print(f"edge-agent schema: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"edge-agent schema: this installation lacks its schema files ({exc}); reinstall it", file=sys.stderr)
        return EXIT_RUNTIME
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


def _cmd_drivers(_args: argparse.Namespace) -> int:
    from agent.devices.registry import load_plugins

    for name, plugin in sorted(load_plugins().items()):
        print(f"{name:<12} {plugin.summary}")
        if plugin.tools is not None:
            verbs = [f"edge-agent {v}" if v in plugin.global_verbs else f"edge-agent {v} {name}"
                     for v in plugin.tools()]  # fmt: skip
            print(f"{'':<12} tools: {', '.join(verbs)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.devices.runner import DeviceFailedError
    from agent.runtime.agent import run_agent

    config = _load(args.config, "refusing to start, ")
    if config is None:
        return EXIT_CONFIG
    from agent.config.model import config_warnings

    for warning in config_warnings(config):
        logging.getLogger("agent").warning("%s: %s", args.config, warning)
    try:
        asyncio.run(run_agent(config, config_path=args.config))
    except DeviceFailedError:
        return EXIT_RUNTIME  # already logged by the runtime
    except (AgentError, OSError, sqlite3.Error) as exc:
        # e.g. the buffer's folder is not writable, or the file is from a newer agent.
        logging.getLogger("agent").error("cannot run: %s", exc)
        return EXIT_RUNTIME
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.tools.demo import run_demo

    return asyncio.run(run_demo(duration=args.duration, outage=not args.no_outage))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from agent.tools.doctor import doctor_main

    return doctor_main(list(args.args))


def _cmd_watch(args: argparse.Namespace) -> int:
    from agent.tools.watch.run import watch

    return watch(args)


def _tool_verbs() -> dict[str, list[str]]:
    """Technician verbs the installed drivers offer: verb -> drivers offering it."""
    from agent.devices.registry import load_plugins

    verbs: dict[str, list[str]] = {}
    for name, plugin in sorted(load_plugins().items()):
        if plugin.tools is not None:
            try:
                offered = plugin.tools()
            except Exception as exc:  # a broken or partly installed driver must not break the CLI
                logging.getLogger("agent").warning("driver %s offers no tools: %s", name, exc)
                continue
            for verb in offered:
                verbs.setdefault(verb, []).append(name)
    return verbs


def _run_tool(argv: list[str]) -> int | None:
    """Run ``edge-agent <verb> <driver> ...`` (or a global verb) if a driver offers it."""
    from agent.devices.registry import load_plugins

    if not argv or argv[0].startswith("-") or argv[0] in _CORE_COMMANDS:
        return None
    verb, rest = argv[0], argv[1:]
    plugins = load_plugins()
    for plugin in plugins.values():
        if verb in plugin.global_verbs and plugin.tools is not None:
            return plugin.tools()[verb](rest)
    verbs = _tool_verbs()
    if verb not in verbs:
        return None
    if not rest or rest[0] not in verbs[verb]:
        print(f"usage: edge-agent {verb} {{{','.join(verbs[verb])}}} ...", file=sys.stderr)
        return EXIT_USAGE
    return plugins[rest[0]].tools()[verb](rest[1:])  # type: ignore[misc]


# Commissioning verbs first, in the order a technician uses them.
_VERB_HELP = {
    "scan": "find the units on a bus, name their profiles, add them to a site file (--add-to)",
    "read": "one typed read of a device's registers",
    "simulate": "serve a device on TCP or a pseudo-terminal, to rehearse without it",
    "profiles": "list the device profiles (register maps)",
}


def _tools_help() -> str:
    """The driver tools, one per line, as ``edge-agent <verb> {drivers}`` with what each does."""
    verbs = _tool_verbs()
    order = [v for v in _VERB_HELP if v in verbs] + sorted(v for v in verbs if v not in _VERB_HELP)
    lines = [(f"  {v} {{{','.join(verbs[v])}}}".ljust(33) + " " + _VERB_HELP.get(v, "")).rstrip() for v in order]
    return "driver tools (edge-agent <tool> <driver> --help):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=__doc__,
        epilog=_tools_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a site config; prints ok or every problem (exit 2)")
    p.add_argument("-c", "--config", type=Path, required=True, help="site YAML file")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run the agent (SIGTERM/SIGINT stop, SIGHUP reloads)")
    p.add_argument("-c", "--config", type=Path, required=True, help="site YAML file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("schema", help="print the JSON Schema of the site config, or with --events the events'")
    p.add_argument("--events", nargs="?", const="", metavar="TYPE",
                   help="the events' schemas instead: all keyed by name, or one (a type, envelope, batch)")  # fmt: skip
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("drivers", help="list installed drivers")
    p.set_defaults(func=_cmd_drivers)

    p = sub.add_parser("doctor", help="check config, devices, broker, TLS, clock, disk, models (exit 1 if red)",
                       add_help=False)  # fmt: skip
    p.add_argument("args", nargs=argparse.REMAINDER, help="see edge-agent doctor --help")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("fleet", help="operator side: keygen, cmd (signed commands through the broker)",
                       add_help=False)  # fmt: skip
    p.add_argument("args", nargs=argparse.REMAINDER, help="see edge-agent fleet --help")
    p = sub.add_parser("bundle", help="update bundles: build, sign, inspect, apply", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="see edge-agent bundle --help")

    p = sub.add_parser("ui", help="technician page: info (URL, fingerprint), token (setup), reset (password)",
                       add_help=False)  # fmt: skip
    p.add_argument("args", nargs=argparse.REMAINDER, help="see edge-agent ui --help")

    p = sub.add_parser("ingest", help="IOC side: events into PostgreSQL (the ingest extra)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="see edge-agent ingest --help")

    from agent.tools.watch.options import add_arguments as add_watch_arguments

    p = sub.add_parser("watch", help="conformance watcher: check every event of a gateway (or all), report (exit 1)")
    add_watch_arguments(p)
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("demo", help="simulated devices -> agent -> embedded broker, with a live view")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run (0: until Ctrl-C)")
    p.add_argument("--no-outage", action="store_true", help="do not simulate a broker outage")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` command."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    tool_argv = argv[1:] if verbose else argv
    if tool_argv and tool_argv[0] == "doctor":  # it parses its own arguments
        from agent.tools.doctor import doctor_main

        _setup_logging(verbose)
        return doctor_main(tool_argv[1:])
    if tool_argv and tool_argv[0] == "fleet":  # so does the operator's fleet command
        from agent.tools.fleet import fleet_main

        _setup_logging(verbose)
        return fleet_main(tool_argv[1:])
    if tool_argv and tool_argv[0] == "bundle":  # update bundles (agent/tools/bundle.py)
        from agent.tools.bundle import bundle_main

        _setup_logging(verbose)
        return bundle_main(tool_argv[1:])
    if tool_argv and tool_argv[0] == "ui":  # the technician page's access (agent/tools/ui_cli.py)
        from agent.tools.ui_cli import ui_main

        return ui_main(tool_argv[1:])
    if tool_argv and tool_argv[0] == "ingest":  # and the IOC's ingestion (agent/ingest, not the runtime's)
        from agent.ingest.cli import ingest_main

        _setup_logging(verbose)
        return ingest_main(tool_argv[1:])
    if tool_argv and tool_argv[0] not in _CORE_COMMANDS and not tool_argv[0].startswith("-"):
        _setup_logging(verbose)
        try:
            code = _run_tool(tool_argv)
        except KeyboardInterrupt:
            return 130
        if code is not None:
            return code
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
