"""Logging: readable on a terminal, JSON lines for machines, no secrets, no floods.

- **Format.** Human-readable text by default. JSON lines (one object per line: ``ts``,
  ``level``, ``logger``, ``msg`` and context fields such as ``device``) when
  ``EDGE_AGENT_LOG_FORMAT=json``, or automatically under systemd when stderr is connected to
  the journal (``$JOURNAL_STREAM`` names stderr's device and inode). ``EDGE_AGENT_LOG_FORMAT=text``
  forces text.
- **Context.** :func:`bind` attaches fields to every record logged from the current asyncio
  task (the device runner binds ``device`` and ``driver``, so a driver's own lines carry them);
  ``extra={"event_type": ...}`` adds fields to one record.
- **Secrets.** Every line is redacted before it is written: the MQTT password's value (see
  :func:`add_secret`), PEM private keys, ``password=...``/``"password": "..."``-style pairs and
  the password in ``scheme://user:password@host``.
- **Repetition.** The same (logger, level, message template, device) is written at most
  ``burst`` times per window (default once per 60 s; ``EDGE_AGENT_LOG_REPEAT_WINDOW`` and
  ``EDGE_AGENT_LOG_REPEAT_BURST``); the repeats in between are counted and the next line
  written says ``(repeated N times in the last T s)``. DEBUG lines are never suppressed.
- **States.** A line that announces a subject's state (the uplink connected or down, a device
  online or offline) is always written when that state differs from the subject's last one, and
  its fold starts afresh: the log never ends on a state the subject has left. Only repeats of
  the same state are folded. A line is a state when it is logged with
  ``extra={"subject": ..., "state": ...}`` (the uplink's and the device runner's are).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

FORMAT_ENV = "EDGE_AGENT_LOG_FORMAT"
REPEAT_WINDOW_ENV = "EDGE_AGENT_LOG_REPEAT_WINDOW"
REPEAT_BURST_ENV = "EDGE_AGENT_LOG_REPEAT_BURST"
DEFAULT_REPEAT_WINDOW = 60.0
DEFAULT_REPEAT_BURST = 1
REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words; patterns still apply
MAX_REPEAT_KEYS = 4096
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_EMPTY: Mapping[str, Any] = MappingProxyType({})
LOG_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("edge_agent_log_context", default=_EMPTY)
# Attributes every LogRecord has; anything else on a record came from ``extra`` or a filter.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_OURS = frozenset({"repeated", "repeated_window_s"})


# ---- context ---------------------------------------------------------------------------------
def bind(**fields: Any) -> None:
    """Attach ``fields`` to every record logged from the current task (or thread) from now on."""
    LOG_CONTEXT.set(MappingProxyType({**LOG_CONTEXT.get(), **fields}))


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` to the records logged inside the ``with`` block."""
    token = LOG_CONTEXT.set(MappingProxyType({**LOG_CONTEXT.get(), **fields}))
    try:
        yield
    finally:
        LOG_CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Copy the bound context onto each record (fields given with ``extra=`` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in LOG_CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


# ---- secrets ---------------------------------------------------------------------------------
_PEM = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_PAIR = re.compile(
    r"(?i)(\b(?:password|passwd|pwd|passphrase|secret|token|api[_-]?key)[\"']?\s*[=:]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s,;&\"'}\])]+)"
)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)([^@\s/]+)(@)", re.IGNORECASE)


