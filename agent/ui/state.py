"""The page's secrets on disk: the one-time setup token and the device password (folder 0700, files 0600).

Both live in ``<buffer folder>/ui/`` so that ``edge-agent ui token`` and ``ui reset``, run
beside the agent as the service user, change what the running agent checks without talking
to it: the agent reads the files at each login. Only hashes are stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config.model import AgentConfigBase

TOKEN_SECONDS = 600.0  # a setup token is good for 10 minutes
TOKEN_BYTES = 24  # 192 bits
PASSWORD_MIN = 10  # characters of a password the technician chooses
RESET_BYTES = 15  # a reset password: 20 characters, 120 bits
# scrypt at n=2**14, r=8: 16 MiB and about 50 ms a check on a small board; RFC 7914's interactive figure.
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
TOKEN_FILE = "setup-token.json"  # noqa: S105 - a file name
PASSWORD_FILE = "password.json"  # noqa: S105 - a file name


def state_dir(config: AgentConfigBase) -> Path:
    """The page's folder, beside the buffer."""
    return Path(config.buffer.path).parent / "ui"


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` whole (0600) through a temporary file, so a reader never sees half of it."""
    _private_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if os.geteuid() == 0:
        # `edge-agent ui token` run as root beside an agent running as its service user: the
        # agent must still read the file, so it belongs to whoever owns the folder.
        folder = path.parent.stat()
        os.chown(tmp, folder.st_uid, folder.st_gid)
    os.replace(tmp, path)


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float, str)) else 0.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenCheck:
    """The outcome of presenting a setup token: ``ok``, ``missing`` (none given), ``refused`` (wrong,
    used or expired)."""

    outcome: str


class UiState:
    """The setup token and password files of one gateway."""

    def __init__(self, folder: Path) -> None:
        """Nothing is read or written until asked."""
        self.folder = folder

    # ---- the setup token --------------------------------------------------------------
    def issue_token(self, now: float | None = None) -> str:
        """A new one-time setup token (the previous one stops working); only its hash is kept."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        moment = time.time() if now is None else now
        record = {"sha256": _digest(token), "expires": moment + TOKEN_SECONDS}
        write_private(self.folder / TOKEN_FILE, json.dumps(record).encode())
        return token

    def token_pending(self, now: float | None = None) -> bool:
        """Whether an unused, unexpired setup token exists."""
        record = self._token_record()
        return record is not None and _number(record.get("expires")) > (time.time() if now is None else now)

    def take_token(self, token: str, now: float | None = None) -> TokenCheck:
        """Use up ``token`` if it is the current one and unexpired."""
        if not token:
            return TokenCheck("missing")
        record = self._token_record()
        if record is None or not hmac.compare_digest(str(record.get("sha256", "")), _digest(token)):
            return TokenCheck("refused")
        # Removed before the answer: a token is good once, even under two racing requests.
        try:
            os.unlink(self.folder / TOKEN_FILE)
        except FileNotFoundError:
            return TokenCheck("refused")
        if _number(record.get("expires")) <= (time.time() if now is None else now):
            return TokenCheck("refused")
        return TokenCheck("ok")

    def _token_record(self) -> dict[str, object] | None:
        try:
            value = json.loads((self.folder / TOKEN_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    # ---- the password -----------------------------------------------------------------
    def has_password(self) -> bool:
        """Whether a password has been set."""
        return self._password_record() is not None

    def set_password(self, password: str) -> str:
        """Store ``password`` (scrypt, a random salt); returns its stamp, which changes with every password."""
        salt = secrets.token_bytes(16)
        digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
        stamp = secrets.token_hex(8)
        record = {"scrypt": SCRYPT, "salt": salt.hex(), "hash": digest.hex(), "stamp": stamp}
        write_private(self.folder / PASSWORD_FILE, json.dumps(record).encode())
        return stamp

    def reset_password(self) -> str:
        """A new random password, stored and returned (to be printed once)."""
        password = secrets.token_urlsafe(RESET_BYTES)
        self.set_password(password)
        return password

    def check_password(self, password: str) -> str | None:
        """The password's stamp if ``password`` is right, else None."""
        record = self._password_record()
        if record is None:
            return None
        params, salt = record.get("scrypt"), record.get("salt")
        if not isinstance(params, dict) or not isinstance(salt, str):
            return None
        try:
            digest = hashlib.scrypt(
                password.encode(), salt=bytes.fromhex(salt), dklen=32,
                n=int(params["n"]), r=int(params["r"]), p=int(params["p"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None
        return str(record["stamp"]) if hmac.compare_digest(digest.hex(), str(record["hash"])) else None

    def password_stamp(self) -> str | None:
        """The current password's stamp: a session of an older password is over."""
        record = self._password_record()
        return str(record.get("stamp")) if record is not None else None

    def _password_record(self) -> dict[str, object] | None:
        try:
            value = json.loads((self.folder / PASSWORD_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) and "hash" in value else None

    def forget_token(self) -> None:
        """Remove any pending setup token."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / TOKEN_FILE)
