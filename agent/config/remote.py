"""The effective site config: the local file with whole sections replaced by a remote document's.

Checked by the very validator ``edge-agent validate`` uses (agent/config/model.py), so a remote
document can never run what a site file could not. A problem inside a remote section is named by
its path in the document (``sections.devices[2].port``), one in the local file by file and line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import model
from agent.config.yaml_load import YamlLoadError, clip_text, load_yaml, read_text
from agent.errors import ConfigError

log = logging.getLogger(__name__)

# Whole top-level sections a remote document may set; gateway and buffer stay the bootstrap's.
REMOTE_SECTIONS = ("devices", "priorities", "observability", "uplink", "fleet")


@dataclass(frozen=True)
class FieldProblem:
    """One problem: the field's path (``sections.devices[2].port``) and what is wrong."""

    field: str
    message: str


class RemoteConfigError(ConfigError):
    """The merged config does not validate; ``fields`` holds each problem with its field path."""

    def __init__(self, fields: list[FieldProblem]) -> None:
        super().__init__([f"{p.field}: {p.message}" for p in fields])
        self.fields = fields


class _RemoteLines(model._Lines):
    """No line numbers inside remote sections: the local file's lines would point at the wrong text."""

    def __init__(self, root: Any, remote: frozenset[str]) -> None:
        super().__init__(root)
        self._remote = remote

    def line_of(self, keys: list[int | str]) -> int | None:
        if keys and keys[0] in self._remote:
            return None
        return super().line_of(keys)


def load_effective(path: Path, sections: Mapping[str, Any]) -> model.AgentConfigBase:
    """The site file at ``path`` with each of ``sections`` replacing the local section of that name.

    Raises:
        ConfigError: the local file cannot be read or parsed (its own problems, as ``load_config``).
        RemoteConfigError: the merged config is invalid; every problem with its field path.
    """
    unknown = sorted(set(sections) - set(REMOTE_SECTIONS))
    if unknown:
        raise RemoteConfigError([FieldProblem(f"sections.{name}", "not a section a remote document may set")
                                 for name in unknown])  # fmt: skip
    try:
        data, root = load_yaml(read_text(path))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except YamlLoadError as exc:
        raise ConfigError([f"{path}:{exc.line or 0}: {exc.message}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping with gateway, uplink, buffer, devices"])
    merged = {**data, **sections}
    try:
        return model._validate(merged, _RemoteLines(root, frozenset(sections)), path)
    except ConfigError as exc:
        raise RemoteConfigError([_field_problem(text, path, frozenset(sections)) for text in exc.problems]) from None
    except Exception as exc:  # a validator's bug: refuse the document rather than crash
        log.debug("validating the remote sections over %s failed", path, exc_info=True)
        detail = clip_text(f"{type(exc).__name__}: {exc}", 200)
        raise RemoteConfigError([FieldProblem("sections", f"{model.CHECK_FAILED} ({detail})")]) from exc


def _field_problem(text: str, path: Path, remote: frozenset[str]) -> FieldProblem:
    """``file: devices[2].port: message`` (remote: no line) -> ``sections.devices[2].port``."""
    prefix = f"{path}: "
    if text.startswith(prefix):  # no line number: a remote section, or the file as a whole
        field, sep, message = text[len(prefix) :].partition(": ")
        head = field.split(".", 1)[0].split("[", 1)[0]
        if sep and head in remote:
            return FieldProblem(f"sections.{field}", message)
    # A local section's problem (or a summary line): where it is in the local file.
    where, _, rest = text.partition(": ")
    field, sep, message = rest.partition(": ")
    if not sep:
        return FieldProblem("sections", text)
    return FieldProblem(field, f"{message} (in the local file, {where})")