class Redactor:
    """Removes known secret values and secret-looking text from log output."""

    def __init__(self) -> None:
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add_secret(self, value: str | None) -> None:
        """Never write ``value`` (nor its escaped forms) again; short values are ignored."""
        if value is None or len(value) < MIN_SECRET_LENGTH:
            return
        forms = {value, json.dumps(value)[1:-1], repr(value)[1:-1]}
        with self._lock:
            self._secrets = self._secrets | {f for f in forms if len(f) >= MIN_SECRET_LENGTH}

    def clear(self) -> None:
        """Forget the registered values (tests)."""
        with self._lock:
            self._secrets = frozenset()

    def redact(self, text: str) -> str:
        """``text`` without secrets."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "-----BEGIN" in text:
            text = _PEM.sub(lambda m: f"-----BEGIN {m.group(1)}----- {REDACTED}", text)
        text = _PAIR.sub(lambda m: m.group(1) + REDACTED, text)
        if "://" in text:
            text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + m.group(3), text)
        return text


REDACTOR = Redactor()


def add_secret(value: str | None) -> None:
    """Register a secret value (the MQTT password) so that no log line ever contains it."""
    REDACTOR.add_secret(value)


# ---- repetition ------------------------------------------------------------------------------
@dataclass(slots=True)
class _Seen:
    window_start: float
    written: int
    suppressed: int


def state_of(record: logging.LogRecord) -> tuple[str, str] | None:
    """(subject, state) if ``record`` announces one (see the module docstring), else None."""
    state = getattr(record, "state", None)
    if state is not None:
        subject = getattr(record, "subject", None)
        if subject is None:
            subject = f"{record.name} {getattr(record, 'device', '')}"
        return str(subject), str(state)
    return None


class RepeatFilter(logging.Filter):
    """Write the same (logger, level, template, device) at most ``burst`` times per ``window`` s.

    Suppressed repeats are counted; the next line written for that key after the window says
    how many there were. A line announcing a state other than its subject's last one (see
    :func:`state_of`) is always written and starts its key's window afresh. DEBUG records pass
    untouched.
    """

    def __init__(
        self,
        window: float = DEFAULT_REPEAT_WINDOW,
        burst: int = DEFAULT_REPEAT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window = window
        self.burst = max(1, burst)
        self._clock = clock
        self._seen: dict[tuple[str, int, str, str | None], _Seen] = {}
        self._states: dict[str, str] = {}  # last state announced per subject
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.window <= 0 or record.levelno < logging.INFO:
            return True
        device = getattr(record, "device", None)
        key = (record.name, record.levelno, str(record.msg), None if device is None else str(device))
        state = state_of(record)
        now = self._clock()
        with self._lock:
            # A change of state is written whatever the window, and its line's fold starts again.
            changed = state is not None and self._states.get(state[0]) != state[1]
            if state is not None and changed:
                if len(self._states) >= MAX_REPEAT_KEYS and state[0] not in self._states:
                    self._states.clear()  # a forgotten subject's next line passes: nothing hidden
                self._states[state[0]] = state[1]
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= MAX_REPEAT_KEYS:
                    self._prune(now)
                self._seen[key] = _Seen(now, 1, 0)
                return True
            elapsed = now - seen.window_start
            if changed or elapsed >= self.window:
                suppressed = seen.suppressed
                seen.window_start, seen.written, seen.suppressed = now, 1, 0
                if suppressed:
                    self._mark(record, suppressed, elapsed)
                return True
            if seen.written < self.burst:
                seen.written += 1
                return True
            seen.suppressed += 1
            return False

    @staticmethod
    def _mark(record: logging.LogRecord, suppressed: int, elapsed: float) -> None:
        seconds = max(1, round(elapsed))
        # Appended to the template, so it survives %-formatting; it holds no '%' itself.
        record.msg = f"{record.msg} (repeated {suppressed} times in the last {seconds} s)"
        record.repeated = suppressed
        record.repeated_window_s = seconds

    def _prune(self, now: float) -> None:
        """Forget keys whose window is over; if none is, the oldest half."""
        stale = [k for k, s in self._seen.items() if now - s.window_start >= self.window]
        if not stale:
            ordered = sorted(self._seen.items(), key=lambda kv: kv[1].window_start)
            stale = [k for k, _ in ordered[: len(ordered) // 2]]
        for k in stale:
            del self._seen[k]


# ---- formats ---------------------------------------------------------------------------------
def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _redact_value(value: Any, redactor: Redactor) -> Any:
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _redact_value(v, redactor) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, redactor) for v in value]
    return redactor.redact(str(value))


class TextFormatter(logging.Formatter):
    """The classic line, plus ``[device=...]`` when the message does not name the device."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__(TEXT_FORMAT)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        device = getattr(record, "device", None)
        if device is not None and str(device) not in record.getMessage():
            first, nl, rest = text.partition("\n")
            text = f"{first} [device={device}]{nl}{rest}"
        return self.redactor.redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, context fields, exc."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        out = {k: _redact_value(v, self.redactor) for k, v in out.items()}
        return json.dumps(out, ensure_ascii=False, default=str)


# ---- setup -----------------------------------------------------------------------------------
def stream_is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def choose_format(stream: TextIO, env: Mapping[str, str] | None = None) -> str:
    """``json`` or ``text``: the environment's choice, else json on the journal, else text."""
    env = os.environ if env is None else env
    wanted = env.get(FORMAT_ENV, "").strip().lower()
    if wanted in ("json", "text"):
        return wanted
    return "json" if stream_is_journal(stream, env) else "text"


def _env_number(name: str, default: float) -> float:
    from agent.contract.units import parse_duration

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(parse_duration(raw))
    except (TypeError, ValueError):
        return default


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The agent's handler (marked, so that setup can replace it)."""


def setup_logging(verbose: bool = False, *, stream: TextIO | None = None, fmt: str | None = None) -> logging.Handler:
    """Install the agent's handler on the root logger (idempotent); returns it."""
    stream = sys.stderr if stream is None else stream
    fmt = fmt or choose_format(stream)
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(
        RepeatFilter(
            window=_env_number(REPEAT_WINDOW_ENV, DEFAULT_REPEAT_WINDOW),
            burst=int(_env_number(REPEAT_BURST_ENV, DEFAULT_REPEAT_BURST)),
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
