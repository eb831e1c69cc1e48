"""``edge-agent ui info|token|reset``: the technician page's address, a setup token, a new password.

They work on the state folder beside the buffer (agent/ui/state.py), which the running agent
reads at each login: no restart, no connection to the agent needed. Run them as the service
user (or root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config.model import AgentConfigBase

if TYPE_CHECKING:
    from agent.ui.state import UiState

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent ui", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("info", "print the page's URL and its certificate's SHA-256 fingerprint"),
        ("token", "print a new one-time setup token (10 minutes, single use) with its URL and a QR code"),
        ("reset", "set a new random device password and print it (logs everyone out)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", type=Path, required=True, help="site YAML file")
        if name == "token":
            p.add_argument("--no-qr", action="store_true", help="print no QR code")
    return parser


def ui_main(argv: list[str]) -> int:
    """Entry point of ``edge-agent ui``."""
    args = _parser().parse_args(argv)
    from agent.tools.cli import _load

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    if not config.ui.enabled:
        print(f"{args.config}: ui.enabled is false: add `ui: {{enabled: true}}` and restart the agent", file=sys.stderr)
    from agent.ui.bind import BindError, resolve

    try:
        bind = resolve(config.ui)
    except BindError as exc:
        print(f"edge-agent ui: {exc}", file=sys.stderr)
        return EXIT_FAIL
    action = {"info": _info, "token": _token, "reset": _reset}[args.action]
    try:
        return action(config, bind.url, bind.tls, args)
    except OSError as exc:
        print(f"edge-agent ui: cannot use {exc.filename or 'the state folder'}: {exc.strerror or exc}; "
              "run as the service user or root", file=sys.stderr)  # fmt: skip
        return EXIT_FAIL


def _state(config: AgentConfigBase) -> UiState:
    from agent.ui.state import UiState, state_dir

    return UiState(state_dir(config))


def _info(config: AgentConfigBase, url: str, tls: bool, _args: argparse.Namespace) -> int:
    from agent.ui.tls import certificate_paths, fingerprint

    state = _state(config)
    print(f"url: {url}")
    if tls:
        cert, _key = certificate_paths(state.folder)
        if cert.exists():
            print(f"certificate: {cert}")
            print(f"sha256 fingerprint: {fingerprint(cert)}")
            print("  compare it with the one the browser shows before you log in")
        else:
            print("certificate: not made yet (the agent makes it when it first serves the page)")
    else:
        print("transport: HTTP on loopback (reach it through an SSH tunnel, or name a LAN address for HTTPS)")
    print(f"password: {'set' if state.has_password() else 'not set yet: edge-agent ui token gives a setup token'}")
    return EXIT_OK


def _token(config: AgentConfigBase, url: str, _tls: bool, args: argparse.Namespace) -> int:
    state = _state(config)
    token = state.issue_token()
    link = f"{url}#setup={token}"
    print(f"setup token: {token}")
    print(f"open: {link}")
    print("  good once, for 10 minutes; the page then asks for a new device password")
    if not args.no_qr:
        try:
            import segno
        except ImportError:
            print("  (no QR code: the ui extra's segno is not installed)")
        else:
            segno.make(link, error="m").terminal(out=sys.stdout, compact=True)
    return EXIT_OK


def _reset(config: AgentConfigBase, url: str, _tls: bool, _args: argparse.Namespace) -> int:
    state = _state(config)
    password = state.reset_password()
    state.forget_token()
    print(f"new device password: {password}")
    print(f"  log in at {url}; every open session has ended")
    return EXIT_OK
