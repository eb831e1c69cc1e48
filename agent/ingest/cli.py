"""``edge-agent ingest``: run one worker, create the schema (--init-db), or print the counts (--report).

Exit status: 0 done (a worker stopped by SIGTERM/SIGINT), 1 the database or broker failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from agent.tools.broker_args import add_connection_args

EXIT_RUNTIME = 1
EXIT_USAGE = 2
log = logging.getLogger("agent.ingest")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent ingest",
        description="Reference ingestion of gateway events into PostgreSQL (docs/ingest.md).",
    )
    p.add_argument("--dsn", help="libpq connection string or URI without a password (default: $PGDSN; "
                   "the password comes from ~/.pgpass, $PGPASSFILE or $PGPASSWORD)")  # fmt: skip
    p.add_argument("--init-db", action="store_true", help="create the tables and the gaps view, then exit")
    p.add_argument("--report", action="store_true", help="print rows per table and gap ranges as JSON, then exit")
    p.add_argument("--worker", type=int, default=1, help="this worker's number: its fixed MQTT client id (default 1)")
    p.add_argument("--group", default="ingest", help="shared subscription group (default ingest)")
    p.add_argument("--topic-prefix", default="ioc/v1", help="event topic prefix (default ioc/v1)")
    add_connection_args(p, protocol=False)
    p.add_argument("--batch", type=int, default=500, help="events per transaction, about (default 500)")
    p.add_argument("--batch-ms", type=float, default=50.0, help="ms to wait to fill a transaction (default 50)")
    p.add_argument("--session-expiry", type=int, default=86400,
                   help="seconds the broker keeps this worker's session while it is away (default 1 day)")  # fmt: skip
    p.add_argument("--stats-interval", type=float, default=60.0, help="seconds between log lines of counters")
    return p


def _dsn(args: argparse.Namespace) -> str:
    """The connection string; a password in --dsn is refused (it would show in ps and shell history)."""
    import psycopg.conninfo

    dsn = args.dsn if args.dsn is not None else os.environ.get("PGDSN", "")
    if args.dsn is not None:
        try:
            params = psycopg.conninfo.conninfo_to_dict(args.dsn)
        except psycopg.ProgrammingError as exc:
            raise UsageError(f"--dsn: {exc}") from None
        if params.get("password"):
            raise UsageError("--dsn: holds a password; put it in ~/.pgpass or $PGPASSFILE, or the DSN in $PGDSN")
    return dsn


class UsageError(ValueError):
    pass


def _settings(args: argparse.Namespace, dsn: str) -> Any:
    from agent.ingest.worker import Settings

    checks = [
        (args.worker >= 0, "--worker: 0 or more"),
        (1 <= args.batch <= 10_000, "--batch: 1 to 10000"),
        (0 <= args.batch_ms <= 10_000, "--batch-ms: 0 to 10000"),
        (args.session_expiry >= 0, "--session-expiry: 0 or more"),
        (args.stats_interval > 0, "--stats-interval: more than 0"),
        ("+" not in args.group and "#" not in args.group and "/" not in args.group and args.group != "",
         "--group: a name without + # /"),
        ("+" not in args.topic_prefix and "#" not in args.topic_prefix, "--topic-prefix: no wildcards"),
    ]  # fmt: skip
    for ok, problem in checks:
        if not ok:
            raise UsageError(problem)
    if args.password_file is not None and not args.password_file.is_file():
        raise UsageError(f"--password-file: {args.password_file} is not a readable file")
    return Settings(
        dsn=dsn, worker=args.worker, host=args.host, port=args.port, prefix=args.topic_prefix.rstrip("/"),
        group=args.group, batch=args.batch, batch_window=args.batch_ms / 1000, session_expiry=args.session_expiry,
        stats_interval=args.stats_interval, username=args.username, password_file=args.password_file,
        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file, tls=args.tls,
    )  # fmt: skip


def ingest_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import psycopg
    except ImportError:
        print("edge-agent ingest: needs psycopg 3: pip install 'edge-agent[ingest]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        dsn = _dsn(args)
        settings = None if args.init_db or args.report else _settings(args, dsn)
    except UsageError as exc:
        print(f"edge-agent ingest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.init_db or args.report:
            return _admin(dsn, args.init_db, args.report)
        return _run(settings)
    except psycopg.OperationalError as exc:
        # libpq's message names host, port and user, never the password.
        print(f"edge-agent ingest: database: {str(exc).strip()}", file=sys.stderr)
        return EXIT_RUNTIME


def _admin(dsn: str, init_db: bool, report: bool) -> int:
    import psycopg

    from agent.ingest.schema import init_db as create
    from agent.ingest.store import counts

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        if init_db:
            create(conn)
            print("ingest: schema ready (events, readings, statuses, gateway_status, rejected, conflicts, gaps)")
        if report:
            print(json.dumps(counts(conn)))
    return 0


def _run(settings: Any) -> int:
    from agent.ingest.worker import Worker

    worker = Worker(settings)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("worker %d: %s: finishing the transaction under way", settings.worker, signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
    print(json.dumps(worker.stats()), flush=True)  # the last word: counters and commit latencies
    return 0
