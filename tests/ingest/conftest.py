"""A private PostgreSQL cluster per test session, a fresh database per test, the schema made by the CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import ROOT, Mosquitto
from tests.ingest.helpers import Publisher
from tests.ingest.postgres import PrivatePostgres

_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PrivatePostgres]:
    # fsync off: the tests kill workers and brokers, never the database.
    pg = PrivatePostgres(durable=False)
    pg.start()
    yield pg
    pg.remove()


@pytest.fixture
def dsn(postgres: PrivatePostgres) -> str:
    """A new, empty database with the schema, made by ``edge-agent ingest --init-db`` (twice: it is idempotent)."""
    name = f"ingest_{next(_names)}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    dsn = f"{postgres.dsn.replace('dbname=postgres', '')}dbname={name}"
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "agent", "ingest", "--dsn", dsn, "--init-db"],
                              cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 0 and "schema ready" in done.stdout, done.stderr
    return dsn


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    p = Publisher(broker.port)
    yield p
    p.close()
