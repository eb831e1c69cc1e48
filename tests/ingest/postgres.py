"""A private PostgreSQL cluster from Debian's ``postgresql`` package: initdb into a temporary folder, its own port.

Used by tests/ingest and bench/ingest.py. initdb and postgres refuse to run as root, so as root
they run as the ``postgres`` user the Debian package creates (``nobody`` if it is missing), as
the child process itself (so a signal reaches postgres, not a wrapper), in a folder under /tmp
owned by that user (the tests' own tmp_path is not reachable for it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[4]))
    if not found:
        raise RuntimeError(f"no {name} in /usr/lib/postgresql/*/bin: apt-get install postgresql (./dev test does)")
    return str(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """``start()`` it, connect with :attr:`dsn` (user postgres, trust on loopback only), ``stop()`` it."""

    def __init__(self, port: int | None = None, *, durable: bool = True) -> None:
        self.port = port or _free_port()
        self.durable = durable  # False: fsync off, for tests that kill workers, never the database
        self.folder = Path(tempfile.mkdtemp(prefix="edge-agent-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, object] = {"cwd": self.folder}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
            self._as.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        os.chmod(self.folder, 0o700)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def init(self) -> None:
        subprocess.run(
            [_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **self._as,  # type: ignore[call-overload]
        )  # fmt: skip

    def start(self) -> None:
        if not self.data.exists():
            self.init()
        options = [] if self.durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.folder), "-h", "127.0.0.1", "-c", "max_connections=50", *options],
                stdout=log, stderr=subprocess.STDOUT, **self._as,  # type: ignore[call-overload]
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                if self._ready():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections in 30 s: {self.log.read_text()[-2000:]}")

    def _ready(self) -> bool:
        done = subprocess.run(
            [_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        return done.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT: running transactions are rolled back)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
