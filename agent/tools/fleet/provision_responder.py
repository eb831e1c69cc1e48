"""``edge-agent fleet provision-responder``: issue gateway certificates by claim and renewal (docs/fleet.md).

Runs until SIGTERM or SIGINT. Exit status: 0 stopped, 1 the broker could not be reached, 2 the
configuration (a field named) or a file is wrong.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent.tools.broker_args import apply_login
from agent.tools.fleet.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ToolError, close

log = logging.getLogger("agent.fleet.provisioning")


def add_parser(sub: Any, add_broker_args: Any) -> None:
    """The subcommand's options."""
    p = sub.add_parser("provision-responder", help="issue gateway certificates from claims and renewals")
    p.add_argument("--config", type=Path, required=True, help="responder.yaml (allow-list, CA, limits)")
    add_broker_args(p)
    p.set_defaults(func=provision_responder)


def provision_responder(args: argparse.Namespace) -> int:
    """Load the config, write the CRL, answer requests until stopped."""
    from agent.errors import ConfigError
    from agent.fleet.identity.files import too_open
    from agent.fleet.provisioning.ca import Issuer
    from agent.fleet.provisioning.config import load_responder_config
    from agent.fleet.provisioning.decide import Decider
    from agent.fleet.provisioning.ledger import Ledger
    from agent.fleet.provisioning.ratelimit import TokenBucket
    from agent.fleet.provisioning.responder import Responder, audit_every_decision

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    audit_every_decision()
    try:
        config = load_responder_config(args.config)
        for path in (config.ca.key_file, config.state_file):
            problem = too_open(path)
            if problem:
                raise ConfigError([problem])
        issuer = Issuer.load(config.ca.cert_file, config.ca.key_file)
        ledger = Ledger(config.state_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"edge-agent fleet provision-responder: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"edge-agent fleet provision-responder: {exc}", file=sys.stderr)
        return EXIT_USAGE
    decider = Decider(config, issuer, ledger, TokenBucket(config.rate_limit))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        client = _client(args)
    except ToolError as exc:
        print(f"edge-agent fleet provision-responder: {exc}", file=sys.stderr)
        return exc.code
    responder = Responder(decider, client, v5=args.protocol == "5")  # sets the callbacks: before connecting
    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as exc:
        print(f"edge-agent fleet provision-responder: cannot reach the broker {args.host}:{args.port}: {exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    client.loop_start()
    try:
        while not stop.is_set():
            if config.crl_file is not None:
                from agent.fleet.provisioning.crl import write_crl

                write_crl(config.crl_file, issuer, decider.revoked(), config.crl_days)
                log.info("CRL written to %s (%d revoked)", config.crl_file, len(decider.revoked()))
            stop.wait(config.crl_days * 86400 / 2)
    finally:
        close(client)
        log.info("provisioning responder stopped: %s", _counts(responder.counts))
    return EXIT_OK


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no requests"


def _client(args: argparse.Namespace) -> Any:
    """A paho client with the operator's login, not connected yet (paho reconnects it by itself)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    v5 = args.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="edge-agent-provisioner",
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    )
    client.reconnect_delay_set(1, 30)
    try:
        apply_login(client, args)
    except ValueError as exc:
        raise ToolError(str(exc), EXIT_USAGE) from exc
    return client
