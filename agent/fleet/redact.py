"""What leaves the gateway in a diagnostics bundle carries no secret.

Three layers: the config is dumped with every secret-named value replaced (paths of secret
files stay: they say where to look, not what is there); every text is passed through the log
redactor (agent/observability/logs.py: the registered secret values, PEM private keys,
``password=...`` pairs, URL passwords); and the values the config's secret hooks name (each
uplink's ``secrets()``, the contents of every password, users and key file of
``secret_files``) are removed wherever they appear.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from agent.config.model import AgentConfigBase, secret_files
from agent.observability.logs import MIN_SECRET_LENGTH, REDACTED, REDACTOR, Redactor

SECRET_NAME = re.compile(r"(?i)pass(word|wd|phrase)?|secret|token|api[_-]?key|private|credential")
MAX_SECRET_FILE = 64 * 1024  # bytes read of a secret file to learn its values (keys, users files)


class Scrubber:
    """Removes one config's secrets (and everything the log redactor removes) from text."""

    def __init__(self, config: AgentConfigBase) -> None:
        """Read the secret values now: from the uplinks' hooks and the secret files' contents."""
        self._redactor = Redactor()
        self._paths = {str(path) for _, path in secret_files(config)}
        for settings in config.uplink.present().values():
            try:
                values = settings.secrets()
            except Exception:  # noqa: S112 - an unreadable secret cannot leak; the uplink reports it
                continue
            for value in values:
                self._redactor.add_secret(value)
        for _, path in secret_files(config):
            for value in _file_values(path):
                self._redactor.add_secret(value)

    def text(self, text: str) -> str:
        """``text`` without any known secret."""
        return self._redactor.redact(REDACTOR.redact(text))

    def config(self, config: AgentConfigBase) -> str:
        """The config as indented JSON, secret-named values replaced, then scrubbed as text."""
        dumped = _masked(config.model_dump(mode="json"), self._paths)
        return self.text(json.dumps(dumped, indent=2, default=str, ensure_ascii=False)) + "\n"


def _masked(value: Any, paths: set[str], name: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _masked(v, paths, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, paths, name) for v in value]
    if value is None or isinstance(value, bool) or not SECRET_NAME.search(name):
        return value
    return value if isinstance(value, str) and value in paths else REDACTED


def _file_values(path: Path) -> list[str]:
    """A secret file's whole text, its lines, and what follows ``name:`` on a line (users files)."""
    try:
        with path.open("rb") as file:
            text = file.read(MAX_SECRET_FILE).decode("utf-8", errors="replace")
    except OSError:
        return []  # unreadable by the agent: nothing of it can leak
    values = [text, text.strip()]
    for line in text.splitlines():
        line = line.strip()
        values += [line, line.partition(":")[2].strip()]
    return [v for v in values if len(v) >= MIN_SECRET_LENGTH]
