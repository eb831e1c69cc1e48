"""The agent's recent log lines, kept in memory for remote diagnostics.

The agent logs to stderr only (the journal under systemd), which a diagnostics bundle built
inside the process cannot read back. While the fleet channel is on, a handler on the root
logger also keeps the last lines here, bounded in lines and characters, formatted and
redacted as the text log is (agent/observability/logs.py), repeats folded the same way.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from agent.observability.logs import (
    DEFAULT_REPEAT_BURST,
    DEFAULT_REPEAT_WINDOW,
    REPEAT_BURST_ENV,
    REPEAT_WINDOW_ENV,
    ContextFilter,
    RepeatFilter,
    TextFormatter,
    _env_number,
)

MAX_LINES = 2000
MAX_CHARS = 1024 * 1024  # about 1 MB of text at most (more with non-ASCII), whatever the lines
MAX_LINE_CHARS = 16 * 1024  # a long traceback is cut, not allowed to push out everything else


class LogRing(logging.Handler):
    """The last ``MAX_LINES`` formatted records, at most ``MAX_CHARS`` characters in all."""

    def __init__(self, lines: int = MAX_LINES, chars: int = MAX_CHARS) -> None:
        """Empty; :func:`log_ring` installs the process's one ring."""
        super().__init__()
        self._lines: deque[str] = deque()
        self._size = 0
        self._most = (lines, chars)
        self._guard = threading.Lock()  # records arrive from every thread
        self.setFormatter(TextFormatter())
        self.addFilter(ContextFilter())
        self.addFilter(
            RepeatFilter(
                window=_env_number(REPEAT_WINDOW_ENV, DEFAULT_REPEAT_WINDOW),
                burst=int(_env_number(REPEAT_BURST_ENV, DEFAULT_REPEAT_BURST)),
            )
        )

    def emit(self, record: logging.LogRecord) -> None:
        """Keep one formatted record, dropping the oldest beyond the bounds."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f" [... {len(line) - MAX_LINE_CHARS} characters cut]"
        with self._guard:
            self._lines.append(line)
            self._size += len(line) + 1
            while len(self._lines) > self._most[0] or self._size > self._most[1]:
                self._size -= len(self._lines.popleft()) + 1

    def text(self, most_lines: int | None = None) -> str:
        """The kept lines, oldest first (the last ``most_lines`` of them if given)."""
        with self._guard:
            lines = list(self._lines)
        if most_lines is not None:
            lines = lines[-most_lines:] if most_lines > 0 else []
        return "".join(f"{line}\n" for line in lines)


_RING: LogRing | None = None
_RING_GUARD = threading.Lock()


def log_ring() -> LogRing:
    """The process's ring, installed on the root logger on first use."""
    global _RING  # one ring per process, like the root logger it hangs on
    with _RING_GUARD:
        if _RING is None:
            _RING = LogRing()
            logging.getLogger().addHandler(_RING)
        return _RING
